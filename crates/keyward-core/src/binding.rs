//! [`KeyBinding`]: what a sealed key is bound to. The blob's AEADs authenticate these three
//! values, so a blob copied to another row, account or provider does not open.

use std::fmt;

use crate::{AccountId, IdError, KeyId, Provider};

/// Whose key a blob holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyOwner {
    /// An account's own key.
    Account(AccountId),
    /// The platform's shared-pool key for a provider.
    SharedPool,
    /// The random canary `/readyz` seals and has a worker open: nobody's key.
    ReadinessCanary,
}

impl KeyOwner {
    /// What the shared pool's keys are bound to in place of an account id.
    pub const SHARED_POOL: &'static str = "platform";
    /// What the readiness canary is bound to: no account id has this shape.
    pub const READINESS_CANARY: &'static str = "keyward:readyz";

    pub fn as_str(&self) -> &str {
        match self {
            KeyOwner::Account(id) => id.as_str(),
            KeyOwner::SharedPool => KeyOwner::SHARED_POOL,
            KeyOwner::ReadinessCanary => KeyOwner::READINESS_CANARY,
        }
    }

    /// The inverse of [`KeyOwner::as_str`]; anything else is refused.
    pub fn parse(s: &str) -> Result<KeyOwner, IdError> {
        match s {
            KeyOwner::SHARED_POOL => Ok(KeyOwner::SharedPool),
            KeyOwner::READINESS_CANARY => Ok(KeyOwner::ReadinessCanary),
            other => AccountId::parse(other).map(KeyOwner::Account),
        }
    }
}

impl fmt::Display for KeyOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The owner, provider and key row a sealed key belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyBinding {
    pub owner: KeyOwner,
    pub provider: Provider,
    pub key_id: KeyId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_round_trip_and_nothing_else_parses() {
        let acc = AccountId::from_random([3; 16]);
        for owner in [KeyOwner::Account(acc), KeyOwner::SharedPool, KeyOwner::ReadinessCanary] {
            assert_eq!(KeyOwner::parse(owner.as_str()), Ok(owner.clone()));
        }
        assert!(KeyOwner::parse("acc_nothex").is_err());
        assert!(KeyOwner::parse("").is_err());
        assert!(KeyOwner::parse("Platform").is_err());
    }
}
