//! `keyward serve`: start-up, the first-start bootstrap (with its one-time login URL),
//! HTTP or HTTPS (rustls, TLS 1.2+), and graceful shutdown.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::admin;
use crate::app::router;
use crate::clock::{SharedClock, SystemClock};
use crate::config::Config;
use crate::engine::identity::hash_token;
use crate::engine::leases::{self, Leases};
use crate::engine::{Engine, EngineParts};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::purge::{self, PurgeHandle};
use crate::runtime::{load_sealer, open_stores, prepare_data_dir, RuntimeError};
use crate::state::{AppState, AppStateInner};
use crate::web::{ClientAddr, WebState};
use crate::workers::{WorkerCommand, WorkerPool};

/// A line for the operator on stdout (logs go to stderr).
pub fn announce(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "keyward: {line}");
    let _ = out.flush();
}

/// What a server that just started can tell its starter.
#[derive(Debug)]
pub struct Ready<'a> {
    /// `http://127.0.0.1:PORT` (or `https://…`).
    pub base_url: String,
    /// Set on the first start of an empty database.
    pub first_start: Option<FirstStartInfo<'a>>,
}

/// The first start's owner, account and one-time login URL.
pub struct FirstStartInfo<'a> {
    pub token: &'a str,
    pub account_id: String,
    pub login_url: String,
}

/// The token and the login code are secrets: `Debug` names neither.
impl std::fmt::Debug for FirstStartInfo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirstStartInfo")
            .field("account_id", &self.account_id)
            .finish_non_exhaustive()
    }
}

/// Called once the server listens (the demo prints its guide from it).
pub type OnReady = Box<dyn FnOnce(&Ready<'_>) + Send>;

/// What `keyward demo` adds to `serve`: a banner on every page and a hook called once the
/// server listens.
#[derive(Default)]
pub struct ServeExtras {
    pub banner: Option<String>,
    pub on_ready: Option<OnReady>,
    /// The data dir was prepared, and its files given to their owners, by the root-started
    /// `serve` before it dropped to the gateway user (`users.rs`): leave its modes alone.
    pub prepared_as_root: bool,
    /// The gateway's secret files, read while still root (they may be readable by root only).
    pub secrets: Option<Secrets>,
}

/// The files only the gateway reads, read before anything starts: the TLS certificate and
/// key, the webhook secrets, the single sign-on client secret. A bad file stops `serve`.
pub struct Secrets {
    tls: Option<TlsAcceptor>,
    webhook_endpoints: Vec<crate::webhooks::Endpoint>,
    oidc: Option<Arc<crate::web::oidc::Oidc>>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets").finish_non_exhaustive()
    }
}

impl Secrets {
    pub fn read(config: &Config) -> Result<Secrets, RuntimeError> {
        let tls = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
            _ => None,
        };
        // Checked before anything starts: a bad secrets file must stop `serve`, not its events.
        let webhook_endpoints =
            crate::webhooks::load_endpoints(&config.webhook).map_err(|e| RuntimeError::Other(e.to_string()))?;
        // Read (and the secret file's mode checked) before anything starts.
        let oidc = crate::web::oidc::Oidc::from_config(&config.oidc).map_err(|e| RuntimeError::Other(e.to_string()))?;
        Ok(Secrets {
            tls,
            webhook_endpoints,
            oidc,
        })
    }
}

impl std::fmt::Debug for ServeExtras {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeExtras")
            .field("banner", &self.banner)
            .finish_non_exhaustive()
    }
}

pub async fn serve(config: Config, worker: WorkerCommand) -> Result<(), RuntimeError> {
    serve_with(config, worker, ServeExtras::default()).await
}

pub async fn serve_with(config: Config, worker: WorkerCommand, mut extras: ServeExtras) -> Result<(), RuntimeError> {
    // Registered before anything else: a SIGTERM that lands while the workers start is
    // held until the server is up, and then ends it cleanly instead of killing it mid-way.
    let stop = ShutdownSignal::install()?;
    // Before anything secret is read; again after any change of user (main.rs).
    crate::process_guard::forbid_core_dumps_and_ptrace()?;
    // Workers this process starts run as its own user: refused unless allowed (`users.rs`).
    if config.worker.sockets.is_empty() {
        if !config.allow_same_user {
            let why = crate::users::same_user_refusal();
            tracing::error!("{why}");
            return Err(RuntimeError::Other(why));
        }
        tracing::warn!(
            uid = rustix::process::getuid().as_raw(),
            "KEYWARD_ALLOW_SAME_USER=1: the workers that open keys run as the gateway's own OS user; a gateway that is taken over could read the KEK's private half"
        );
    }
    let Secrets {
        tls,
        webhook_endpoints,
        oidc,
    } = match extras.secrets.take() {
        Some(read_as_root) => read_as_root,
        None => Secrets::read(&config)?,
    };
    if !extras.prepared_as_root {
        prepare_data_dir(&config)?;
    }
    // Read before the sealer and the workers: the watcher starts from what they loaded.
    let kek_state = crate::runtime::kek_backend(&config).observe().ok();
    let sealer = Arc::new(crate::kek::SealerCell::new(load_sealer(&config)?));
    let (store, kek_store) = open_stores(&config).await?;
    let clock: SharedClock = Arc::new(SystemClock);

    let listener =
        listen(config.listen).map_err(|e| RuntimeError::Other(format!("KEYWARD_LISTEN {}: {e}", config.listen)))?;
    let addr = listener.local_addr().map_err(|e| RuntimeError::Other(e.to_string()))?;
    // Said before the workers start: `kek retire` must see this node before it can seal.
    let reporter = Arc::new(tokio::sync::Mutex::new(crate::kek::SealerReporter::new(
        kek_store.clone(),
        clock.clone(),
        node_id(addr),
    )));
    reporter.lock().await.tick(&sealer).await;
    if tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "serving plain HTTP on a non-loopback address: keys pasted into keyward would cross the network unencrypted; set KEYWARD_TLS_CERT/KEYWARD_TLS_KEY or keep it on loopback behind a TLS proxy");
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut web = WebState::new(tls.is_some());
    web.banner = extras.banner;
    web.oidc = oidc;
    web.token_login_off = !config.token_login;
    let web = Arc::new(web);
    let base_url = format!("{scheme}://{}", url_host(addr));
    let mut first_start_info = None;

    let first = admin::first_start(store.as_ref(), clock.as_ref()).await?;
    if let Some(first) = &first {
        announce(&format!(
            "first start: created user {} and account Personal (plan pro)",
            admin::FIRST_OWNER_EMAIL
        ));
        announce(&format!("owner token (shown once): {}", first.token.as_str()));
        announce(&format!("owner account: {}", first.account_id));
        // The owner, found the way every login finds a user: by the token's hash.
        // No login URL when token login is off (it would be refused).
        let owner = if config.token_login {
            store.user_by_token(&hash_token(&first.token)).await?
        } else {
            None
        };
        if let Some(owner) = owner {
            let code = web.login_codes.issue(owner, clock.now());
            let login_url = format!("{base_url}/login?code={}", code.as_str());
            announce(&format!("one-time login URL: {login_url}"));
            first_start_info = Some((first.account_id.to_string(), login_url));
        }
    }

    let metrics = Arc::new(Metrics::default());
    // This node's stable id and this run's: reservation leases and webhook claims name both.
    let leases = Leases::for_data_dir(
        &config.data_dir,
        Duration::from_secs(u64::from(config.reservation_lease_secs)),
    )
    .map_err(|e| RuntimeError::Other(format!("node id: {e}")))?;
    let deliverer = if webhook_endpoints.is_empty() {
        None
    } else {
        crate::webhooks::free_claims_of_earlier_runs(store.as_ref(), &leases).await;
        let deliverer = crate::webhooks::Deliverer::new(
            store.clone(),
            webhook_endpoints,
            &config.webhook,
            leases.holder(),
            clock.clone(),
            metrics.clone(),
        )
        .map_err(|e| RuntimeError::Other(e.to_string()))?;
        Some(tokio::spawn(deliverer.run()))
    };
    let background_rewrap =
        (config.kek_rewrap == crate::config::KekRewrap::Background).then(|| crate::kek::BackgroundRewrap {
            store: store.clone(),
            kek: kek_store.clone(),
            worker: worker.clone(),
        });
    let workers = WorkerPool::start(config.workers, config.data_dir.join("run"), worker, metrics.clone())
        .map_err(|e| RuntimeError::Other(format!("worker pool: {e}")))?;
    let purge = PurgeHandle::default();
    // Reservations this node held when it last stopped died with it: released before the
    // first call (their credits back, each call audited as abandoned).
    match leases::release_earlier_runs(store.as_ref(), &leases, &clock, &metrics).await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            released = n,
            "released the reservations of calls this node's last run left unsettled"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "could not release the last run's reservations now; they are released when they expire")
        }
    }
    let engine = Engine::new(EngineParts {
        store: store.clone(),
        sealer: sealer.clone(),
        clock,
        catalogue: Arc::new(crate::catalogue_ops::load(&config)?),
        metrics,
        purge: purge.clone(),
        workers,
        ledger: Ledger::start(store.clone()),
        leases: leases.clone(),
        probe_limiter: Default::default(),
        provider_timeout_ms: config.provider.timeout_ms,
        key_tests_per_minute: config.key_tests_per_minute,
        audit_key: keyward_crypto::AuditChainKey::load(&config.data_dir).ok().map(Arc::new),
    });
    let state = AppState::new(AppStateInner {
        engine,
        max_body_bytes: config.max_body_bytes,
        max_ai_body_bytes: config.max_ai_body_bytes,
        metrics_on_api: config.metrics.listen.is_none(),
        web,
        kek_probe: Arc::default(),
    });
    let purger = tokio::spawn(purge::run(store.clone(), purge.clone()));
    let session_sweeper = tokio::spawn(crate::web::sessions::sweep(store.clone(), state.engine.clock.clone()));
    let lease_keeper = tokio::spawn(leases::keep(
        store.clone(),
        leases,
        state.engine.clock.clone(),
        state.engine.metrics.clone(),
    ));
    let kek_watcher = tokio::spawn(crate::kek::watch(
        config.clone(),
        kek_state,
        state.engine.workers.clone(),
        sealer,
        reporter.clone(),
        background_rewrap,
    ));
    // A purge at start covers removals that a crash interrupted before their checkpoint.
    purge.request();

    let metrics_server = match config.metrics.listen {
        Some(at) => {
            let listener = listen(at).map_err(|e| RuntimeError::Other(format!("KEYWARD_METRICS_LISTEN {at}: {e}")))?;
            let local = listener.local_addr().map_err(|e| RuntimeError::Other(e.to_string()))?;
            announce(&format!("metrics on http://{local}/metrics"));
            let app = crate::app::metrics_router(state.clone());
            Some(tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }))
        }
        None => None,
    };
    announce(&format!("listening on {scheme}://{addr}"));
    if let Some(on_ready) = extras.on_ready {
        let ready = Ready {
            base_url,
            first_start: match (&first, first_start_info) {
                (Some(f), Some((account_id, login_url))) => Some(FirstStartInfo {
                    token: f.token.as_str(),
                    account_id,
                    login_url,
                }),
                _ => None,
            },
        };
        on_ready(&ready);
    }
    drop(first);
    tracing::info!(%addr, tls = tls.is_some(), data_dir = %config.data_dir.display(), "keyward serving");
    let app = router(state).into_make_service_with_connect_info::<ClientAddr>();
    let served = match tls {
        None => axum::serve(listener, app).with_graceful_shutdown(stop.wait()).await,
        Some(acceptor) => {
            axum::serve(TlsListener::start(listener, addr, acceptor), app)
                .with_graceful_shutdown(stop.wait())
                .await
        }
    };
    purger.abort();
    session_sweeper.abort();
    lease_keeper.abort();
    kek_watcher.abort();
    if let Some(d) = deliverer {
        d.abort();
    }
    if let Some(m) = metrics_server {
        m.abort();
    }
    // Nothing seals any more: retire need not wait for this node.
    reporter.lock().await.forget().await;
    // Leave no removed ciphertext in the WAL behind us.
    if let Err(e) = store.purge_removed().await {
        tracing::warn!(error = %e, "final checkpoint failed");
    }
    tracing::info!("keyward stopped");
    served.map_err(|e| RuntimeError::Other(format!("server: {e}")))
}

/// Connections the kernel may queue before `accept`: tokio's default (128, as std's) overflowed when
/// 256 benchmark clients connected at once, and the ones dropped waited a full second for
/// their SYN to be retransmitted. The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// This process's name in `kek_sealers`: where it listens, its pid and a random part (a
/// restarted node is a new one; its old row ages out).
fn node_id(addr: SocketAddr) -> String {
    let r = crate::engine::identity::random_id_bytes();
    format!(
        "{addr} pid {} {:02x}{:02x}{:02x}{:02x}",
        std::process::id(),
        r[0],
        r[1],
        r[2],
        r[3]
    )
}

/// The host part of a URL reaching `addr` (an unspecified address becomes loopback).
fn url_host(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port())),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port())),
        _ => addr,
    }
}

/// rustls, TLS 1.2 and 1.3 only (ring), HTTP/1.1, with the PEM certificate chain and key.
/// Errors name the variable; they never hold key material.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, RuntimeError> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::{version, ServerConfig};

    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| RuntimeError::Other(format!("KEYWARD_TLS_CERT {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(RuntimeError::Other(format!(
            "KEYWARD_TLS_CERT {}: no PEM certificate in the file",
            cert.display()
        )));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| RuntimeError::Other(format!("KEYWARD_TLS_KEY {}: {e}", key.display())))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut tls = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&version::TLS13, &version::TLS12])
        .map_err(|e| RuntimeError::Other(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| {
            RuntimeError::Other(format!(
                "KEYWARD_TLS_KEY {}: does not fit KEYWARD_TLS_CERT or is not supported: {e}",
                key.display()
            ))
        })?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(tls)))
}

/// TLS handshakes in flight at once; connections beyond it are closed at once.
const MAX_HANDSHAKES: usize = 256;
/// The longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener that hands axum finished TLS connections. Handshakes run in their own tasks
/// (bounded in number and time), so a slow or silent client cannot hold up the others.
#[derive(Debug)]
pub struct TlsListener {
    incoming: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: JoinHandle<()>,
}

impl TlsListener {
    pub fn start(listener: TcpListener, local: SocketAddr, acceptor: TlsAcceptor) -> TlsListener {
        let (tx, incoming) = mpsc::channel(64);
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    tracing::debug!(%peer, "too many TLS handshakes in flight; connection closed");
                    continue;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                // Bounded by HANDSHAKE_TIMEOUT; the slot is held until it ends.
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, tx.send((tls, peer))).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener {
            incoming,
            local,
            acceptor: task,
        }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(conn) => conn,
            // The accept task is gone (only at shutdown): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> ClientAddr {
        ClientAddr(*stream.remote_addr())
    }
}

/// SIGTERM and SIGINT, registered once; a signal that arrives before [`ShutdownSignal::wait`]
/// is polled is kept, not lost.
struct ShutdownSignal {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    fn install() -> Result<Self, RuntimeError> {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).map_err(|e| RuntimeError::Other(format!("SIGTERM handler: {e}")))?;
        let int = signal(SignalKind::interrupt()).map_err(|e| RuntimeError::Other(format!("SIGINT handler: {e}")))?;
        Ok(Self { term, int })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        tracing::info!("shutdown requested; finishing in-flight requests");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_that_do_not_work_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = tls_acceptor(&missing, &missing).err().unwrap().to_string();
        assert!(err.starts_with("KEYWARD_TLS_CERT"), "{err}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = tls_acceptor(&empty, &missing).err().unwrap().to_string();
        assert!(
            err.starts_with("KEYWARD_TLS_CERT") && err.contains("no PEM certificate"),
            "{err}"
        );
    }

    #[test]
    fn login_urls_name_a_reachable_host() {
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(url_host(any).to_string(), "127.0.0.1:8080");
        let any6: SocketAddr = "[::]:8080".parse().unwrap();
        assert_eq!(url_host(any6).to_string(), "[::1]:8080");
        let lan: SocketAddr = "192.0.2.7:443".parse().unwrap();
        assert_eq!(url_host(lan), lan);
    }
}
