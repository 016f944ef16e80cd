//! The worker process: accepts the gateway on a Unix socket, opens sealed keys, calls
//! providers, and streams their answers back.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use keyward_core::Provider;
use keyward_crypto::{Binding, CryptoError, Keyring, SealedKey};
use keyward_providers::{answer_header_kept, key_placement, path_allowed, request_header_allowed, HttpMethod};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_rustls::rustls::ClientConfig;

use crate::http1::{HttpError, Upstream};
use crate::locked::{LockedPool, PAGE};
use crate::sandbox;
use crate::scrub::{mask_in_place, EchoMasker};
use keyward_core::KeyBinding;
use keyward_worker_protocol::protocol::{read_frame, CallRequest, FailKind, FromWorker, Method, ToWorker};

/// What the worker needs, handed over by the binary before the environment is cleared.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub socket: PathBuf,
    pub base_urls: Vec<(Provider, String)>,
    pub connect_timeout: Duration,
    pub threads: usize,
    /// Paths the KEK backend still reads after start-up (a PKCS#11 module's state), added
    /// read-only to the sandbox's list.
    pub extra_read_only: Vec<PathBuf>,
    /// The only peer uid accepted (a gateway running as another OS user, or a worker run as
    /// its own service). `None`: only the parent process, as this worker's own user.
    pub gateway_uid: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("socket {path}: {reason}")]
    Socket { path: String, reason: String },
    #[error("sandbox: {0}")]
    Sandbox(#[from] sandbox::SandboxError),
    #[error("{0}")]
    Setup(String),
}

/// Waits before each further attempt when the KEK backend fails: three tries within 0.35 s.
const KEK_RETRY_DELAYS: [Duration; 2] = [Duration::from_millis(50), Duration::from_millis(300)];

mod rewrap;

struct Worker {
    opener: Keyring,
    upstreams: Vec<(Provider, Arc<Upstream>)>,
    pages: LockedPool,
}

/// Runs the worker until the gateway goes away. `opener` (every live KEK version) was
/// loaded by the caller (it is the only thing read from disk); everything after the
/// sandbox is in memory.
pub fn run(config: WorkerConfig, opener: Keyring) -> Result<(), WorkerError> {
    sandbox::install_panic_hook();
    let socket_err = |e: std::io::Error| WorkerError::Socket {
        path: config.socket.display().to_string(),
        reason: e.to_string(),
    };
    let _ = std::fs::remove_file(&config.socket);
    let listener = std::os::unix::net::UnixListener::bind(&config.socket).map_err(socket_err)?;
    // A gateway of another user must be able to connect: the socket is open to all, and
    // the peer check below (SO_PEERCRED, set by the kernel) is what lets only it in.
    let mode = if config.gateway_uid.is_some() { 0o666 } else { 0o600 };
    std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(mode)).map_err(socket_err)?;
    listener.set_nonblocking(true).map_err(socket_err)?;

    let tls = Arc::new(
        ClientConfig::builder_with_provider(Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| WorkerError::Setup(e.to_string()))?
            .with_root_certificates(tokio_rustls::rustls::RootCertStore::from_iter(
                webpki_roots::TLS_SERVER_ROOTS.iter().cloned(),
            ))
            .with_no_client_auth(),
    );
    let mut upstreams = Vec::new();
    for (p, url) in &config.base_urls {
        let up =
            Upstream::new(url, tls.clone(), config.connect_timeout).map_err(|e| WorkerError::Setup(e.to_string()))?;
        upstreams.push((*p, Arc::new(up)));
    }

    sandbox::clear_env();
    let extra: Vec<String> = config.extra_read_only.iter().map(|p| p.display().to_string()).collect();
    let read_only: Vec<&str> = sandbox::READ_ONLY
        .iter()
        .copied()
        .chain(extra.iter().map(String::as_str))
        .collect();
    let status = sandbox::apply(&read_only)?;
    tracing::info!(
        landlock = status.landlock,
        allowed_syscalls = sandbox::allow_list_size(),
        pid = std::process::id(),
        "worker sandboxed"
    );

    let worker = Arc::new(Worker {
        opener,
        upstreams,
        pages: LockedPool::default(),
    });
    // One thread (the default): a current-thread runtime, so that accepting, opening,
    // calling and relaying never hand a task to another thread (no wake-ups across threads
    // on the hot path). More threads: a multi-thread runtime.
    let runtime = if config.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads)
            .enable_all()
            .build()
    }
    .map_err(|e| WorkerError::Setup(e.to_string()))?;
    runtime.block_on(async move {
        let listener = UnixListener::from_std(listener).map_err(socket_err)?;
        let parent = rustix::process::getppid();
        let uid = rustix::process::getuid();
        let gateway_uid = config.gateway_uid;
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            };
            // The trust boundary: only the configured gateway uid; without one, only our
            // parent (the gateway that started us), as our user.
            let cred = stream.peer_cred().ok();
            let allowed = cred.is_some_and(|c| match gateway_uid {
                Some(gateway) => c.uid() == gateway,
                None => {
                    c.uid() == uid.as_raw()
                        && c.pid()
                            .is_some_and(|p| Some(p) == parent.map(|pp| pp.as_raw_nonzero().get()))
                }
            });
            if !allowed {
                let (peer_uid, peer_pid) = cred.map_or((None, None), |c| (Some(c.uid()), c.pid()));
                match gateway_uid {
                    Some(gateway) => tracing::warn!(
                        ?peer_uid,
                        ?peer_pid,
                        gateway_uid = gateway,
                        "refused a connection: only the gateway's uid may connect (KEYWARD_WORKER_GATEWAY_USER)"
                    ),
                    None => tracing::warn!(
                        ?peer_uid,
                        ?peer_pid,
                        "refused a connection from a process that is not the gateway"
                    ),
                }
                continue;
            }
            let worker = worker.clone();
            tokio::spawn(async move { worker.serve_connection(stream).await });
        }
    })
}

impl Worker {
    async fn serve_connection(&self, stream: UnixStream) {
        let mut stream = GatewayConn::new(stream);
        let mut buf = Vec::with_capacity(4096);
        loop {
            match read_frame(&mut stream.io, &mut buf).await {
                Ok(Some(())) => {}
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "connection closed");
                    return;
                }
            }
            let request = ToWorker::decode(&buf);
            buf.clear();
            let result = match request {
                Ok(ToWorker::Ping) => stream.send(&FromWorker::Pong).await,
                Ok(ToWorker::OpenOnly(o)) => {
                    let answer = match self.open(o.request_id, &o.binding, &o.blob).await {
                        Ok(_page) => FromWorker::End,
                        Err(f) => f,
                    };
                    stream.send(&answer).await
                }
                Ok(ToWorker::Call(c)) => self.call(c, &mut stream).await,
                Ok(ToWorker::Rewrap(r)) => {
                    let answer = self.rewrap(&r).await;
                    stream.send(&answer).await
                }
                Err(e) => {
                    // A peer that speaks garbage gets one answer and is dropped.
                    let _ = stream
                        .send(&fail(FailKind::BadRequest, &format!("bad frame: {e}")))
                        .await;
                    return;
                }
            };
            if result.is_err() {
                return;
            }
        }
    }

    /// Opens the blob into a locked page. A KEK backend that fails (HSM, KMS: not this
    /// blob's fault) is tried again after [`KEK_RETRY_DELAYS`], then reported as
    /// [`FailKind::KekUnavailable`]; any other failure is final at once. No fallback.
    async fn open(
        &self,
        request_id: u64,
        binding: &KeyBinding,
        blob: &[u8],
    ) -> Result<crate::locked::PooledBuf<'_>, FromWorker> {
        let mut page = self
            .pages
            .take()
            .map_err(|e| fail(FailKind::Internal, &format!("locked memory: {e}")))?;
        let binding = Binding {
            account_id: binding.owner.as_str(),
            provider: binding.provider.as_str(),
            key_id: binding.key_id.as_str(),
        };
        let blob = SealedKey::from_bytes(blob.to_vec());
        let mut delays = KEK_RETRY_DELAYS.iter();
        let n = loop {
            match self.opener.open_into(&binding, &blob, page.page_mut()).await {
                Ok(n) => break n,
                Err(e @ CryptoError::Backend { .. }) => match delays.next() {
                    Some(delay) => {
                        tracing::debug!(request_id, error = %e, "KEK backend failed; retrying");
                        tokio::time::sleep(*delay).await;
                    }
                    None => {
                        return Err(fail(
                            FailKind::KekUnavailable,
                            &format!("the key-encryption backend is not answering: {e}"),
                        ))
                    }
                },
                Err(e) => {
                    return Err(fail(
                        FailKind::OpenFailed,
                        &format!("the sealed key could not be opened: {e}"),
                    ))
                }
            }
        };
        page.set_len(n);
        Ok(page)
    }

    async fn call(&self, c: CallRequest, stream: &mut GatewayConn) -> std::io::Result<()> {
        let started = std::time::Instant::now();
        let request_id = c.request_id;
        let outcome = self.call_inner(c, stream).await;
        tracing::debug!(
            request_id,
            micros = started.elapsed().as_micros() as u64,
            ok = outcome.is_ok(),
            "call"
        );
        match outcome {
            Ok(()) => Ok(()),
            Err(CallError::Gateway(e)) => Err(e),
            Err(CallError::Fail(f)) => stream.send(&f).await,
        }
    }

    async fn call_inner(&self, c: CallRequest, stream: &mut GatewayConn) -> Result<(), CallError> {
        let provider = c.binding.provider;
        let method = match c.method {
            Method::Get => HttpMethod::Get,
            Method::Post => HttpMethod::Post,
        };
        if !path_allowed(provider, method, &c.path_and_query) {
            return Err(fail(
                FailKind::PathRefused,
                "this path is not a provider route keyward may call",
            )
            .into());
        }
        // The gateway's headers are checked again here: the worker trusts nothing it is sent.
        for (name, value) in &c.headers {
            let ok = request_header_allowed(name) && !value.bytes().any(|b| b == b'\r' || b == b'\n');
            if !ok {
                return Err(fail(FailKind::BadRequest, "a request header is not allowed").into());
            }
        }
        let upstream = self
            .upstreams
            .iter()
            .find(|(p, _)| *p == provider)
            .map(|(_, u)| u.clone())
            .ok_or_else(|| fail(FailKind::Internal, "no base URL for this provider"))?;
        let timeout = Duration::from_millis(u64::from(c.timeout_ms.clamp(100, 600_000)));

        let key = self.open(c.request_id, &c.binding, &c.blob).await?;
        if key.as_slice().iter().any(|b| !b.is_ascii_graphic()) {
            return Err(fail(FailKind::OpenFailed, "the opened key is not a valid header value").into());
        }
        // The request head, key included, is built in a second locked page and wiped as
        // soon as it is written.
        let mut head = self
            .pages
            .take()
            .map_err(|e| fail(FailKind::Internal, &format!("locked memory: {e}")))?;
        let placement = key_placement(provider);
        let len = {
            let mut w = PageWriter {
                page: head.page_mut(),
                at: 0,
            };
            let verb: &[u8] = match method {
                HttpMethod::Get => b"GET ",
                HttpMethod::Post => b"POST ",
            };
            w.put(verb);
            w.put(upstream.prefix().as_bytes());
            w.put(c.path_and_query.as_bytes());
            w.put(b" HTTP/1.1\r\nhost: ");
            w.put(upstream.host_header().as_bytes());
            w.put(b"\r\ncontent-length: ");
            w.put(c.body.len().to_string().as_bytes());
            w.put(b"\r\n");
            for (name, value) in &c.headers {
                w.put(name.as_bytes());
                w.put(b": ");
                w.put(value.as_bytes());
                w.put(b"\r\n");
            }
            w.put(placement.header.as_bytes());
            w.put(b": ");
            w.put(placement.value_prefix.as_bytes());
            w.put(key.as_slice());
            w.put(b"\r\n\r\n");
            w.finish()
                .ok_or_else(|| fail(FailKind::BadRequest, "request head too large"))?
        };
        head.set_len(len);
        let sent = upstream.send(head.as_slice(), &c.body, timeout).await;
        drop(head);
        let mut response = sent.map_err(|e| http_fail(&e))?;

        let key_bytes = key.as_slice();
        let headers: Vec<(String, String)> = response
            .headers
            .iter()
            .filter(|(k, _)| answer_header_kept(k))
            .map(|(k, v)| {
                let mut v = v.clone().into_bytes();
                mask_in_place(&mut v, key_bytes);
                (k.clone(), String::from_utf8_lossy(&v).into_owned())
            })
            .collect();
        stream.queue(&FromWorker::Head {
            status: response.status,
            headers,
        })?;
        let mut scrubber = EchoMasker::new(key_bytes, response.status >= 300);
        loop {
            // Whatever is queued goes out before waiting on the provider, so a stream passes
            // through as it arrives; a body already here joins the head in the same write.
            let next = {
                let next = response.next_chunk();
                tokio::pin!(next);
                match std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await {
                    Poll::Ready(r) => r,
                    Poll::Pending => {
                        stream.flush().await.map_err(CallError::Gateway)?;
                        next.await
                    }
                }
            };
            match next {
                Ok(Some(chunk)) => {
                    let safe = scrubber.feed(&chunk);
                    if !safe.is_empty() {
                        stream.queue(&FromWorker::Chunk(safe))?;
                    }
                    // A provider faster than the gateway still never piles up here.
                    if stream.out.len() >= FLUSH_AT {
                        stream.flush().await.map_err(CallError::Gateway)?;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let rest = scrubber.finish();
                    if !rest.is_empty() {
                        stream.queue(&FromWorker::Chunk(rest))?;
                    }
                    return Err(http_fail(&e).into());
                }
            }
        }
        let rest = scrubber.finish();
        if !rest.is_empty() {
            stream.queue(&FromWorker::Chunk(rest))?;
        }
        drop(key);
        stream.send(&FromWorker::End).await.map_err(CallError::Gateway)
    }
}

/// The worker's side of one gateway connection. Frames are queued and written together:
/// an answer that is complete when it arrives (head, body, end) costs one write and one
/// wake-up of the gateway instead of three. The caller flushes before anything that may
/// wait, so nothing queued is ever held back behind a slow provider.
/// Queued bytes that are written at once even when more of the answer is ready.
const FLUSH_AT: usize = 64 * 1024;

struct GatewayConn {
    io: BufReader<UnixStream>,
    out: Vec<u8>,
}

impl GatewayConn {
    fn new(stream: UnixStream) -> GatewayConn {
        GatewayConn {
            io: BufReader::new(stream),
            out: Vec::with_capacity(4096),
        }
    }

    fn queue(&mut self, msg: &FromWorker) -> Result<(), CallError> {
        self.push(msg)
            .map_err(|e| fail(FailKind::Internal, &format!("encode: {e}")).into())
    }

    fn push(&mut self, msg: &FromWorker) -> Result<(), keyward_worker_protocol::protocol::ProtocolError> {
        self.out.extend_from_slice(&msg.encode()?);
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let written = self.io.get_mut().write_all(&self.out).await;
        self.out.clear();
        written
    }

    /// Queues `msg` and writes everything queued.
    async fn send(&mut self, msg: &FromWorker) -> std::io::Result<()> {
        self.push(msg).map_err(std::io::Error::other)?;
        self.flush().await
    }
}

/// Fills a locked page without reallocating; `finish` is None if it overflowed.
struct PageWriter<'a> {
    page: &'a mut [u8],
    at: usize,
}

impl PageWriter<'_> {
    fn put(&mut self, bytes: &[u8]) {
        if let Some(slot) = self.page.get_mut(self.at..self.at + bytes.len()) {
            slot.copy_from_slice(bytes);
            self.at += bytes.len();
        } else {
            self.at = PAGE + 1;
        }
    }
    fn finish(self) -> Option<usize> {
        (self.at <= PAGE).then_some(self.at)
    }
}

enum CallError {
    /// The gateway's socket failed: nothing more can be sent.
    Gateway(std::io::Error),
    Fail(FromWorker),
}

impl From<FromWorker> for CallError {
    fn from(f: FromWorker) -> Self {
        CallError::Fail(f)
    }
}

fn fail(kind: FailKind, message: &str) -> FromWorker {
    FromWorker::Fail {
        kind,
        message: message.to_owned(),
    }
}

fn http_fail(e: &HttpError) -> FromWorker {
    let kind = match e {
        HttpError::Connect(_) => FailKind::Connect,
        HttpError::Timeout(_) => FailKind::Timeout,
        HttpError::Io(_) => FailKind::Io,
        HttpError::Protocol(_) => FailKind::UpstreamProtocol,
        HttpError::BaseUrl(_) => FailKind::Internal,
    };
    fail(kind, &e.to_string())
}
