//! A hostile fake provider on loopback: it answers every call with that provider's
//! invalid-key error, quoting the key it received in the error message (the worst a provider
//! can do), and records each request so a test can see where the key travelled.
//!
//! One address serves all three providers (their paths do not collide): point
//! `KEYWARD_{ANTHROPIC,OPENAI,GOOGLE}_BASE_URL` at [`EchoProvider::base_url`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The request target: path and query.
    pub target: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// The fake. Stops when dropped.
#[derive(Debug)]
pub struct EchoProvider {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl EchoProvider {
    /// Listens on 127.0.0.1, port 0, on the current tokio runtime.
    pub async fn start() -> EchoProvider {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake provider");
        let addr = listener.local_addr().expect("fake provider address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(10), serve(stream, log)).await;
                });
            }
        });
        EchoProvider { addr, requests, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for EchoProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, log: Arc<Mutex<Vec<Recorded>>>) {
    loop {
        let Some(req) = read_request(&mut stream).await else {
            return;
        };
        let (status, body) = answer(&req);
        log.lock().unwrap_or_else(|p| p.into_inner()).push(req);
        let head = format!(
            "HTTP/1.1 {status} Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nrequest-id: req_fake_0001\r\nx-request-id: req_fake_0001\r\n\r\n",
            body.len()
        );
        if stream.write_all(head.as_bytes()).await.is_err() || stream.write_all(body.as_bytes()).await.is_err() {
            return;
        }
        let _ = stream.flush().await;
    }
}

async fn read_request(stream: &mut TcpStream) -> Option<Recorded> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 || raw.len() > 1 << 20 {
            return None;
        }
        raw.extend_from_slice(buf.get(..n)?);
    };
    let head = String::from_utf8_lossy(raw.get(..head_end)?).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let target = first.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = raw.get(head_end + 4..)?.to_vec();
    while body.len() < len {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(buf.get(..n)?);
    }
    Some(Recorded {
        method,
        target,
        headers,
        body,
    })
}

/// The key the request carried, wherever it was put.
fn received_key(req: &Recorded) -> String {
    if let Some(k) = req.header("x-api-key").or_else(|| req.header("x-goog-api-key")) {
        return k.to_owned();
    }
    if let Some(k) = req.header("authorization").and_then(|v| v.strip_prefix("Bearer ")) {
        return k.to_owned();
    }
    req.target
        .split_once("key=")
        .map(|(_, k)| k.split('&').next().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

/// Each provider's real invalid-key error, with the key quoted back in full.
fn answer(req: &Recorded) -> (u16, String) {
    let key = received_key(req);
    if req.target.contains("generateContent") {
        let body = serde_json::json!({"error": {
            "code": 400,
            "message": format!("API key not valid: {key}. Please pass a valid API key."),
            "status": "INVALID_ARGUMENT",
            "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]
        }});
        (400, body.to_string())
    } else if req.target.contains("chat/completions") {
        let body = serde_json::json!({"error": {
            "message": format!("Incorrect API key provided: {key}. You can find your API key at https://platform.openai.com/account/api-keys."),
            "type": "invalid_request_error",
            "param": null,
            "code": "invalid_api_key"
        }});
        (401, body.to_string())
    } else {
        let body = serde_json::json!({"type": "error", "error": {
            "type": "authentication_error",
            "message": format!("invalid x-api-key: {key}")
        }});
        (401, body.to_string())
    }
}
