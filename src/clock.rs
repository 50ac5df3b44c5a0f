//! Wall-clock time for the I/O edges (history, status, metrics). The pure core (load, validate,
//! render, plan) never reads the clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
        + test_offset()
}

/// Test-only: `LUNAFRONT_TEST_CLOCK_FILE` names a file holding a number of seconds added to the
/// clock, so that tests can move a running daemon's time forward (token lifetimes, certificate
/// renewal) without waiting. Read at each call while the variable is set; never set it in
/// production.
fn test_offset() -> f64 {
    static FILE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    FILE.get_or_init(|| std::env::var_os("LUNAFRONT_TEST_CLOCK_FILE").map(Into::into))
        .as_ref()
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| text.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// The current time as RFC 3339 in UTC, to the second: `2026-11-28T03:04:05Z`.
pub fn rfc3339_now() -> String {
    rfc3339(unix_now() as i64)
}

/// RFC 3339 (UTC) of a Unix timestamp.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The UTC calendar date `days` days from now, as (year, month, day).
pub fn date_in_days(days: i64) -> (i64, u32, u32) {
    civil_from_days(unix_now() as i64 / 86_400 + days)
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Durations of a reconcile's or an apply's phases, for `LUNAFRONT_LOG=lunafront=debug`.
pub struct PhaseTimer {
    last: std::time::Instant,
    phases: Vec<(&'static str, std::time::Duration)>,
}

impl Default for PhaseTimer {
    fn default() -> PhaseTimer {
        PhaseTimer::new()
    }
}

impl PhaseTimer {
    pub fn new() -> PhaseTimer {
        PhaseTimer {
            last: std::time::Instant::now(),
            phases: Vec::new(),
        }
    }

    pub fn lap(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        self.phases.push((phase, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for PhaseTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (phase, d)) in self.phases.iter().enumerate() {
            write!(
                f,
                "{}{phase}={:.1}ms",
                if i > 0 { " " } else { "" },
                d.as_secs_f64() * 1000.0
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_834_800), "2026-11-28T03:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
