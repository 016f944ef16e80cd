//! A small HTTP/1.1 load generator over keep-alive TCP connections.
//!
//! Each connection sends one pre-encoded request at a time and reads the whole answer
//! (`Content-Length` or chunked). Closed loop: every connection sends again as soon as its
//! answer is in. Open loop: requests are due at a fixed rate, whatever the answers do, and
//! each latency is measured from when its request was due (so a stall shows up in the
//! latencies instead of silently lowering the rate: no coordinated omission).
//!
//! The generator is light on purpose: one `write` and a few `read`s per request, no
//! allocation after warm-up. The direct run shows what it can drive on its own.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request, encoded once.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub request: Arc<Vec<u8>>,
}

impl Target {
    /// A POST of `body` to `url` (`http://host:port/path`) with extra headers.
    pub fn post(url: &str, headers: &[(&str, &str)], body: &[u8]) -> Target {
        let rest = url.strip_prefix("http://").expect("http:// URL");
        let (host, path) = rest
            .split_once('/')
            .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
        let addr: SocketAddr = host.parse().expect("numeric host:port");
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        Target {
            addr,
            request: Arc::new(bytes),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Sorted latencies in microseconds.
    pub latencies_us: Vec<u32>,
    /// First error seen, for the report.
    pub first_error: Option<String>,
}

impl RunStats {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency at quantile `q` (0..=1), in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_us.len() as f64 - 1.0) * q).round() as usize;
        f64::from(self.latencies_us[i.min(self.latencies_us.len() - 1)]) / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.latencies_us.last().map_or(0.0, |v| f64::from(*v) / 1000.0)
    }

    fn merge(parts: Vec<RunStats>, elapsed: Duration) -> RunStats {
        let mut all = RunStats {
            elapsed,
            ..RunStats::default()
        };
        for p in parts {
            all.requests += p.requests;
            all.errors += p.errors;
            all.latencies_us.extend(p.latencies_us);
            if all.first_error.is_none() {
                all.first_error = p.first_error;
            }
        }
        all.latencies_us.sort_unstable();
        all
    }
}

/// One keep-alive connection that can send the target's request and read its answer.
struct Conn {
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    fn new() -> Conn {
        Conn {
            stream: None,
            buf: Vec::with_capacity(16 * 1024),
        }
    }

    /// One exchange; on any failure the connection is dropped (and reopened next time).
    async fn exchange(&mut self, target: &Target) -> Result<u16, String> {
        if self.stream.is_none() {
            let s = TcpStream::connect(target.addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            self.stream = Some(s);
        }
        let result = self.exchange_on(target).await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn exchange_on(&mut self, target: &Target) -> Result<u16, String> {
        let stream = self.stream.as_mut().ok_or("no connection")?;
        stream
            .write_all(&target.request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        self.buf.clear();
        // Read the head.
        let (status, head_len, body) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 128];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = resp.code.unwrap_or(0);
                    let mut body = BodyLen::UntilClose;
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            let v = std::str::from_utf8(h.value).map_err(|e| e.to_string())?;
                            body = BodyLen::Fixed(v.trim().parse().map_err(|_| "bad content-length")?);
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
                            && h.value.eq_ignore_ascii_case(b"chunked")
                        {
                            body = BodyLen::Chunked;
                        }
                    }
                    break (status, n, body);
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(format!("bad response head: {e}")),
            }
            if read_more(stream, &mut self.buf).await? == 0 {
                return Err("connection closed before the answer".into());
            }
        };
        match body {
            BodyLen::Fixed(len) => {
                while self.buf.len() < head_len + len {
                    if read_more(stream, &mut self.buf).await? == 0 {
                        return Err("connection closed mid-body".into());
                    }
                }
            }
            BodyLen::Chunked => {
                let mut pos = head_len;
                loop {
                    match chunk_step(&self.buf, pos)? {
                        Some(Step::Next(p)) => pos = p,
                        Some(Step::Done) => break,
                        None => {
                            if read_more(stream, &mut self.buf).await? == 0 {
                                return Err("connection closed mid-chunk".into());
                            }
                        }
                    }
                }
            }
            BodyLen::UntilClose => return Err("answer without length (not keep-alive)".into()),
        }
        Ok(status)
    }
}

enum BodyLen {
    Fixed(usize),
    Chunked,
    UntilClose,
}

enum Step {
    Next(usize),
    Done,
}

/// Parses one chunk at `pos`: `None` if more bytes are needed.
fn chunk_step(buf: &[u8], pos: usize) -> Result<Option<Step>, String> {
    let rest = &buf[pos.min(buf.len())..];
    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let size_str = std::str::from_utf8(&rest[..eol]).map_err(|e| e.to_string())?;
    let size_str = size_str.split(';').next().unwrap_or("").trim();
    let size = usize::from_str_radix(size_str, 16).map_err(|_| format!("bad chunk size {size_str:?}"))?;
    let need = eol + 2 + size + 2;
    if rest.len() < need {
        return Ok(None);
    }
    if size == 0 {
        Ok(Some(Step::Done))
    } else {
        Ok(Some(Step::Next(pos + need)))
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, String> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    stream.read_buf(buf).await.map_err(|e| format!("read: {e}"))
}

fn is_ok(status: u16) -> bool {
    (200..300).contains(&status)
}

/// `connections` connections, each sending back to back for `duration`.
pub async fn closed_loop(target: &Target, connections: usize, duration: Duration) -> RunStats {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new();
            let mut stats = RunStats::default();
            stats.latencies_us.reserve(64 * 1024);
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = conn.exchange(&target).await;
                record(&mut stats, t.elapsed(), r);
            }
            stats
        }));
    }
    let mut parts = Vec::new();
    for t in tasks {
        parts.push(t.await.unwrap_or_default());
    }
    RunStats::merge(parts, started.elapsed())
}

/// Requests due at `rate` per second for `duration`, over up to `connections` connections;
/// latency counts from when each request was due.
pub async fn open_loop(target: &Target, rate: u64, connections: usize, duration: Duration) -> RunStats {
    let started = Instant::now();
    let total = rate.saturating_mul(duration.as_secs().max(1));
    let next = Arc::new(AtomicU64::new(0));
    let interval_ns = 1e9 / rate.max(1) as f64;
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (target, next) = (target.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new();
            let mut stats = RunStats::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let due = started + Duration::from_nanos((i as f64 * interval_ns) as u64);
                tokio::time::sleep_until(due.into()).await;
                let r = conn.exchange(&target).await;
                record(&mut stats, due.elapsed(), r);
            }
            stats
        }));
    }
    let mut parts = Vec::new();
    for t in tasks {
        parts.push(t.await.unwrap_or_default());
    }
    RunStats::merge(parts, started.elapsed())
}

fn record(stats: &mut RunStats, took: Duration, result: Result<u16, String>) {
    stats.requests += 1;
    stats
        .latencies_us
        .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
    match result {
        Ok(s) if is_ok(s) => {}
        Ok(s) => {
            stats.errors += 1;
            stats.first_error.get_or_insert_with(|| format!("HTTP {s}"));
        }
        Err(e) => {
            stats.errors += 1;
            stats.first_error.get_or_insert(e);
        }
    }
}

/// Time until `marker` (e.g. the first text of a streamed answer) arrives, and to the end.
pub async fn time_to(target: &Target, marker: &[u8]) -> Result<(Duration, Duration), String> {
    let mut s = TcpStream::connect(target.addr).await.map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let t = Instant::now();
    s.write_all(&target.request).await.map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut first = None;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), read_more(&mut s, &mut buf))
            .await
            .map_err(|_| format!("no end after 10 s: {}", String::from_utf8_lossy(&buf)))??;
        if !buf.starts_with(b"HTTP/1.1 200") && buf.len() >= 12 {
            return Err(format!("not a 200: {}", String::from_utf8_lossy(&buf)));
        }
        if first.is_none() && buf.windows(marker.len()).any(|w| w == marker) {
            first = Some(t.elapsed());
        }
        if n == 0 || buf.ends_with(b"\r\n0\r\n\r\n") {
            break;
        }
    }
    let end = t.elapsed();
    first
        .map(|f| (f, end))
        .ok_or_else(|| format!("marker not found in: {}", String::from_utf8_lossy(&buf)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_walked_to_the_end() {
        let body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\n\r\n";
        let mut pos = 0;
        let mut steps = 0;
        loop {
            match chunk_step(body, pos).unwrap() {
                Some(Step::Next(p)) => {
                    pos = p;
                    steps += 1;
                }
                Some(Step::Done) => break,
                None => panic!("complete body reported incomplete at {pos}"),
            }
        }
        assert_eq!(steps, 2);
        assert!(chunk_step(&body[..8], 0).unwrap().is_none());
    }
}
