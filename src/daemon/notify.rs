//! The daemon's word to systemd (`Type=notify`): `READY=1` once the first reconcile has
//! succeeded — HAProxy then serves the desired state, so units ordered after lunafront start
//! against a converged front — and a `STATUS=` line after every reconcile, which
//! `systemctl status lunafront` shows. Without `$NOTIFY_SOCKET` (not under systemd) nothing
//! is sent.

use super::reconcile::Outcome;
use std::sync::atomic::{AtomicBool, Ordering};

static READY_SENT: AtomicBool = AtomicBool::new(false);

/// Tells systemd about a finished reconcile.
pub fn reconciled(outcome: &Outcome) {
    let status = match &outcome.message {
        Some(message) if !outcome.ok() => {
            let first_line = message.lines().next().unwrap_or_default();
            format!("last reconcile {}: {first_line}", outcome.result)
        }
        _ => format!("last reconcile {} at {}", outcome.result, outcome.at),
    };
    let status = sd_notify::NotifyState::Status(&status);
    let result = if outcome.ok() && !READY_SENT.swap(true, Ordering::SeqCst) {
        tracing::info!("ready: the first reconcile succeeded");
        sd_notify::notify(&[sd_notify::NotifyState::Ready, status])
    } else {
        sd_notify::notify(&[status])
    };
    if let Err(e) = result {
        tracing::warn!("cannot notify systemd: {e}");
    }
}
