//! How an audited action ended: the `outcome` of an audit event and the label of the AI-call
//! metrics. One type, so the words (`ok`, `error:<diagnosis>`, `refused:<code>`) are written
//! in one place.

use std::fmt;

use crate::ErrorCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The action did what it was asked.
    Ok,
    /// It was tried and failed: the provider's diagnosis (`invalid_key`, `no_credit`, …) or
    /// keyward's own (`worker_unavailable`, `kek_unavailable`, `internal`).
    Error(&'static str),
    /// It was refused before any provider was asked (shared credits spent, a leaked key).
    Refused(ErrorCode),
}

impl Outcome {
    pub fn is_ok(self) -> bool {
        self == Outcome::Ok
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok => f.write_str("ok"),
            Outcome::Error(why) => write!(f, "error:{why}"),
            Outcome::Refused(code) => write!(f, "refused:{}", code.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_read_as_the_api_words() {
        assert_eq!(Outcome::Ok.to_string(), "ok");
        assert_eq!(Outcome::Error("invalid_key").to_string(), "error:invalid_key");
        assert_eq!(
            Outcome::Refused(ErrorCode::SharedQuotaExhausted).to_string(),
            "refused:shared_quota_exhausted"
        );
    }
}
