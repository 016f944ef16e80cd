//! [`LoginLimiter`]: login attempts per client address, so tokens and login codes cannot
//! be guessed at speed.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;

use keyward_core::UnixMillis;

/// Login attempts (token or code, right or wrong) allowed per client address per minute.
pub const LOGIN_ATTEMPTS_PER_MINUTE: usize = 10;

/// Login attempts per client address in the last minute (a sliding window: an address gets
/// at most [`LOGIN_ATTEMPTS_PER_MINUTE`] in any 60 seconds).
#[derive(Debug, Default)]
pub struct LoginLimiter {
    recent: Mutex<HashMap<Option<IpAddr>, VecDeque<i64>>>,
}

const WINDOW_MS: i64 = 60_000;

impl LoginLimiter {
    /// Counts one attempt; false when the address is over its limit. IPv6 addresses count
    /// per /64 (one host usually holds a whole /64).
    pub fn allow(&self, ip: Option<IpAddr>, now: UnixMillis) -> bool {
        let ip = ip.map(bucket);
        let now = now.as_i64();
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() > 100_000 {
            recent.retain(|_, times| times.back().is_some_and(|t| now - t < WINDOW_MS));
        }
        let times = recent.entry(ip).or_default();
        while times.front().is_some_and(|t| now - t >= WINDOW_MS) {
            times.pop_front();
        }
        if times.len() >= LOGIN_ATTEMPTS_PER_MINUTE {
            return false;
        }
        times.push_back(now);
        true
    }
}

/// The address an attempt counts against: IPv4 as is (also when mapped into IPv6), IPv6 by /64.
fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_attempts_are_limited_per_address_and_minute() {
        let l = LoginLimiter::default();
        let a: Option<IpAddr> = "127.0.0.1".parse().ok();
        let b: Option<IpAddr> = "127.0.0.2".parse().ok();
        for _ in 0..LOGIN_ATTEMPTS_PER_MINUTE {
            assert!(l.allow(a, UnixMillis(0)));
        }
        assert!(!l.allow(a, UnixMillis(59_999)));
        assert!(l.allow(b, UnixMillis(59_999)));
        assert!(l.allow(a, UnixMillis(60_000)));

        // One IPv6 /64 is one address; the IPv4-mapped form is the IPv4 address.
        let l = LoginLimiter::default();
        for i in 0..LOGIN_ATTEMPTS_PER_MINUTE {
            assert!(l.allow(format!("2001:db8::{i:x}").parse().ok(), UnixMillis(0)));
        }
        assert!(!l.allow("2001:db8::ffff:1".parse().ok(), UnixMillis(0)));
        assert!(l.allow("2001:db8:0:1::1".parse().ok(), UnixMillis(0)));
        for _ in 0..LOGIN_ATTEMPTS_PER_MINUTE {
            assert!(l.allow("::ffff:10.0.0.1".parse().ok(), UnixMillis(0)));
        }
        assert!(!l.allow("10.0.0.1".parse().ok(), UnixMillis(0)));
    }
}
