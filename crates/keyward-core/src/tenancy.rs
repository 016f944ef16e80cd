//! Roles, plans and key sources: who may do what, and which pool pays.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what}: expected one of {expected}")]
pub struct UnknownValue {
    pub what: &'static str,
    pub expected: &'static str,
}

macro_rules! string_enum {
    ($name:ident, $what:literal, $expected:literal, { $($variant:ident => $s:literal),+ $(,)? }) => {
        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($s => Ok($name::$variant),)+
                    _ => Err(UnknownValue { what: $what, expected: $expected }),
                }
            }
        }
    };
}

/// A member's role in an account. Owners and admins manage keys; members only use AI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Owner,
    Admin,
    Member,
}
string_enum!(Role, "role", "owner, admin, member", { Owner => "owner", Admin => "admin", Member => "member" });

impl Role {
    pub fn can_manage_keys(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

/// An account's plan. Only paid plans may save their own keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    Free,
    Pro,
    Business,
}
string_enum!(Plan, "plan", "free, pro, business", { Free => "free", Pro => "pro", Business => "business" });

impl Plan {
    pub fn allows_own_keys(self) -> bool {
        !matches!(self, Plan::Free)
    }

    /// Shared-pool credits per calendar month unless an operator sets another limit.
    /// One credit is a tenth of a US cent of provider list price (see `catalogue.toml`).
    pub fn default_shared_credit_limit(self) -> i64 {
        match self {
            Plan::Free => 1_000,
            Plan::Pro => 20_000,
            Plan::Business => 100_000,
        }
    }

    /// The cheapest plan that allows own keys, named in `plan_required` messages.
    pub const FIRST_PAID: Plan = Plan::Pro;
}

/// Which key pays for a provider's calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeySource {
    /// The platform's metered, capped pool.
    #[default]
    Shared,
    /// The account's saved key: uncapped.
    Own,
}
string_enum!(KeySource, "source", "shared, own", { Shared => "shared", Own => "own" });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_owner_and_admin_manage_keys() {
        assert!(Role::Owner.can_manage_keys());
        assert!(Role::Admin.can_manage_keys());
        assert!(!Role::Member.can_manage_keys());
    }

    #[test]
    fn only_paid_plans_allow_own_keys() {
        assert!(!Plan::Free.allows_own_keys());
        assert!(Plan::Pro.allows_own_keys());
        assert!(Plan::Business.allows_own_keys());
    }

    #[test]
    fn strings_round_trip() {
        for r in [Role::Owner, Role::Admin, Role::Member] {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        for p in [Plan::Free, Plan::Pro, Plan::Business] {
            assert_eq!(p.as_str().parse::<Plan>(), Ok(p));
        }
        for s in [KeySource::Shared, KeySource::Own] {
            assert_eq!(s.as_str().parse::<KeySource>(), Ok(s));
        }
        assert!("Owner".parse::<Role>().is_err());
        assert!("enterprise".parse::<Plan>().is_err());
    }
}
