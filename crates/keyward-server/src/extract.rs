//! Request bodies and queries, with every rejection mapped to a stable code.
//!
//! Handlers take the body as [`JsonBody`] (raw bytes, size-limited by the router) and parse
//! it with [`JsonBody::parse`] only after the caller's membership and role are checked, so
//! a non-member learns nothing from how a body is judged.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::StatusCode;
use keyward_core::ErrorCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON request body, not yet parsed.
#[derive(Debug)]
pub struct JsonBody {
    is_json: bool,
    bytes: Bytes,
}

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<JsonBody, ApiError> {
        let is_json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        let bytes = Bytes::from_request(req, state).await.map_err(body_rejection)?;
        Ok(JsonBody { is_json, bytes })
    }
}

fn body_rejection(r: BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(ErrorCode::PayloadTooLarge, "the request body is too large")
    } else {
        ApiError::validation("the request body could not be read")
    }
}

impl JsonBody {
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        if !self.is_json {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "send the body as JSON with Content-Type: application/json",
            ));
        }
        let mut de = serde_json::Deserializer::from_slice(&self.bytes);
        let value = T::deserialize(&mut de).and_then(|v| de.end().map(|()| v));
        value.map_err(|e| {
            // serde_json's messages name fields and types, never values of strings.
            use serde_json::error::Category;
            match e.classify() {
                Category::Syntax | Category::Eof | Category::Io => ApiError::new(
                    ErrorCode::InvalidJson,
                    format!("the body is not valid JSON (line {}, column {})", e.line(), e.column()),
                ),
                Category::Data => ApiError::validation(format!(
                    "the body does not have the expected fields: {}",
                    data_error_message(&e)
                )),
            }
        })
    }
}

/// serde_json data errors look like "unknown field `x`, expected `api_key` at line 1
/// column 9" or "invalid type: integer `5`, expected a string". The "invalid type/value"
/// forms can quote the value they saw, so only the part after "expected" is kept for them.
fn data_error_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let text = full.split(" at line ").next().unwrap_or(&full);
    if text.starts_with("invalid type") || text.starts_with("invalid value") || text.starts_with("invalid length") {
        match text.split_once(", expected ") {
            Some((_, expected)) => format!("a value has the wrong type (expected {expected})"),
            None => "a value has the wrong type".to_owned(),
        }
    } else if text.starts_with("unknown variant") || text.starts_with("unknown field") {
        // The unknown name came from the client: never repeat it.
        let what = if text.starts_with("unknown field") {
            "an unknown field"
        } else {
            "an unknown value"
        };
        match text.split_once(", expected ") {
            Some((_, expected)) => format!("{what} (expected {expected})"),
            None => what.to_owned(),
        }
    } else {
        text.to_owned()
    }
}

/// A query string, with its rejection mapped to `validation_error`.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e: QueryRejection| ApiError::validation(format!("bad query string: {}", e.body_text())))
    }
}
