//! The daemon's signals (I/O edge), caught from its first moment and each one logged:
//! SIGTERM and SIGINT stop it (and the HAProxy it runs, with `spawn`), SIGHUP asks for a
//! reconcile now (the convention of HAProxy, nginx and consul-template), SIGUSR1 and SIGUSR2
//! are ignored. None of them ends the daemon without it stopping what it started.

use super::reconcile::{Request, Trigger};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use tokio::signal::unix::{SignalKind, signal};

pub struct Signals {
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Where SIGHUP sends its reconcile request, once the reconcile loop exists.
    requests: Arc<Mutex<Option<Sender<Request>>>>,
}

impl Signals {
    /// Installs the handlers; call it inside the daemon's tokio runtime.
    pub fn install() -> Result<Signals, String> {
        let handler = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| format!("cannot handle {name}: {e}"))
        };
        let mut term = handler(SignalKind::terminate(), "SIGTERM")?;
        let mut int = handler(SignalKind::interrupt(), "SIGINT")?;
        let mut hup = handler(SignalKind::hangup(), "SIGHUP")?;
        let mut usr1 = handler(SignalKind::user_defined1(), "SIGUSR1")?;
        let mut usr2 = handler(SignalKind::user_defined2(), "SIGUSR2")?;
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let requests: Arc<Mutex<Option<Sender<Request>>>> = Arc::new(Mutex::new(None));
        let reconcile = requests.clone();
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                    _ = hup.recv() => "SIGHUP",
                    _ = usr1.recv() => "SIGUSR1",
                    _ = usr2.recv() => "SIGUSR2",
                };
                match name {
                    "SIGTERM" | "SIGINT" => {
                        tracing::info!(
                            signal = name,
                            "received {name}: shutting down (and stopping the HAProxy this daemon runs)"
                        );
                        let _ = stop.send(true);
                    }
                    "SIGHUP" => {
                        let sent = reconcile
                            .lock()
                            .expect("signal requests")
                            .as_ref()
                            .is_some_and(|requests| {
                                requests
                                    .send(Request {
                                        trigger: Trigger::Signal,
                                        reply: None,
                                    })
                                    .is_ok()
                            });
                        if sent {
                            tracing::info!(signal = name, "received {name}: reconciling now");
                        } else {
                            tracing::info!(
                                signal = name,
                                "received {name}: the daemon is starting or stopping; no reconcile asked"
                            );
                        }
                    }
                    _ => tracing::info!(signal = name, "received {name}: ignored"),
                }
            }
        });
        Ok(Signals { shutdown, requests })
    }

    /// From now on SIGHUP asks this reconcile loop for a reconcile.
    pub fn reconcile_with(&self, requests: Sender<Request>) {
        *self.requests.lock().expect("signal requests") = Some(requests);
    }

    /// SIGHUP asks for nothing any more: the reconcile loop ends once its other senders are gone.
    pub fn stop_reconciling(&self) {
        self.requests.lock().expect("signal requests").take();
    }

    /// Resolves once SIGTERM or SIGINT arrived (also one that arrived before this is called).
    pub fn shutdown(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut shutdown = self.shutdown.clone();
        async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        }
    }
}
