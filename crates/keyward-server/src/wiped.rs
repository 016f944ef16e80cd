//! Request bodies that can carry a secret (a pasted model key, a login token): read into one
//! buffer that is wiped when it drops, parsed without copies of their own, and answered with
//! `Connection: close`.
//!
//! Where a pasted key can be left behind, and what covers each place:
//! - **Our buffer**: [`read_wiped`] reads the body into a [`Wiped`] buffer sized from
//!   `Content-Length` up front; when it must grow, it moves to a new buffer itself and wipes
//!   the old one (a `Vec` left to grow would free its old block with the data in it).
//! - **hyper's chunks**: the body arrives as `Bytes` that share the connection's read buffer
//!   and cannot be written through. hyper mostly moves on to a fresh read buffer while the
//!   body is still being handled, and the old one is freed once the body is dropped; the
//!   binary's allocator zeroes every block it frees (crates/keyward/src/zero_on_free.rs).
//!   When hyper instead reuses the buffer in place, a kept-alive connection would keep the
//!   body until later requests happen to overwrite it, so an answer to a route that takes a
//!   secret says `Connection: close` ([`close_after_secret_body`]): the connection, and its
//!   buffer, are freed as soon as the answer is sent. A chunk that is the only handle on its
//!   memory is wiped here.
//! - **Parsing**: JSON is parsed from the wiped buffer straight into the request type, whose
//!   secret field is a `SecretString` (zeroized on drop) copied once from the buffer; only
//!   a string with escapes passes through serde_json's scratch buffer, freed (and so zeroed)
//!   with the parser. Forms are parsed by [`parse_form`] below rather than by
//!   `serde_urlencoded`, whose percent-decoding makes copies it frees unwiped: here each
//!   name and value is decoded into a buffer wiped after the form is deserialized.

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{MatchedPath, Request};
use axum::http::header::CONNECTION;
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use futures_util::StreamExt;
use keyward_core::ErrorCode;
use serde::de::{self, DeserializeOwned, IntoDeserializer};
use zeroize::{Zeroize, Zeroizing};

use crate::error::ApiError;
use crate::extract::DRAIN_LIMIT;

/// A body's bytes, wiped when dropped. Never printed.
pub struct Wiped(Zeroizing<Vec<u8>>);

impl Wiped {
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Wiped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Wiped({} bytes)", self.0.len())
    }
}

/// Reads `body` (up to `limit` bytes; past it, drains a bounded amount and answers 413) into
/// one wiped buffer, wiping every intermediate it makes.
pub async fn read_wiped(body: Body, limit: usize) -> Result<Wiped, ApiError> {
    // Room for the whole body when its length is announced, so the buffer need not grow.
    let announced = body
        .size_hint()
        .exact()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(1024);
    let mut buf = Zeroizing::new(Vec::with_capacity(announced.min(limit)));
    let mut stream = body.into_data_stream();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ApiError::validation("the request body could not be read"))?;
        seen = seen.saturating_add(chunk.len());
        if seen <= limit {
            if buf.capacity() - buf.len() < chunk.len() {
                // Grown by hand: the old buffer is wiped as it drops.
                let want = (buf.len() + chunk.len())
                    .max(buf.capacity().saturating_mul(2))
                    .min(limit);
                let mut bigger = Zeroizing::new(Vec::with_capacity(want));
                bigger.extend_from_slice(&buf);
                buf = bigger;
            }
            buf.extend_from_slice(&chunk);
        }
        wipe_chunk(chunk);
        if seen > DRAIN_LIMIT {
            break;
        }
    }
    if seen > limit {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is larger than {limit} bytes"),
        ));
    }
    Ok(Wiped(buf))
}

/// Wipes a chunk of the body when this is the only handle on its memory. hyper's chunks
/// usually share the connection's read buffer, which cannot be written through: that one is
/// freed, and zeroed by the binary's allocator, when the connection closes.
fn wipe_chunk(chunk: Bytes) {
    if let Ok(mut owned) = chunk.try_into_mut() {
        owned.as_mut().zeroize();
    }
}

/// The routes whose request body can carry a secret: a model key saved through the API or
/// the settings page, a token typed into the login form.
const SECRET_BODY_ROUTES: &[(Method, &str)] = &[
    (Method::PUT, "/v1/accounts/{account_id}/model-keys/{provider}"),
    (Method::POST, "/settings/ai/model-keys/{provider}/{action}"),
    (Method::POST, "/login"),
];

/// Whether a request to the route template `route` with `method` can carry a secret.
pub fn carries_a_secret(method: &Method, route: &str) -> bool {
    SECRET_BODY_ROUTES.iter().any(|(m, r)| m == method && *r == route)
}

/// Middleware: the answer to a request that can carry a secret closes its connection, so
/// hyper frees the connection's read buffer (which held the body) instead of keeping it for
/// the next request; the allocator zeroes it as it is freed. Costs such a client one new
/// connection; key saves and logins are rare.
pub async fn close_after_secret_body(req: Request, next: Next) -> Response {
    let close = req
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|route| carries_a_secret(req.method(), route.as_str()));
    let mut res = next.run(req).await;
    if close {
        res.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

/// Why a form could not be read. Never holds any part of the form.
#[derive(Debug, thiserror::Error)]
pub enum FormError {
    #[error("the form is not valid UTF-8 once decoded")]
    NotUtf8,
    #[error("the form does not have the expected fields")]
    Fields,
}

/// Parses an `application/x-www-form-urlencoded` body into `T` (string and optional string
/// fields, as the page's forms have). Each name and value is decoded (`+` is a space, `%XX`
/// a byte) into a buffer of its own, wiped once `T` is built; `T`'s strings are copied from
/// those buffers at their exact size, so nothing else holds a pasted key.
pub fn parse_form<T: DeserializeOwned>(raw: &[u8]) -> Result<T, FormError> {
    let mut pairs: Vec<(WipedField, WipedField)> = Vec::new();
    for field in raw.split(|b| *b == b'&').filter(|f| !f.is_empty()) {
        let (name, value) = match field.iter().position(|b| *b == b'=') {
            Some(at) => (
                field.get(..at).unwrap_or_default(),
                field.get(at + 1..).unwrap_or_default(),
            ),
            None => (field, &[][..]),
        };
        pairs.push((decode(name), decode(value)));
    }
    let mut fields = Vec::with_capacity(pairs.len());
    for (name, value) in &pairs {
        let name = std::str::from_utf8(name).map_err(|_| FormError::NotUtf8)?;
        let value = std::str::from_utf8(value).map_err(|_| FormError::NotUtf8)?;
        fields.push((Part(name), Part(value)));
    }
    let map = de::value::MapDeserializer::<_, de::value::Error>::new(fields.into_iter());
    // serde's messages can quote a value: the error is dropped, not passed on.
    T::deserialize(map).map_err(|_| FormError::Fields)
}

/// One decoded name or value, wiped when dropped.
type WipedField = Zeroizing<Vec<u8>>;

/// Percent-decodes one name or value into a wiped buffer of the encoded length (which the
/// decoded one never exceeds, so it never grows).
fn decode(encoded: &[u8]) -> WipedField {
    let mut out = Zeroizing::new(Vec::with_capacity(encoded.len()));
    let mut i = 0;
    while let Some(&b) = encoded.get(i) {
        let hex = encoded
            .get(i + 1)
            .and_then(|h| hex_value(*h))
            .zip(encoded.get(i + 2).and_then(|l| hex_value(*l)));
        match (b, hex) {
            (b'%', Some((high, low))) => {
                out.push((high << 4) | low);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// One decoded name or value of a form: a string, or `Some` string for an optional field.
struct Part<'a>(&'a str);

impl<'de> de::Deserializer<'de> for Part<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_str(self.0)
    }

    fn deserialize_option<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

impl<'de, 'a> IntoDeserializer<'de, de::value::Error> for Part<'a> {
    type Deserializer = Part<'a>;

    fn into_deserializer(self) -> Part<'a> {
        self
    }
}

#[cfg(test)]
mod tests {
    use secrecy::{ExposeSecret, SecretString};
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    struct Form {
        #[serde(default)]
        csrf: String,
        api_key: Option<SecretString>,
        source: Option<String>,
    }

    #[test]
    fn forms_decode_like_a_browser_encodes() {
        let f: Form = parse_form(b"csrf=a%2Bb%3D&api_key=sk-ant-api03-AbC_d.e%0A+&extra=1&source=").unwrap();
        assert_eq!(f.csrf, "a+b=");
        assert_eq!(
            f.api_key.as_ref().map(|k| k.expose_secret()),
            Some("sk-ant-api03-AbC_d.e\n ")
        );
        assert_eq!(f.source.as_deref(), Some(""));
        let f: Form = parse_form(b"&&source=own").unwrap();
        assert_eq!(f.csrf, "");
        assert!(f.api_key.is_none());
        assert_eq!(f.source.as_deref(), Some("own"));
        // A stray `%` is kept as it is, as browsers never send one and urlencoded parsers keep it.
        let f: Form = parse_form(b"csrf=100%&source=%zz%4").unwrap();
        assert_eq!(f.csrf, "100%");
        assert_eq!(f.source.as_deref(), Some("%zz%4"));
        let f: Form = parse_form(b"csrf=caf%C3%A9").unwrap();
        assert_eq!(f.csrf, "café");
    }

    #[test]
    fn bad_forms_are_refused_without_their_values() {
        assert!(matches!(parse_form::<Form>(b"csrf=%FF"), Err(FormError::NotUtf8)));
        let e = parse_form::<Form>(b"csrf=a&csrf=sk-secret").err().unwrap();
        assert!(matches!(e, FormError::Fields));
        assert!(!e.to_string().contains("sk-secret"));
    }

    #[test]
    fn the_routes_that_take_secrets_are_closed_after() {
        assert!(carries_a_secret(
            &Method::PUT,
            "/v1/accounts/{account_id}/model-keys/{provider}"
        ));
        assert!(carries_a_secret(
            &Method::POST,
            "/settings/ai/model-keys/{provider}/{action}"
        ));
        assert!(carries_a_secret(&Method::POST, "/login"));
        assert!(!carries_a_secret(
            &Method::GET,
            "/v1/accounts/{account_id}/model-keys/{provider}"
        ));
        assert!(!carries_a_secret(
            &Method::PUT,
            "/v1/accounts/{account_id}/model-keys/{provider}/source"
        ));
        // The API route is spelled as the router has it.
        let (_, doc) = crate::openapi::api_router();
        let item = doc.paths.paths.get("/v1/accounts/{account_id}/model-keys/{provider}");
        assert!(item.is_some_and(|i| i.put.is_some()), "no such API route");
    }

    #[tokio::test]
    async fn bodies_are_read_whole_and_limited() {
        let body = Body::from(vec![b'x'; 5000]);
        assert_eq!(
            read_wiped(body, 5000).await.unwrap().as_slice(),
            vec![b'x'; 5000].as_slice()
        );
        // A stream without a length, in many chunks: the buffer grows by hand.
        let chunks: Vec<Result<Bytes, std::io::Error>> = (0..40).map(|i| Ok(Bytes::from(vec![i as u8; 100]))).collect();
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let read = read_wiped(body, 4000).await.unwrap();
        assert_eq!(read.as_slice().len(), 4000);
        assert_eq!(read.as_slice().get(3999), Some(&39));
        let e = read_wiped(Body::from(vec![b'x'; 5001]), 5000).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::PayloadTooLarge);
        assert_eq!(format!("{read:?}"), "Wiped(4000 bytes)");
    }
}
