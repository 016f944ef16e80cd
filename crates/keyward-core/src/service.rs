//! The product's own services: the scopes a service token may hold, and the product's own
//! ids (external ids) that the provisioning API is keyed by.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// What a service token may do. No scope manages keys: saving, rotating, removing, testing
/// and switching keys stay with an account's owners and admins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Scope {
    /// AI calls (`ai/messages`) and the native pass-through, for any account.
    #[serde(rename = "ai:call")]
    AiCall,
    /// The provisioning API (`/v1/external/…`).
    #[serde(rename = "accounts:manage")]
    AccountsManage,
    /// Any account's audit log.
    #[serde(rename = "audit:read")]
    AuditRead,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::AiCall, Scope::AccountsManage, Scope::AuditRead];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::AiCall => "ai:call",
            Scope::AccountsManage => "accounts:manage",
            Scope::AuditRead => "audit:read",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope: expected ai:call, accounts:manage or audit:read")]
pub struct UnknownScope;

impl FromStr for Scope {
    type Err = UnknownScope;
    fn from_str(s: &str) -> Result<Scope, UnknownScope> {
        Scope::ALL.into_iter().find(|c| c.as_str() == s).ok_or(UnknownScope)
    }
}

/// A service's name: what the audit log shows as `service:<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a service name is 1 to 64 characters of a-z, 0-9, '_' and '-'")]
pub struct ServiceNameError;

impl ServiceName {
    pub fn parse(raw: &str) -> Result<ServiceName, ServiceNameError> {
        let ok = !raw.is_empty()
            && raw.len() <= 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        ok.then(|| ServiceName(raw.to_owned())).ok_or(ServiceNameError)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The product's own id of an account or a user: 1 to 128 characters of `[A-Za-z0-9._:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ExternalId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an external id is 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-' (not . or ..)")]
pub struct ExternalIdError;

impl ExternalId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(raw: &str) -> Result<ExternalId, ExternalIdError> {
        let ok = !raw.is_empty()
            && raw.len() <= Self::MAX_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
            // `.` and `..` are path segments of their own in a URL.
            && raw != "."
            && raw != "..";
        ok.then(|| ExternalId(raw.to_owned())).ok_or(ExternalIdError)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ExternalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_and_nothing_else_parses() {
        for s in Scope::ALL {
            assert_eq!(s.as_str().parse::<Scope>(), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for bad in ["", "ai", "AI:CALL", "keys:manage", "ai:call "] {
            assert!(bad.parse::<Scope>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn external_ids_are_checked() {
        for good in ["a", "acct:42", "org_1.team-2", &"x".repeat(128)] {
            assert!(ExternalId::parse(good).is_ok(), "{good:?}");
        }
        for bad in ["", " a", "a/b", "a b", "é", &"x".repeat(129), "a\n", ".", ".."] {
            assert!(ExternalId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn service_names_are_checked() {
        assert!(ServiceName::parse("drafting").is_ok());
        assert!(ServiceName::parse("auto-pilot_2").is_ok());
        for bad in ["", "Drafting", "a b", "a:b", &"x".repeat(65)] {
            assert!(ServiceName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
