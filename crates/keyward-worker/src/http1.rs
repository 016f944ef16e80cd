//! A minimal HTTP/1.1 client for the worker's calls to providers.
//!
//! Why not a general HTTP client: the request head carries the key, and a general client
//! copies headers into buffers it owns and keeps (header maps, connection write buffers),
//! out of reach of any wiping. Here the head is written straight from a locked page the
//! caller wipes, and the read buffer is zeroed after every exchange. It also keeps the
//! rules of the worker simple and visible: no redirects are ever followed (a 3xx is just
//! an answer), every wait has a timeout, and connections are kept alive and reused.
//!
//! A request is sent at most once. A provider may act on a request it has read (a POST
//! costs money and may have effects), so a request is tried again only when not one byte
//! of it reached the socket: a kept-alive connection found closed before writing (the
//! check in [`Upstream::send`]), or a write that failed before the kernel took a byte (the
//! socket's own count, [`Counted`]). Once a byte is written, any failure is the caller's
//! error, never a second attempt.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

const MAX_HEAD: usize = 64 * 1024;
/// The answer buffer's first size: a whole non-streaming answer of the usual size fits.
const READ_CHUNK: usize = 4 * 1024;

/// A connection to a provider, plain or TLS, that can tell how many bytes it has written
/// to its socket so far.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {
    /// Bytes the kernel has accepted on the TCP socket (TLS records included).
    fn socket_bytes_written(&self) -> u64;
}

impl Io for Counted {
    fn socket_bytes_written(&self) -> u64 {
        self.written
    }
}

impl Io for TlsStream<Counted> {
    fn socket_bytes_written(&self) -> u64 {
        self.get_ref().0.written
    }
}

type Conn = Box<dyn Io>;

/// A TCP stream that counts the bytes its writes hand to the kernel. Under TLS it sits
/// below rustls, so it counts what reached the socket, not what rustls buffered.
struct Counted {
    tcp: TcpStream,
    written: u64,
}

impl Counted {
    fn note(&mut self, r: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = &r {
            self.written += *n as u64;
        }
        r
    }
}

impl AsyncRead for Counted {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_write(cx, buf);
        this.note(r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.note(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Whether an idle kept-alive connection can still take a request: nothing to read yet.
/// End of stream (the provider closed it while idle), an error, or unasked-for bytes (a
/// provider's `408` before closing) each mean it must not be used; nothing was written to
/// it, so a fresh connection is taken instead.
async fn still_open(conn: &mut Conn) -> bool {
    let mut byte = [0u8; 1];
    std::future::poll_fn(|cx| {
        let mut buf = ReadBuf::new(&mut byte);
        match Pin::new(&mut *conn).poll_read(cx, &mut buf) {
            Poll::Pending => Poll::Ready(true),
            Poll::Ready(_) => Poll::Ready(false),
        }
    })
    .await
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("could not connect to the provider: {0}")]
    Connect(String),
    #[error("the provider did not answer within {0} ms")]
    Timeout(u64),
    #[error("connection to the provider failed: {0}")]
    Io(String),
    #[error("the provider's answer is not valid HTTP: {0}")]
    Protocol(&'static str),
    #[error("bad base URL: {0}")]
    BaseUrl(String),
}

/// One provider endpoint (scheme, host, port, path prefix) and its idle connections.
pub struct Upstream {
    host: String,
    port: u16,
    host_header: String,
    prefix: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    idle: Mutex<Vec<Conn>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Upstream({}:{})", self.host, self.port)
    }
}

impl Upstream {
    /// `base_url` is `http(s)://host[:port][/prefix]`.
    pub fn new(base_url: &str, tls: Arc<ClientConfig>, connect_timeout: Duration) -> Result<Upstream, HttpError> {
        let bad = || HttpError::BaseUrl(base_url.to_owned());
        let (is_tls, rest) = if let Some(r) = base_url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = base_url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad());
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (
                rest.get(..i).ok_or_else(bad)?,
                rest.get(i..).ok_or_else(bad)?.trim_end_matches('/'),
            ),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(bad());
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse::<u16>().map_err(|_| bad())?),
            _ => (authority, if is_tls { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let tls = if is_tls {
            let name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
            Some((TlsConnector::from(tls), name))
        } else {
            None
        };
        Ok(Upstream {
            host_header: authority.to_owned(),
            host,
            port,
            prefix: prefix.to_owned(),
            tls,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    pub fn host_header(&self) -> &str {
        &self.host_header
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn connect(&self) -> Result<Conn, HttpError> {
        let ms = u64::try_from(self.connect_timeout.as_millis()).unwrap_or(u64::MAX);
        let tcp = timeout(
            self.connect_timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| HttpError::Timeout(ms))?
        .map_err(|e| HttpError::Connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let tcp = Counted { tcp, written: 0 };
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some((connector, name)) => {
                let tls = timeout(self.connect_timeout, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| HttpError::Timeout(ms))?
                    .map_err(|e| HttpError::Connect(format!("TLS: {e}")))?;
                Ok(Box::new(tls))
            }
        }
    }

    fn checkout(&self) -> Option<Conn> {
        self.idle.lock().ok().and_then(|mut v| v.pop())
    }

    fn checkin(&self, c: Conn) {
        if let Ok(mut v) = self.idle.lock() {
            if v.len() < 64 {
                v.push(c);
            }
        }
    }

    /// Sends `head` (the request line and headers, written from the caller's locked page)
    /// and `body`, and reads the response head. `wait` bounds the time to the response
    /// head and each later pause.
    ///
    /// The request goes out once: an idle connection the provider closed is dropped before
    /// anything is written to it, and a write that fails before a single byte reached the
    /// socket moves on to another connection; after that, every failure is returned.
    pub async fn send(self: &Arc<Self>, head: &[u8], body: &[u8], wait: Duration) -> Result<Response, HttpError> {
        while let Some(mut conn) = self.checkout() {
            if !still_open(&mut conn).await {
                continue;
            }
            match self.exchange(conn, head, body, wait).await {
                Ok(r) => return Ok(r),
                Err(Attempt::NothingSent(_)) => {}
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        let conn = self.connect().await?;
        match self.exchange(conn, head, body, wait).await {
            Ok(r) => Ok(r),
            Err(Attempt::NothingSent(e) | Attempt::Failed(e)) => Err(e),
        }
    }

    async fn exchange(
        self: &Arc<Self>,
        mut conn: Conn,
        head: &[u8],
        body: &[u8],
        wait: Duration,
    ) -> Result<Response, Attempt> {
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let before = conn.socket_bytes_written();
        let write = async {
            write_all_two(&mut conn, head, body).await?;
            conn.flush().await
        };
        match timeout(wait, write).await {
            Err(_) => return Err(Attempt::Failed(HttpError::Timeout(ms))),
            Ok(Err(e)) if conn.socket_bytes_written() == before => {
                return Err(Attempt::NothingSent(HttpError::Io(e.to_string())))
            }
            Ok(Err(e)) => {
                return Err(Attempt::Failed(HttpError::Io(format!(
                    "{e} while sending the request; not sent again, as the provider may have read part of it"
                ))))
            }
            Ok(Ok(())) => {}
        }
        let mut reader = Reader {
            conn,
            buf: Zeroizing::new(Vec::with_capacity(READ_CHUNK)),
            start: 0,
            wait,
        };
        loop {
            let got = reader.fill_head().await;
            if let Err(e) = got {
                return Err(Attempt::Failed(match e {
                    // The whole request was written: the provider may have read and acted on it.
                    HttpError::Io(why) if reader.buf.is_empty() => HttpError::Io(format!(
                        "the provider closed the connection after the request was sent, without answering ({why}); \
                         not sent again, as the provider may have acted on it"
                    )),
                    e => e,
                }));
            }
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut headers);
            let status = parsed.parse(&reader.buf);
            let len = match status {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => {
                    if reader.buf.len() > MAX_HEAD {
                        return Err(Attempt::Failed(HttpError::Protocol("response head too large")));
                    }
                    if reader.read_more().await.map_err(Attempt::Failed)? == 0 {
                        return Err(Attempt::Failed(HttpError::Protocol(
                            "connection closed inside the response head",
                        )));
                    }
                    continue;
                }
                Err(_) => return Err(Attempt::Failed(HttpError::Protocol("unparseable response head"))),
            };
            let code = parsed.code.unwrap_or(0);
            let mut out_headers = Vec::with_capacity(parsed.headers.len());
            let mut chunked = false;
            let mut length: Option<u64> = None;
            let mut close = parsed.version == Some(0);
            for h in parsed.headers.iter() {
                let value = String::from_utf8_lossy(h.value).into_owned();
                if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.to_ascii_lowercase().contains("chunked");
                } else if h.name.eq_ignore_ascii_case("content-length") {
                    length = Some(
                        value
                            .trim()
                            .parse()
                            .map_err(|_| Attempt::Failed(HttpError::Protocol("bad content-length")))?,
                    );
                } else if h.name.eq_ignore_ascii_case("connection") {
                    close = value.to_ascii_lowercase().contains("close");
                }
                out_headers.push((h.name.to_ascii_lowercase(), value));
            }
            reader.start = len;
            if (100..200).contains(&code) {
                // Interim answer (100 Continue): drop it and read the real head.
                reader.buf.drain(..len);
                reader.start = 0;
                continue;
            }
            let body = if code == 204 || code == 304 {
                Body::Length(0)
            } else if chunked {
                Body::Chunked(ChunkState::Size)
            } else if let Some(n) = length {
                Body::Length(n)
            } else {
                close = true;
                Body::UntilClose
            };
            return Ok(Response {
                status: code,
                headers: out_headers,
                reader: Some(reader),
                body,
                reusable: !close,
                upstream: Arc::clone(self),
            });
        }
    }
}

enum Attempt {
    /// The connection failed before one byte of the request reached its socket: the
    /// provider cannot have seen it, so another connection may carry it.
    NothingSent(HttpError),
    /// Anything else, including every failure after the first byte was written.
    Failed(HttpError),
}

struct Reader {
    conn: Conn,
    /// Everything read and not yet handed out, from `start`. Zeroed when dropped.
    buf: Zeroizing<Vec<u8>>,
    start: usize,
    wait: Duration,
}

impl Reader {
    /// Reads more bytes, compacting what was handed out. Returns 0 at EOF.
    ///
    /// Reads go into the buffer's spare capacity (no zero-fill first); a buffer too full to
    /// read into is replaced by one twice its size, and the old one is zeroed as it drops.
    /// So no bytes of an answer are left behind in freed memory, and an answer that fits in
    /// the first `READ_CHUNK` costs one wipe of it, when the reader drops.
    async fn read_more(&mut self) -> Result<usize, HttpError> {
        if self.start > 0 {
            let start = self.start;
            self.buf.drain(..start);
            self.start = 0;
        }
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 2 {
            let mut bigger = Zeroizing::new(Vec::with_capacity((self.buf.capacity() * 2).max(READ_CHUNK)));
            bigger.extend_from_slice(&self.buf);
            self.buf = bigger;
        }
        let ms = u64::try_from(self.wait.as_millis()).unwrap_or(u64::MAX);
        match timeout(self.wait, self.conn.read_buf(&mut *self.buf)).await {
            Err(_) => Err(HttpError::Timeout(ms)),
            Ok(Err(e)) => Err(HttpError::Io(e.to_string())),
            Ok(Ok(n)) => Ok(n),
        }
    }

    async fn fill_head(&mut self) -> Result<usize, HttpError> {
        if self.buf.len() > self.start {
            return Ok(self.buf.len() - self.start);
        }
        match self.read_more().await? {
            0 => Err(HttpError::Io("connection closed".into())),
            n => Ok(n),
        }
    }

    fn buffered(&self) -> &[u8] {
        self.buf.get(self.start..).unwrap_or_default()
    }

    /// Takes up to `n` buffered bytes.
    fn take(&mut self, n: usize) -> Zeroizing<Vec<u8>> {
        let avail = self.buffered();
        let n = n.min(avail.len());
        let out = Zeroizing::new(avail.get(..n).unwrap_or_default().to_vec());
        self.start += n;
        out
    }

    /// A CRLF-terminated line from the buffer, reading more as needed.
    async fn line(&mut self) -> Result<Zeroizing<Vec<u8>>, HttpError> {
        loop {
            if let Some(i) = self.buffered().windows(2).position(|w| w == b"\r\n") {
                let line = self.take(i);
                self.start += 2;
                return Ok(line);
            }
            if self.buffered().len() > 4096 {
                return Err(HttpError::Protocol("chunk header line too long"));
            }
            if self.read_more().await? == 0 {
                return Err(HttpError::Io("connection closed inside a chunk header".into()));
            }
        }
    }
}

enum ChunkState {
    Size,
    Data(u64),
    Done,
}

enum Body {
    Length(u64),
    Chunked(ChunkState),
    UntilClose,
}

/// A response whose body is read chunk by chunk as it arrives.
pub struct Response {
    pub status: u16,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    reader: Option<Reader>,
    body: Body,
    reusable: bool,
    upstream: Arc<Upstream>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Response({})", self.status)
    }
}

impl Response {
    /// The next piece of the body as it arrives; `None` at its end. On a clean end the
    /// connection goes back to the pool.
    pub async fn next_chunk(&mut self) -> Result<Option<Zeroizing<Vec<u8>>>, HttpError> {
        let Some(reader) = self.reader.as_mut() else {
            return Ok(None);
        };
        let out = match &mut self.body {
            Body::Length(0) => None,
            Body::Length(left) => {
                if reader.buffered().is_empty() && reader.read_more().await? == 0 {
                    return Err(HttpError::Io("connection closed before the end of the body".into()));
                }
                let piece = reader.take(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= piece.len() as u64;
                Some(piece)
            }
            Body::UntilClose => {
                if reader.buffered().is_empty() && reader.read_more().await? == 0 {
                    None
                } else {
                    Some(reader.take(usize::MAX))
                }
            }
            Body::Chunked(state) => loop {
                match state {
                    ChunkState::Done => break None,
                    ChunkState::Size => {
                        let line = reader.line().await?;
                        let text = std::str::from_utf8(&line).map_err(|_| HttpError::Protocol("bad chunk size"))?;
                        let hex = text.split(';').next().unwrap_or("").trim();
                        let size = u64::from_str_radix(hex, 16).map_err(|_| HttpError::Protocol("bad chunk size"))?;
                        if size == 0 {
                            // Trailers, up to the empty line.
                            while !reader.line().await?.is_empty() {}
                            *state = ChunkState::Done;
                        } else {
                            *state = ChunkState::Data(size);
                        }
                    }
                    ChunkState::Data(left) => {
                        if reader.buffered().is_empty() && reader.read_more().await? == 0 {
                            return Err(HttpError::Io("connection closed inside a chunk".into()));
                        }
                        let piece = reader.take(usize::try_from(*left).unwrap_or(usize::MAX));
                        *left -= piece.len() as u64;
                        if *left == 0 {
                            if !reader.line().await?.is_empty() {
                                return Err(HttpError::Protocol("chunk not followed by CRLF"));
                            }
                            *state = ChunkState::Size;
                        }
                        if !piece.is_empty() {
                            break Some(piece);
                        }
                    }
                }
            },
        };
        if out.is_none() {
            self.finish();
        }
        Ok(out)
    }

    fn finish(&mut self) {
        if let Some(reader) = self.reader.take() {
            // Anything left over (pipelined junk) means the connection cannot be trusted.
            if self.reusable && reader.buffered().is_empty() {
                let Reader { conn, buf, .. } = reader;
                drop(buf);
                self.upstream.checkin(conn);
            }
        }
    }
}

/// Writes `head` then `body` as one vectored write where the stream allows: one segment
/// on the wire, so the provider reads the whole request in one wake-up instead of two.
async fn write_all_two(conn: &mut Conn, head: &[u8], body: &[u8]) -> std::io::Result<()> {
    let (mut head, mut body) = (head, body);
    while !head.is_empty() || !body.is_empty() {
        let n = conn
            .write_vectored(&[std::io::IoSlice::new(head), std::io::IoSlice::new(body)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = head.get(from_head..).unwrap_or_default();
        body = body.get(n - from_head..).unwrap_or_default();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    fn tls() -> Arc<ClientConfig> {
        Arc::new(
            ClientConfig::builder_with_provider(Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(tokio_rustls::rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
    }

    /// A server that answers each connection's requests with the given raw responses.
    async fn server(responses: Vec<&'static [u8]>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            for r in responses {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await.unwrap();
                s.write_all(r).await.unwrap();
            }
        });
        format!("http://{addr}")
    }

    /// An empty POST through `up`, which must get an answer.
    async fn empty_post(up: &Arc<Upstream>) -> Response {
        up.send(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            b"",
            Duration::from_secs(2),
        )
        .await
        .unwrap()
    }

    async fn body_of(r: &mut Response) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(c) = r.next_chunk().await.unwrap() {
            out.extend_from_slice(&c);
        }
        out
    }

    #[tokio::test]
    async fn content_length_then_chunked_on_one_kept_alive_connection() {
        let url = server(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Request-Id: r1\r\n\r\nhello",
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n",
        ])
        .await;
        let up = Arc::new(Upstream::new(&url, tls(), Duration::from_secs(2)).unwrap());
        let mut r = empty_post(&up).await;
        assert_eq!(r.status, 200);
        assert!(r.headers.iter().any(|(k, v)| k == "x-request-id" && v == "r1"));
        assert_eq!(body_of(&mut r).await, b"hello");
        // Same connection again (the test server accepts only one).
        let mut r = empty_post(&up).await;
        assert_eq!(r.status, 201);
        assert_eq!(body_of(&mut r).await, b"abcde");
    }

    #[tokio::test]
    async fn answers_larger_than_the_first_buffer_arrive_whole() {
        // A ~20 KiB head and a 300 KiB body: the answer buffer (4 KiB at first) grows
        // several times and compacts what it has handed out, and no byte is lost or reordered.
        let body: Vec<u8> = (0..300 * 1024).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..40 {
            raw.extend_from_slice(format!("X-Pad-{i}: {}\r\n", "p".repeat(500)).as_bytes());
        }
        raw.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        raw.extend_from_slice(&body);
        let url = server(vec![Box::leak(raw.into_boxed_slice())]).await;
        let up = Arc::new(Upstream::new(&url, tls(), Duration::from_secs(2)).unwrap());
        let mut r = empty_post(&up).await;
        assert_eq!(r.status, 200);
        let pads: Vec<_> = r.headers.iter().filter(|(k, _)| k.starts_with("x-pad-")).collect();
        assert_eq!(pads.len(), 40);
        assert!(pads.iter().all(|(_, v)| v.len() == 500));
        assert!(body_of(&mut r).await == body, "the body arrived changed");
    }

    #[tokio::test]
    async fn redirects_are_answers_not_followed() {
        let url = server(vec![
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://evil.example/\r\nContent-Length: 0\r\n\r\n",
        ])
        .await;
        let up = Arc::new(Upstream::new(&url, tls(), Duration::from_secs(2)).unwrap());
        let mut r = empty_post(&up).await;
        assert_eq!(r.status, 307);
        assert!(body_of(&mut r).await.is_empty());
    }

    #[tokio::test]
    async fn a_stalled_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let up = Arc::new(Upstream::new(&format!("http://{addr}"), tls(), Duration::from_secs(2)).unwrap());
        let err = up
            .send(b"POST / HTTP/1.1\r\n\r\n", b"", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Timeout(200)), "{err}");
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error() {
        let url = server(vec![b"NOT HTTP AT ALL\r\n\r\n"]).await;
        let up = Arc::new(Upstream::new(&url, tls(), Duration::from_secs(2)).unwrap());
        let err = up
            .send(b"POST / HTTP/1.1\r\n\r\n", b"", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Protocol(_)), "{err}");
    }

    /// What the next request on a connection gets from [`counting_server`].
    #[derive(Clone, Copy)]
    enum Then {
        /// `200` with a short body, connection kept alive.
        Answer,
        /// Nothing: the server closes the connection (having read the whole request).
        Close,
        /// `200`, then the server closes the connection while it is idle.
        AnswerThenClose,
    }

    /// Reads one whole request (head and `Content-Length` body) from `s`; `None` at EOF.
    async fn read_request(s: &mut TcpStream) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + len {
                    return Some(buf);
                }
            }
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A loopback provider that reads every request whole and counts them (per body, so a
    /// request sent twice is counted twice); connection `i` treats its requests as
    /// `plans[i]` says, later connections answer everything. Returns the base URL, the
    /// bodies read, and the number of connections accepted.
    async fn counting_server(plans: Vec<Vec<Then>>) -> (String, Arc<Mutex<Vec<String>>>, Arc<Mutex<usize>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(Mutex::new(0usize));
        let (seen2, conns2) = (seen.clone(), conns.clone());
        tokio::spawn(async move {
            let mut plans = plans.into_iter();
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                *conns2.lock().unwrap() += 1;
                let mut plan = plans.next().unwrap_or_default().into_iter();
                let seen = seen2.clone();
                tokio::spawn(async move {
                    while let Some(req) = read_request(&mut s).await {
                        let body = req.split(|b| *b == b'\n').next_back().unwrap_or_default().to_vec();
                        seen.lock().unwrap().push(String::from_utf8(body).unwrap());
                        match plan.next().unwrap_or(Then::Answer) {
                            Then::Answer => s
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                                .await
                                .unwrap(),
                            Then::Close => return,
                            Then::AnswerThenClose => {
                                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                                    .await
                                    .unwrap();
                                // Let the client take its answer and pool the connection first.
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        (format!("http://{addr}"), seen, conns)
    }

    async fn post(up: &Arc<Upstream>, body: &str) -> Result<Vec<u8>, HttpError> {
        let head = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
        let mut r = up
            .send(head.as_bytes(), body.as_bytes(), Duration::from_secs(2))
            .await?;
        Ok(body_of(&mut r).await)
    }

    #[tokio::test]
    async fn a_post_the_provider_read_before_closing_a_kept_alive_connection_is_sent_once() {
        // Connection 1 answers the first POST (so it is pooled and reused), then reads the
        // second whole and closes without a word. Any later connection would answer.
        let (url, seen, conns) = counting_server(vec![vec![Then::Answer, Then::Close]]).await;
        let up = Arc::new(Upstream::new(&url, tls(), Duration::from_secs(2)).unwrap());
        assert_eq!(post(&up, "first").await.unwrap(), b"ok");
        let err = post(&up, "second").await.unwrap_err();
        assert!(
            matches!(&err, HttpError::Io(m) if m.contains("without answering") && m.contains("not sent again")),
            "a clear error, not a retry: {err}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen.iter().filter(|b| *b == "second").count(),
            1,
            "the provider read the second POST once: {seen:?}"
        );
        assert_eq!(*conns.lock().unwrap(), 1, "no second connection was opened for it");
    }

    #[tokio::test]
    async fn a_kept_alive_connection_closed_while_idle_is_replaced_before_writing() {
        // Connection 1 answers, then the provider closes it while it sits in the pool: the
        // next call sees it closed before writing, takes a new connection, and succeeds.
        let (url, seen, conns) = counting_server(vec![vec![Then::AnswerThenClose]]).await;
        let up = Arc::new(Upstream::new(&url, tls(), Duration::from_secs(2)).unwrap());
        assert_eq!(post(&up, "first").await.unwrap(), b"ok");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(post(&up, "second").await.unwrap(), b"ok", "the call succeeds");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen, ["first", "second"], "each POST read once");
        assert_eq!(*conns.lock().unwrap(), 2, "a fresh connection carried the second");
    }

    #[tokio::test]
    async fn a_post_on_a_fresh_connection_closed_without_an_answer_is_not_retried() {
        let (url, seen, conns) = counting_server(vec![vec![Then::Close]]).await;
        let up = Arc::new(Upstream::new(&url, tls(), Duration::from_secs(2)).unwrap());
        let err = post(&up, "only").await.unwrap_err();
        assert!(
            matches!(&err, HttpError::Io(m) if m.contains("not sent again")),
            "{err}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(seen.lock().unwrap().clone(), ["only"]);
        assert_eq!(*conns.lock().unwrap(), 1);
    }

    #[test]
    fn base_urls_parse() {
        let up = Upstream::new("https://api.openai.com", tls(), Duration::from_secs(1)).unwrap();
        assert_eq!((up.host.as_str(), up.port, up.prefix()), ("api.openai.com", 443, ""));
        let up = Upstream::new("http://127.0.0.1:8080/proxy/", tls(), Duration::from_secs(1)).unwrap();
        assert_eq!(
            (up.host.as_str(), up.port, up.prefix(), up.host_header()),
            ("127.0.0.1", 8080, "/proxy", "127.0.0.1:8080")
        );
        assert!(Upstream::new("ftp://x", tls(), Duration::from_secs(1)).is_err());
        assert!(Upstream::new("http://user@host", tls(), Duration::from_secs(1)).is_err());
    }
}
