//! Stable error codes of the public API. The server maps each to an HTTP status in one place.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Unauthorized,
    Forbidden,
    ScopeRequired,
    PlanRequired,
    NotFound,
    UnknownProvider,
    InvalidKeyFormat,
    ValidationError,
    InvalidJson,
    NoKeySaved,
    KeyReportedLeaked,
    Conflict,
    ModelRetired,
    PayloadTooLarge,
    UnsupportedMediaType,
    MethodNotAllowed,
    SharedQuotaExhausted,
    RateLimited,
    ProviderError,
    WorkerUnavailable,
    KekUnavailable,
    SharedPoolUnavailable,
    DatabaseUnavailable,
    Internal,
}

impl ErrorCode {
    /// Every code, in the order of the reference table (`docs/API.md`, whose test checks it
    /// names each one).
    pub const ALL: [ErrorCode; 24] = [
        ErrorCode::InvalidJson,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::ScopeRequired,
        ErrorCode::PlanRequired,
        ErrorCode::NotFound,
        ErrorCode::UnknownProvider,
        ErrorCode::MethodNotAllowed,
        ErrorCode::NoKeySaved,
        ErrorCode::KeyReportedLeaked,
        ErrorCode::Conflict,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::InvalidKeyFormat,
        ErrorCode::ValidationError,
        ErrorCode::ModelRetired,
        ErrorCode::SharedQuotaExhausted,
        ErrorCode::RateLimited,
        ErrorCode::Internal,
        ErrorCode::ProviderError,
        ErrorCode::WorkerUnavailable,
        ErrorCode::KekUnavailable,
        ErrorCode::SharedPoolUnavailable,
        ErrorCode::DatabaseUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::ScopeRequired => "scope_required",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PlanRequired => "plan_required",
            ErrorCode::NotFound => "not_found",
            ErrorCode::UnknownProvider => "unknown_provider",
            ErrorCode::InvalidKeyFormat => "invalid_key_format",
            ErrorCode::ValidationError => "validation_error",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::NoKeySaved => "no_key_saved",
            ErrorCode::KeyReportedLeaked => "key_reported_leaked",
            ErrorCode::ModelRetired => "model_retired",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::SharedQuotaExhausted => "shared_quota_exhausted",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ProviderError => "provider_error",
            ErrorCode::WorkerUnavailable => "worker_unavailable",
            ErrorCode::KekUnavailable => "kek_unavailable",
            ErrorCode::SharedPoolUnavailable => "shared_pool_unavailable",
            ErrorCode::DatabaseUnavailable => "database_unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status each code is always answered with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 401,
            ErrorCode::InvalidJson => 400,
            ErrorCode::Forbidden | ErrorCode::ScopeRequired | ErrorCode::PlanRequired => 403,
            ErrorCode::NotFound | ErrorCode::UnknownProvider => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::NoKeySaved | ErrorCode::KeyReportedLeaked | ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::InvalidKeyFormat | ErrorCode::ValidationError | ErrorCode::ModelRetired => 422,
            ErrorCode::SharedQuotaExhausted | ErrorCode::RateLimited => 429,
            ErrorCode::Internal => 500,
            ErrorCode::ProviderError => 502,
            ErrorCode::WorkerUnavailable
            | ErrorCode::KekUnavailable
            | ErrorCode::SharedPoolUnavailable
            | ErrorCode::DatabaseUnavailable => 503,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn every_code_is_listed_once_and_serializes_as_its_string() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "{} listed twice", code.as_str());
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }
}
