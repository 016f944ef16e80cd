//! Identifiers. Each is a prefixed opaque string, built either fresh (by the store, from
//! random bytes it is handed) or by parsing, so a handler never holds an unchecked id.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed identifier")]
pub struct IdError;

macro_rules! prefixed_id {
    ($name:ident, $prefix:literal) => {
        /// Serialized as its string; deserialized through [`Self::parse`], so a malformed id
        /// never enters from JSON either.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(into = "String", try_from = "String")]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A new id from 16 random bytes (the caller supplies the randomness).
            pub fn from_random(bytes: [u8; 16]) -> Self {
                let mut s = String::with_capacity(Self::PREFIX.len() + 32);
                s.push_str(Self::PREFIX);
                for b in bytes {
                    s.push(hex_digit(b >> 4));
                    s.push(hex_digit(b & 0x0f));
                }
                Self(s)
            }

            /// Accepts exactly `PREFIX` followed by 32 lower-case hex digits.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                let rest = s.strip_prefix(Self::PREFIX).ok_or(IdError)?;
                if rest.len() == 32 && rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(IdError)
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

fn hex_digit(n: u8) -> char {
    char::from(b"0123456789abcdef".get(usize::from(n & 0x0f)).copied().unwrap_or(b'0'))
}

prefixed_id!(UserId, "usr_");
prefixed_id!(AccountId, "acc_");
prefixed_id!(KeyId, "key_");
prefixed_id!(ServiceId, "svc_");

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_accepts_only_the_exact_shape() {
        let id = AccountId::from_random([0xab; 16]);
        assert_eq!(AccountId::parse(id.as_str()), Ok(id.clone()));
        assert!(UserId::parse(id.as_str()).is_err(), "prefix is checked");
        assert!(AccountId::parse("acc_").is_err());
        assert!(AccountId::parse(&format!("{}0", id)).is_err());
        assert!(AccountId::parse(&id.as_str().to_uppercase()).is_err());
        assert!(AccountId::parse("acc_../../etc/passwd0000000000000000").is_err());
    }

    #[test]
    fn json_goes_through_parse() {
        let id = UserId::from_random([7; 16]);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<UserId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<UserId>("\"usr_nothex\"").is_err());
        assert!(serde_json::from_str::<AccountId>(&json).is_err(), "prefix is checked");
    }

    proptest! {
        #[test]
        fn random_ids_round_trip(bytes in any::<[u8; 16]>()) {
            let id = KeyId::from_random(bytes);
            prop_assert_eq!(KeyId::parse(id.as_str()), Ok(id));
        }

        #[test]
        fn parse_never_panics(s in ".{0,80}") {
            let _ = AccountId::parse(&s);
        }
    }
}
