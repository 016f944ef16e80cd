//! [`ProbeLimiter`]: "Test key" runs per account and provider per minute, so a button held
//! down cannot turn into load on a provider (or on someone's key).

use std::collections::HashMap;
use std::sync::Mutex;

use keyward_core::{Provider, UnixMillis};

/// Probes allowed per account and provider per minute (a fixed one-minute window).
#[derive(Debug, Default)]
pub struct ProbeLimiter {
    windows: Mutex<HashMap<(String, Provider), (i64, u32)>>,
}

impl ProbeLimiter {
    pub fn allow(&self, account: &str, provider: Provider, now: UnixMillis, per_minute: u32) -> bool {
        let minute = now.as_i64() / 60_000;
        let Ok(mut w) = self.windows.lock() else { return false };
        if w.len() > 100_000 {
            w.retain(|_, (m, _)| *m == minute);
        }
        let entry = w.entry((account.to_owned(), provider)).or_insert((minute, 0));
        if entry.0 != minute {
            *entry = (minute, 0);
        }
        entry.1 += 1;
        entry.1 <= per_minute
    }
}
