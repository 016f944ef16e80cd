//! Request bodies and queries, with every rejection mapped to a stable code.
//!
//! Handlers take the body as [`JsonBody`] (raw bytes, size-limited) and parse it with
//! [`JsonBody::parse`] only after the caller's membership and role are checked, so a
//! non-member learns nothing from how a body is judged. AI routes take [`AiBody`], whose
//! limit is larger (prompts carry email threads). A body that carries a key is a
//! [`SecretJsonBody`]: the same checks, in a buffer wiped after parsing ([`crate::wiped`]).
//!
//! An oversized body is read to its end (up to a bound) and discarded before the 413 is
//! sent: a client still writing its body would otherwise see a reset connection instead
//! of the answer.

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use futures_util::StreamExt;
use keyward_core::ErrorCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;
use crate::wiped::{read_wiped, Wiped};

/// How much of an oversized body is read and thrown away before answering 413.
pub(crate) const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

/// Reads `body` up to `limit` bytes; past it, drains (bounded) and answers 413.
pub async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ApiError::validation("the request body could not be read"))?;
        seen = seen.saturating_add(chunk.len());
        if seen > limit {
            if seen > DRAIN_LIMIT {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&chunk);
    }
    if seen > limit {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is larger than {limit} bytes"),
        ));
    }
    Ok(Bytes::from(buf))
}

/// A raw AI request body (native pass-through), limited to `KEYWARD_MAX_AI_BODY_BYTES`.
#[derive(Debug)]
pub struct AiBody(pub Bytes);

impl FromRequest<AppState> for AiBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<AiBody, ApiError> {
        read_limited(req.into_body(), state.max_ai_body_bytes).await.map(AiBody)
    }
}

/// A JSON request body, not yet parsed.
#[derive(Debug)]
pub struct JsonBody {
    is_json: bool,
    bytes: Bytes,
}

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<JsonBody, ApiError> {
        JsonBody::read(req, state.max_body_bytes).await
    }
}

/// A JSON body on an AI route: like [`JsonBody`], with the AI routes' larger limit.
#[derive(Debug)]
pub struct AiJsonBody(pub JsonBody);

impl FromRequest<AppState> for AiJsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<AiJsonBody, ApiError> {
        JsonBody::read(req, state.max_ai_body_bytes).await.map(AiJsonBody)
    }
}

impl JsonBody {
    async fn read(req: Request, limit: usize) -> Result<JsonBody, ApiError> {
        let is_json = is_json(&req);
        let bytes = read_limited(req.into_body(), limit).await?;
        Ok(JsonBody { is_json, bytes })
    }

    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        parse_json(self.is_json, &self.bytes)
    }
}

/// Whether a request says its body is JSON.
fn is_json(req: &Request) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// A JSON body that carries a secret (a model key being saved): read, limited and judged
/// exactly like [`JsonBody`], but into a buffer that is wiped when it drops, with every
/// intermediate wiped too (see [`crate::wiped`]). Parse it into a type whose secret field
/// is a `SecretString`. Never printed.
pub struct SecretJsonBody {
    is_json: bool,
    bytes: Wiped,
}

impl std::fmt::Debug for SecretJsonBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretJsonBody")
            .field("is_json", &self.is_json)
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl FromRequest<AppState> for SecretJsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<SecretJsonBody, ApiError> {
        let is_json = is_json(&req);
        let bytes = read_wiped(req.into_body(), state.max_body_bytes).await?;
        Ok(SecretJsonBody { is_json, bytes })
    }
}

impl SecretJsonBody {
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        parse_json(self.is_json, self.bytes.as_slice())
    }
}

/// Parses a JSON body into `T` (`415` unless it was sent as JSON): the one parse every JSON
/// body goes through. Strings without escapes are copied straight from `bytes` into `T`.
fn parse_json<T: DeserializeOwned>(is_json: bool, bytes: &[u8]) -> Result<T, ApiError> {
    if !is_json {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "send the body as JSON with Content-Type: application/json",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
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
