//! A user's email address, checked just enough to be a sane identifier.

use std::fmt;

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Email(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an email address: expected local@domain, at most 254 characters, no spaces")]
pub struct EmailError;

impl Email {
    /// Lower-cases and checks `local@domain` with no white space or control characters.
    pub fn parse(raw: &str) -> Result<Email, EmailError> {
        let s = raw.trim();
        let (local, domain) = s.split_once('@').ok_or(EmailError)?;
        let ok = s.len() <= 254
            && !local.is_empty()
            && !domain.is_empty()
            && !domain.contains('@')
            && !s.chars().any(|c| c.is_whitespace() || c.is_control());
        ok.then(|| Email(s.to_lowercase())).ok_or(EmailError)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_addresses_and_lowercases() {
        assert_eq!(Email::parse(" Owner@Localhost ").unwrap().as_str(), "owner@localhost");
    }

    #[test]
    fn refuses_junk() {
        for bad in [
            "",
            "a",
            "@b",
            "a@",
            "a@b@c",
            "a b@c",
            "a@b\nc",
            &format!("{}@x", "a".repeat(260)),
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?}");
        }
    }
}
