//! The one place errors become HTTP answers.
//!
//! Inside the request path every failure is an [`ApiError`]: a stable [`ErrorCode`]
//! (which fixes the status) and a sentence for a person. Errors from the store are mapped
//! here too. Anything unexpected is logged in full and answered as a bare `internal`
//! 500, so no internal detail (let alone a key) reaches a client. Messages never hold
//! key material: key-format errors never repeat their input, and nothing else here sees
//! a key.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyward_core::ErrorCode;
use keyward_store::StoreError;
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// For `provider_error`: the provider's HTTP status, when it answered.
    pub provider_status: Option<u16>,
    /// For `model_retired`: the catalogued model to use instead.
    pub replaced_by: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            provider_status: None,
            replaced_by: None,
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            ErrorCode::Unauthorized,
            "a valid token is required: send Authorization: Bearer kw_…",
        )
    }

    /// Non-members get this for every account route, so account ids cannot be probed.
    pub fn not_found() -> ApiError {
        ApiError::new(ErrorCode::NotFound, "no such resource")
    }

    pub fn forbidden(what: &str) -> ApiError {
        ApiError::new(
            ErrorCode::Forbidden,
            format!("{what} needs the owner or admin role in this account"),
        )
    }

    pub fn validation(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::ValidationError, message)
    }

    /// Logs the cause in full, answers a bare 500.
    pub fn internal(cause: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(ErrorCode::Internal, "internal error; it has been logged")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound => ApiError::not_found(),
            StoreError::NoKeySaved => ApiError::new(
                ErrorCode::NoKeySaved,
                "no key is saved for this provider: save one before switching to \"own\"",
            ),
            StoreError::Conflict(m) => ApiError::validation(m),
            StoreError::Unavailable(m) => {
                tracing::warn!(error = %m, "database unavailable");
                ApiError::new(
                    ErrorCode::DatabaseUnavailable,
                    "the database is unavailable; retry shortly",
                )
            }
            other => ApiError::internal(&other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut error = json!({ "code": self.code.as_str(), "message": self.message });
        if self.code == ErrorCode::ProviderError {
            error["provider_status"] = json!(self.provider_status);
        }
        if let Some(r) = &self.replaced_by {
            error["replaced_by"] = json!(r);
        }
        let body = json!({ "error": error });
        (status, Json(body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
