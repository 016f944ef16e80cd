//! A small HTTP client for the keyward API: JSON in, status and JSON (or raw text) out.

use std::time::Duration;

use reqwest::header::{HeaderMap, CONTENT_TYPE};
use reqwest::Method;
use serde_json::Value;

/// A reqwest client bound to one base URL. No proxy, no redirects, a 30 s timeout.
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
    base: String,
}

/// One raw request, for what the JSON helpers cannot express (no content type, bad bytes,
/// odd methods, extra headers).
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub method: Method,
    pub path: String,
    pub token: Option<String>,
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawRequest {
    pub fn new(method: Method, path: &str) -> Self {
        RawRequest {
            method,
            path: path.to_owned(),
            token: None,
            content_type: None,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    pub fn content_type(mut self, ct: &str) -> Self {
        self.content_type = Some(ct.to_owned());
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// A JSON body with `Content-Type: application/json`.
    pub fn json_bytes(self, body: impl Into<Vec<u8>>) -> Self {
        self.content_type("application/json").body(body)
    }
}

/// An answer: status, headers, the body as text and, when it parses, as JSON.
#[derive(Debug, Clone)]
pub struct Resp {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
    pub json: Option<Value>,
}

impl Resp {
    /// The body as JSON; panics (showing the answer) when it is not JSON.
    pub fn json(&self) -> &Value {
        self.json.as_ref().unwrap_or_else(|| panic!("{self}: body is not JSON"))
    }

    /// `error.code`, when the body is an error body.
    pub fn error_code(&self) -> Option<&str> {
        self.json.as_ref()?.get("error")?.get("code")?.as_str()
    }

    /// `error.message`, when the body is an error body.
    pub fn error_message(&self) -> Option<&str> {
        self.json.as_ref()?.get("error")?.get("message")?.as_str()
    }

    /// Panics unless the status is `status`.
    #[track_caller]
    pub fn expect_status(&self, status: u16) -> &Self {
        assert_eq!(self.status, status, "{self}");
        self
    }

    /// Panics unless this is the error `{"error": {"code": code, "message": <non-empty>}}`
    /// with HTTP status `status` and a JSON content type.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) -> &Self {
        assert_eq!(self.status, status, "expected {status} {code}: {self}");
        assert_eq!(self.error_code(), Some(code), "expected error code {code}: {self}");
        let message = self.error_message().unwrap_or_default();
        assert!(
            message.trim().len() >= 8 && message != code,
            "error message should be a readable sentence: {self}"
        );
        let ct = self.content_type();
        assert!(ct.starts_with("application/json"), "error content type {ct:?}: {self}");
        self
    }

    pub fn content_type(&self) -> String {
        self.headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

impl std::fmt::Display for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: String = self.text.chars().take(2000).collect();
        write!(f, "{} {} -> {} {}", self.method, self.path, self.status, shown)
    }
}

impl Http {
    /// A client for `base` (e.g. `http://127.0.0.1:4242`).
    pub fn new(base: &str) -> Http {
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .expect("build reqwest client");
        Http {
            client,
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.send(Method::GET, path, token, None).await
    }

    pub async fn put(&self, path: &str, token: Option<&str>, json: &Value) -> Resp {
        self.send(Method::PUT, path, token, Some(json)).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, json: &Value) -> Resp {
        self.send(Method::POST, path, token, Some(json)).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> Resp {
        self.send(Method::DELETE, path, token, None).await
    }

    /// Any method, with an optional JSON body.
    pub async fn send(&self, method: Method, path: &str, token: Option<&str>, json: Option<&Value>) -> Resp {
        let mut req = RawRequest::new(method, path);
        if let Some(t) = token {
            req = req.token(t);
        }
        if let Some(body) = json {
            req = req.json_bytes(serde_json::to_vec(body).expect("serialize JSON body"));
        }
        self.raw(req).await
    }

    /// Sends a raw request; panics if no HTTP answer comes back.
    pub async fn raw(&self, req: RawRequest) -> Resp {
        let shown = format!("{} {}", req.method, req.path);
        self.try_raw(req)
            .await
            .unwrap_or_else(|e| panic!("{shown}: no HTTP answer: {e:?}"))
    }

    /// Sends a raw request; transport errors are returned.
    pub async fn try_raw(&self, req: RawRequest) -> Result<Resp, reqwest::Error> {
        let url = format!("{}{}", self.base, req.path);
        let mut b = self.client.request(req.method.clone(), &url);
        if let Some(t) = &req.token {
            b = b.bearer_auth(t);
        }
        if let Some(ct) = &req.content_type {
            b = b.header(CONTENT_TYPE, ct);
        }
        for (k, v) in &req.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        if !req.body.is_empty() || req.content_type.is_some() {
            b = b.body(req.body.clone());
        }
        let resp = b.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_slice(&bytes).ok();
        Ok(Resp {
            method: req.method.to_string(),
            path: req.path,
            status,
            headers,
            text,
            json,
        })
    }

    /// Sends a request over a plain TCP connection, as a careful HTTP/1.1 client does: the
    /// body is written while the answer is read, and a server that answers early (413) and
    /// closes is still heard even when writing the rest of the body fails. reqwest reports
    /// such a write failure instead of the answer, so oversized bodies go through here.
    pub async fn raw_tcp(&self, req: RawRequest) -> Resp {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let shown = format!("{} {}", req.method, req.path);
        let host = self.base.strip_prefix("http://").unwrap_or(&self.base).to_owned();
        let stream = tokio::net::TcpStream::connect(&host)
            .await
            .unwrap_or_else(|e| panic!("{shown}: connect {host}: {e}"));
        let (mut rd, mut wr) = stream.into_split();
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n",
            req.method, req.path
        );
        if let Some(t) = &req.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(ct) = &req.content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        for (k, v) in &req.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", req.body.len()));
        let body = req.body.clone();
        let writer = tokio::spawn(async move {
            if wr.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            for chunk in body.chunks(16 * 1024) {
                if wr.write_all(chunk).await.is_err() {
                    return;
                }
            }
            let _ = wr.flush().await;
            // Keep the write half open until the server closes: dropping it would half-close.
            std::future::pending::<()>().await;
        });
        let mut raw = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let read = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        raw.extend_from_slice(buf.get(..n).unwrap_or_default());
                        if response_complete(&raw) {
                            break;
                        }
                    }
                }
            }
        })
        .await;
        writer.abort();
        assert!(read.is_ok(), "{shown}: no complete answer within 30 s");
        parse_response(&raw, req.method.as_str(), &req.path).unwrap_or_else(|| {
            panic!(
                "{shown}: no HTTP answer (got {} bytes: {:?})",
                raw.len(),
                String::from_utf8_lossy(&raw)
            )
        })
    }
}

/// Splits a raw HTTP/1.1 answer into (status, headers, body start) once its head is complete.
fn split_head(raw: &[u8]) -> Option<(u16, HeaderMap, usize)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(raw.get(..end)?).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let (k, v) = line.split_once(':')?;
        let name = reqwest::header::HeaderName::from_bytes(k.trim().as_bytes()).ok()?;
        let value = reqwest::header::HeaderValue::from_str(v.trim()).ok()?;
        headers.append(name, value);
    }
    Some((status, headers, end + 4))
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(reqwest::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn is_chunked(headers: &HeaderMap) -> bool {
    headers
        .get(reqwest::header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
}

fn response_complete(raw: &[u8]) -> bool {
    let Some((_, headers, start)) = split_head(raw) else {
        return false;
    };
    let body = raw.get(start..).unwrap_or_default();
    if let Some(len) = content_length(&headers) {
        body.len() >= len
    } else if is_chunked(&headers) {
        dechunk(body).is_some()
    } else {
        false
    }
}

/// Decodes a complete chunked body (None while incomplete).
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(body.get(..line_end)?).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = body.get(line_end + 2..)?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

fn parse_response(raw: &[u8], method: &str, path: &str) -> Option<Resp> {
    let (status, headers, start) = split_head(raw)?;
    let rest = raw.get(start..).unwrap_or_default();
    let body = if let Some(len) = content_length(&headers) {
        rest.get(..len)?.to_vec()
    } else if is_chunked(&headers) {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    let text = String::from_utf8_lossy(&body).into_owned();
    let json = serde_json::from_slice(&body).ok();
    Some(Resp {
        method: method.to_owned(),
        path: path.to_owned(),
        status,
        headers,
        text,
        json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fixed_and_chunked_answers() {
        let raw = b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"a\": true}";
        assert!(response_complete(raw));
        let r = parse_response(raw, "PUT", "/x").unwrap();
        assert_eq!((r.status, r.json), (413, Some(serde_json::json!({"a": true}))));
        let raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert!(response_complete(raw));
        assert_eq!(parse_response(raw, "GET", "/").unwrap().text, "abcde");
        assert!(!response_complete(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab"));
    }
}
