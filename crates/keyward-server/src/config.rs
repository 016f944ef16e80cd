//! Configuration: one typed, nested struct ([`Config`]), read once at start-up.
//!
//! Sources, lowest to highest precedence: built-in defaults, a TOML file (`--config`), then
//! `KEYWARD_*` environment variables. Every setting is declared once, as a field below with
//! its default and its check; its variable's name follows from where it sits: a top-level
//! field `listen` is `KEYWARD_LISTEN`, field `pool_size` of section `database` is
//! `KEYWARD_DATABASE_POOL_SIZE`. The file takes the same names without the prefix, lower
//! case, either flat (`database_pool_size = 10`, as the variables) or in sections
//! (`[database]` `pool_size = 10`). A bad value is an error that names the variable; an
//! unknown key in the file is an error too (a typo must not pass silently).
//!
//! The worker's own settings (its socket, the gateway it answers) are not here: `serve`
//! hands them to each worker it starts ([`WorkerProcess`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use keyward_core::Provider;
use keyward_crypto::KekSpec;
use serde::de::{self, DeserializeOwned, Deserializer};
use serde::Deserialize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{var}: {reason}")]
    Invalid { var: String, reason: String },
    #[error("config file {path}: {reason}")]
    File { path: String, reason: String },
}

/// Who moves saved keys to a new primary KEK version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KekRewrap {
    /// `serve` does, in a worker of its own, after it switches to a new primary and at start
    /// when keys are left under older versions.
    #[default]
    Background,
    /// Only `keyward kek rewrap` does.
    Manual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Which database backend a [`DatabaseUrl`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseBackend {
    /// `sqlite://PATH`: the embedded default, one node.
    Sqlite,
    /// `postgres://…` or `postgresql://…`: one database shared by many nodes.
    Postgres,
}

/// A database URL, parsed once: `sqlite://PATH` (or `sqlite:PATH`; a `?query` is ignored)
/// becomes the file's path, `postgres://…` and `postgresql://…` stay as given for the driver.
/// Its `Debug` hides any password.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

impl DatabaseUrl {
    /// The embedded default: `<data_dir>/keyward.db`.
    pub fn sqlite_in(data_dir: &Path) -> DatabaseUrl {
        DatabaseUrl::Sqlite(data_dir.join("keyward.db"))
    }

    /// `None` for anything but the three schemes (or an empty SQLite path).
    pub fn parse(raw: &str) -> Option<DatabaseUrl> {
        if let Some(rest) = raw.strip_prefix("sqlite:") {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            let path = rest.split('?').next().unwrap_or(rest);
            return (!path.is_empty()).then(|| DatabaseUrl::Sqlite(PathBuf::from(path)));
        }
        (raw.starts_with("postgres://") || raw.starts_with("postgresql://"))
            .then(|| DatabaseUrl::Postgres(raw.to_owned()))
    }

    /// The backend, from the URL's scheme.
    pub fn backend(&self) -> DatabaseBackend {
        match self {
            DatabaseUrl::Sqlite(_) => DatabaseBackend::Sqlite,
            DatabaseUrl::Postgres(_) => DatabaseBackend::Postgres,
        }
    }

    /// The SQLite file, for a SQLite URL.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            DatabaseUrl::Sqlite(p) => Some(p),
            DatabaseUrl::Postgres(_) => None,
        }
    }

    pub fn is_sqlite(&self) -> bool {
        self.backend() == DatabaseBackend::Sqlite
    }

    pub fn is_postgres(&self) -> bool {
        self.backend() == DatabaseBackend::Postgres
    }
}

impl fmt::Debug for DatabaseUrl {
    /// A SQLite URL is a path and shown whole. A server URL shows its scheme and what follows
    /// the last `@` (host, port, database) up to any `?`: a password, even one holding an
    /// unescaped `@`, `/` or `?`, comes before the last `@`, and query parameters (which may
    /// carry `password=`) are left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = match self {
            DatabaseUrl::Sqlite(p) => return write!(f, "DatabaseUrl(sqlite://{})", p.display()),
            DatabaseUrl::Postgres(url) => url,
        };
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url.as_str()));
        let (hidden, host) = match rest.rsplit_once('@') {
            Some((_, host)) => ("…@", host),
            None => ("", rest),
        };
        let (host, query) = match host.split_once('?') {
            Some((host, _)) => (host, "?…"),
            None => (host, ""),
        };
        write!(f, "DatabaseUrl({scheme}://{hidden}{host}{query})")
    }
}

/// Every setting of `serve` and the CLI (the struct's comments are the settings' docs; the
/// README's table lists them).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The SQLite database, the local KEK, the audit-chain key, worker sockets.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub database: DatabaseConfig,
    /// The HTTP (or HTTPS) listener; port 0 picks a free one.
    #[serde(default = "default_listen", deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    /// `KEYWARD_KEK`, parsed by keyward-crypto (which alone tells the backends apart).
    #[serde(default, deserialize_with = "kek_spec")]
    pub kek: KekSpec,
    #[serde(default)]
    pub kek_rewrap: KekRewrap,
    /// Isolated worker processes.
    #[serde(default = "default_workers", deserialize_with = "within::<_, u16, 1, 64>")]
    pub workers: u16,
    #[serde(default)]
    pub worker: WorkerSettings,
    #[serde(default)]
    pub provider: ProviderSettings,
    #[serde(default = "default_anthropic", deserialize_with = "base_url")]
    pub anthropic_base_url: String,
    #[serde(default = "default_openai", deserialize_with = "base_url")]
    pub openai_base_url: String,
    #[serde(default = "default_google", deserialize_with = "base_url")]
    pub google_base_url: String,
    /// The log filter (`tracing` `EnvFilter` syntax), to stderr.
    #[serde(default = "default_log", deserialize_with = "text")]
    pub log: String,
    #[serde(default)]
    pub log_format: LogFormat,
    /// The request body limit (`413 payload_too_large` above it).
    #[serde(
        default = "default_max_body_bytes",
        deserialize_with = "within::<_, usize, 1_024, 16_777_216>"
    )]
    pub max_body_bytes: usize,
    /// The AI routes' body limit (prompts carry whole email threads); a worker frame carries
    /// the body and must stay under its 8 MiB limit.
    #[serde(
        default = "default_max_ai_body_bytes",
        deserialize_with = "within::<_, usize, 1_024, 6_291_456>"
    )]
    pub max_ai_body_bytes: usize,
    /// "Test key" calls allowed per account and provider per minute.
    #[serde(default = "default_key_tests", deserialize_with = "within::<_, u32, 1, 10_000>")]
    pub key_tests_per_minute: u32,
    /// A model catalogue file replacing the built-in one.
    #[serde(default, deserialize_with = "some_path")]
    pub catalogue: Option<PathBuf>,
    /// Own-key calls failing in a row with a key diagnosis (invalid, no credit, missing
    /// permission, reported as leaked) before the `key.failing` webhook is sent.
    #[serde(
        default = "default_key_failing_after",
        deserialize_with = "within::<_, u32, 1, 1_000>"
    )]
    pub key_failing_after: u32,
    #[serde(default)]
    pub webhook: WebhookConfig,
    /// Whether `/login` takes a keyward token (and the first-start login code): `1` (the
    /// default) or `0`, when people sign in only with single sign-on.
    #[serde(default = "yes", deserialize_with = "flag")]
    pub token_login: bool,
    #[serde(default)]
    pub oidc: OidcConfig,
    /// The OS user (name or uid) `serve`, started as root, drops to after starting its
    /// workers as `KEYWARD_WORKER_USER` (see `users.rs`). The CLI, run as root, leaves the
    /// data dir's files owned as `serve` expects.
    #[serde(default, deserialize_with = "some_text")]
    pub user: Option<String>,
    /// `1`: let `serve` run its key-opening workers as its own OS user (trying keyward,
    /// development). Without it `serve` refuses that setup.
    #[serde(default, deserialize_with = "flag")]
    pub allow_same_user: bool,
    /// The Ed25519 key that signs audit checkpoints (created, mode 0600, on first use); keep
    /// it off the database host if you can. Default: `<data_dir>/audit-checkpoint.key`.
    #[serde(default, deserialize_with = "some_path")]
    pub audit_checkpoint_key: Option<PathBuf>,
}

/// `KEYWARD_OIDC_*`: single sign-on with OpenID Connect (off while `issuer` is unset).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The provider's issuer URL (its discovery document is `ISSUER/.well-known/openid-configuration`).
    #[serde(default, deserialize_with = "some_base_url")]
    pub issuer: Option<String>,
    /// keyward's client id at the provider.
    #[serde(default, deserialize_with = "some_text")]
    pub client_id: Option<String>,
    /// The client secret, alone in a file of mode 0600.
    #[serde(default, deserialize_with = "some_path")]
    pub client_secret_file: Option<PathBuf>,
    /// keyward's own public URL, as the browser reaches it: the redirect URI registered at the
    /// provider is `PUBLIC_URL/login/oidc/callback`.
    #[serde(default, deserialize_with = "some_base_url")]
    pub public_url: Option<String>,
    /// The ID-token claim matched against a user's external id.
    #[serde(default = "default_user_claim", deserialize_with = "text")]
    pub user_claim: String,
    /// `1`: a user with no matching external id is found by the token's email, if verified.
    #[serde(default, deserialize_with = "flag")]
    pub match_email: bool,
    /// `1`: an unknown user is created (just-in-time) instead of refused.
    #[serde(default, deserialize_with = "flag")]
    pub jit: bool,
    /// Calls to the provider (discovery, keys, token): their time limit.
    #[serde(default = "default_oidc_timeout", deserialize_with = "within::<_, u32, 100, 60_000>")]
    pub timeout_ms: u32,
}

impl Default for OidcConfig {
    fn default() -> OidcConfig {
        OidcConfig {
            issuer: None,
            client_id: None,
            client_secret_file: None,
            public_url: None,
            user_claim: default_user_claim(),
            match_email: false,
            jit: false,
            timeout_ms: default_oidc_timeout(),
        }
    }
}

/// `KEYWARD_WEBHOOK_*`: the product's webhook endpoints (Standard Webhooks).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Endpoints, comma-separated; each gets every event. None: no events are written.
    #[serde(default, deserialize_with = "url_list")]
    pub urls: Vec<String>,
    /// One secret (`whsec_…`) per line, in the order of the URLs; mode 0600. Never from the
    /// environment or argv, which other users of the machine may read.
    #[serde(default, deserialize_with = "some_path")]
    pub secrets_file: Option<PathBuf>,
    /// One delivery's time limit (connect to answer).
    #[serde(
        default = "default_webhook_timeout",
        deserialize_with = "within::<_, u32, 100, 120_000>"
    )]
    pub timeout_ms: u32,
    /// The first retry's delay; each next one doubles, with jitter, up to an hour.
    #[serde(
        default = "default_webhook_retry_base",
        deserialize_with = "within::<_, u32, 10, 3_600_000>"
    )]
    pub retry_base_ms: u32,
    /// How long an event is retried before it is given up on (then `keyward webhooks replay`).
    #[serde(
        default = "default_webhook_retry_for",
        deserialize_with = "within::<_, u32, 1, 604_800>"
    )]
    pub retry_for_secs: u32,
    /// How often each node looks for due events.
    #[serde(default = "default_webhook_poll", deserialize_with = "within::<_, u32, 10, 60_000>")]
    pub poll_ms: u32,
}

impl Default for WebhookConfig {
    fn default() -> WebhookConfig {
        WebhookConfig {
            urls: Vec::new(),
            secrets_file: None,
            timeout_ms: default_webhook_timeout(),
            retry_base_ms: default_webhook_retry_base(),
            retry_for_secs: default_webhook_retry_for(),
            poll_ms: default_webhook_poll(),
        }
    }
}

/// `KEYWARD_DATABASE_*`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://…`, or `postgres://…` / `postgresql://…` (default: SQLite in the data dir).
    #[serde(default, deserialize_with = "database_url")]
    pub url: Option<DatabaseUrl>,
    /// PostgreSQL: connections per node.
    #[serde(default = "default_pool_size", deserialize_with = "within::<_, u32, 1, 1_000>")]
    pub pool_size: u32,
    /// PostgreSQL: the longest one statement may run (lock waits included).
    #[serde(default = "default_db_timeout", deserialize_with = "within::<_, u32, 100, 600_000>")]
    pub statement_timeout_ms: u32,
    /// PostgreSQL: the longest to wait for a connection (a new one, or a free one).
    #[serde(default = "default_db_timeout", deserialize_with = "within::<_, u32, 100, 120_000>")]
    pub connect_timeout_ms: u32,
}

impl Default for DatabaseConfig {
    fn default() -> DatabaseConfig {
        DatabaseConfig {
            url: None,
            pool_size: default_pool_size(),
            statement_timeout_ms: default_db_timeout(),
            connect_timeout_ms: default_db_timeout(),
        }
    }
}

/// `KEYWARD_METRICS_*`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `/metrics` is served instead of the API's own listener (an internal address).
    #[serde(default, deserialize_with = "some_socket_addr")]
    pub listen: Option<SocketAddr>,
}

/// `KEYWARD_TLS_*`: both or neither.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The PEM certificate chain.
    #[serde(default, deserialize_with = "some_path")]
    pub cert: Option<PathBuf>,
    /// Its PEM private key.
    #[serde(default, deserialize_with = "some_path")]
    pub key: Option<PathBuf>,
}

/// `KEYWARD_WORKER_*`: what `serve` hands each worker it starts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Threads per worker process.
    #[serde(default = "default_worker_threads", deserialize_with = "within::<_, u16, 1, 16>")]
    pub threads: u16,
    /// The OS user (name or uid) the workers run as when `serve` starts as root.
    #[serde(default, deserialize_with = "some_text")]
    pub user: Option<String>,
    /// Sockets of workers run as their own service (`keyward worker --listen`),
    /// comma-separated: `serve` connects to them instead of starting workers.
    #[serde(default, deserialize_with = "path_list")]
    pub sockets: Vec<PathBuf>,
    /// `keyward worker --listen`: the gateway's OS user (name or uid), the only peer accepted.
    #[serde(default, deserialize_with = "some_text")]
    pub gateway_user: Option<String>,
}

impl Default for WorkerSettings {
    fn default() -> WorkerSettings {
        WorkerSettings {
            threads: default_worker_threads(),
            user: None,
            sockets: Vec::new(),
            gateway_user: None,
        }
    }
}

/// `KEYWARD_PROVIDER_*`: outbound calls.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// How long a provider may take to start answering, and may pause mid-stream.
    #[serde(
        default = "default_provider_timeout",
        deserialize_with = "within::<_, u32, 100, 600_000>"
    )]
    pub timeout_ms: u32,
    /// Connecting to a provider (TCP and TLS).
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "within::<_, u32, 100, 60_000>"
    )]
    pub connect_timeout_ms: u32,
}

impl Default for ProviderSettings {
    fn default() -> ProviderSettings {
        ProviderSettings {
            timeout_ms: default_provider_timeout(),
            connect_timeout_ms: default_connect_timeout(),
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./keyward-data")
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_workers() -> u16 {
    2
}
fn default_worker_threads() -> u16 {
    1
}
fn default_anthropic() -> String {
    "https://api.anthropic.com".to_owned()
}
fn default_openai() -> String {
    "https://api.openai.com".to_owned()
}
fn default_google() -> String {
    "https://generativelanguage.googleapis.com".to_owned()
}
fn default_log() -> String {
    "info".to_owned()
}
fn default_max_body_bytes() -> usize {
    64 * 1024
}
fn default_max_ai_body_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_key_tests() -> u32 {
    10
}
fn default_pool_size() -> u32 {
    10
}
fn default_db_timeout() -> u32 {
    5_000
}
fn default_provider_timeout() -> u32 {
    60_000
}
fn default_connect_timeout() -> u32 {
    5_000
}
fn default_key_failing_after() -> u32 {
    keyward_store::outbox::DEFAULT_KEY_FAILING_AFTER
}
fn default_webhook_timeout() -> u32 {
    10_000
}
fn default_webhook_retry_base() -> u32 {
    5_000
}
fn default_webhook_retry_for() -> u32 {
    86_400
}
fn yes() -> bool {
    true
}
fn default_user_claim() -> String {
    "sub".to_owned()
}
fn default_oidc_timeout() -> u32 {
    10_000
}
fn default_webhook_poll() -> u32 {
    50
}

impl Config {
    /// Reads the file (if any) and the given environment (pass `std::env::vars()`; variables
    /// that name no setting are ignored).
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let names = SettingNames::of_config();
        let mut table = toml::Table::new();
        if let Some(path) = file {
            let bad = |reason: String| ConfigError::File {
                path: path.display().to_string(),
                reason,
            };
            let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
            let parsed: toml::Table = toml::from_str(&text).map_err(|e| bad(e.message().to_owned()))?;
            for (key, value) in parsed {
                if value.as_str().is_some_and(|v| v.trim().is_empty()) {
                    continue; // an empty value is an unset one, as in the environment
                }
                match value {
                    // A section, as the struct nests it.
                    toml::Value::Table(section) if names.is_section(&key) => {
                        for (field, value) in section {
                            let path = names
                                .path(&format!("{key}_{field}"))
                                .ok_or_else(|| bad(format!("unknown key \"{key}.{field}\"")))?;
                            set(&mut table, path, value);
                        }
                    }
                    value => set(
                        &mut table,
                        names.path(&key).ok_or_else(|| bad(format!("unknown key {key:?}")))?,
                        value,
                    ),
                }
            }
        }
        for (var, value) in env {
            let Some(flat) = var.strip_prefix("KEYWARD_") else {
                continue;
            };
            if value.trim().is_empty() {
                continue; // set but empty: unset, as it always was
            }
            if let Some(path) = names.path(&flat.to_ascii_lowercase()) {
                set(&mut table, path, toml::Value::String(value));
            }
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let var = format!(
                "KEYWARD_{}",
                e.path().to_string().replace('.', "_").to_ascii_uppercase()
            );
            ConfigError::Invalid {
                var,
                reason: e.into_inner().to_string(),
            }
        })?;
        config.check()?;
        Ok(config)
    }

    /// What no single field can check.
    fn check(&self) -> Result<(), ConfigError> {
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            let var = if self.tls.cert.is_some() {
                "KEYWARD_TLS_KEY"
            } else {
                "KEYWARD_TLS_CERT"
            };
            return Err(ConfigError::Invalid {
                var: var.to_owned(),
                reason: "KEYWARD_TLS_CERT and KEYWARD_TLS_KEY must be set together".into(),
            });
        }
        if !self.webhook.urls.is_empty() && self.webhook.secrets_file.is_none() {
            return Err(ConfigError::Invalid {
                var: "KEYWARD_WEBHOOK_SECRETS_FILE".to_owned(),
                reason: "KEYWARD_WEBHOOK_URLS needs a signing secret per endpoint, one per line in this file".into(),
            });
        }
        if self.oidc.issuer.is_some() {
            for (var, set) in [
                ("KEYWARD_OIDC_CLIENT_ID", self.oidc.client_id.is_some()),
                (
                    "KEYWARD_OIDC_CLIENT_SECRET_FILE",
                    self.oidc.client_secret_file.is_some(),
                ),
                ("KEYWARD_OIDC_PUBLIC_URL", self.oidc.public_url.is_some()),
            ] {
                if !set {
                    return Err(ConfigError::Invalid {
                        var: var.to_owned(),
                        reason: "single sign-on (KEYWARD_OIDC_ISSUER) needs it".into(),
                    });
                }
            }
        }
        if !self.token_login && self.oidc.issuer.is_none() {
            return Err(ConfigError::Invalid {
                var: "KEYWARD_TOKEN_LOGIN".to_owned(),
                reason: "with token login off and no KEYWARD_OIDC_ISSUER, nobody could sign in".into(),
            });
        }
        Ok(())
    }

    /// The audit checkpoint signing key: `KEYWARD_AUDIT_CHECKPOINT_KEY`, or in the data dir.
    pub fn audit_checkpoint_key_path(&self) -> PathBuf {
        self.audit_checkpoint_key
            .clone()
            .unwrap_or_else(|| self.data_dir.join(keyward_crypto::CHECKPOINT_KEY_FILE))
    }

    /// The database: `KEYWARD_DATABASE_URL`, or SQLite in the data dir.
    pub fn database_url(&self) -> DatabaseUrl {
        self.database
            .url
            .clone()
            .unwrap_or_else(|| DatabaseUrl::sqlite_in(&self.data_dir))
    }

    /// A provider's endpoint (`KEYWARD_<PROVIDER>_BASE_URL`).
    pub fn base_url(&self, provider: Provider) -> &str {
        match provider {
            Provider::Anthropic => &self.anthropic_base_url,
            Provider::OpenAi => &self.openai_base_url,
            Provider::Google => &self.google_base_url,
        }
    }

    /// Points every provider at `url` (the demo's fakes, tests).
    pub fn set_base_urls(&mut self, url: &str) {
        for provider in Provider::ALL {
            *self.base_url_mut(provider) = url.to_owned();
        }
    }

    fn base_url_mut(&mut self, provider: Provider) -> &mut String {
        match provider {
            Provider::Anthropic => &mut self.anthropic_base_url,
            Provider::OpenAi => &mut self.openai_base_url,
            Provider::Google => &mut self.google_base_url,
        }
    }

    /// The variable naming a provider's endpoint.
    pub fn base_url_var(provider: Provider) -> String {
        format!("KEYWARD_{}_BASE_URL", provider.as_str().to_ascii_uppercase())
    }
}

/// What `serve` tells each worker it starts, in its environment; a worker refuses to run
/// without them (`keyward worker` is not for people to start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerProcess {
    /// The socket to serve.
    pub socket: PathBuf,
    /// The process that started it, which it dies with. Without a gateway uid, also the
    /// only peer it accepts. `None`: a worker run as its own service (`--listen`).
    pub parent: Option<u32>,
}

impl WorkerProcess {
    pub const SOCKET_VAR: &'static str = "KEYWARD_WORKER_SOCKET";
    pub const PARENT_VAR: &'static str = "KEYWARD_WORKER_PARENT";

    /// From the worker's environment (pass `std::env::vars()`); `listen` (`keyward worker
    /// --listen SOCKET`) names the socket, and the parent is then optional.
    pub fn from_env(
        env: impl IntoIterator<Item = (String, String)>,
        listen: Option<&Path>,
    ) -> Result<WorkerProcess, ConfigError> {
        let vars: BTreeMap<String, String> = env.into_iter().collect();
        if let Some(socket) = listen {
            let parent = match vars.get(Self::PARENT_VAR) {
                Some(p) => Some(p.parse::<u32>().map_err(|_| ConfigError::Invalid {
                    var: Self::PARENT_VAR.to_owned(),
                    reason: "expected a process id".to_owned(),
                })?),
                None => None,
            };
            return Ok(WorkerProcess {
                socket: socket.to_path_buf(),
                parent,
            });
        }
        let missing = |var: &str| ConfigError::Invalid {
            var: var.to_owned(),
            reason: "the worker is started by `keyward serve`".to_owned(),
        };
        let socket = vars
            .get(Self::SOCKET_VAR)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| missing(Self::SOCKET_VAR))?;
        let parent = vars
            .get(Self::PARENT_VAR)
            .ok_or_else(|| missing(Self::PARENT_VAR))?
            .parse::<u32>()
            .map_err(|_| ConfigError::Invalid {
                var: Self::PARENT_VAR.to_owned(),
                reason: "expected a process id".to_owned(),
            })?;
        Ok(WorkerProcess {
            socket,
            parent: Some(parent),
        })
    }
}

/// Puts `value` at `path` (a field, or a section and a field) of `table`.
fn set(table: &mut toml::Table, path: (Option<&'static str>, &'static str), value: toml::Value) {
    match path {
        (None, field) => {
            table.insert(field.to_owned(), value);
        }
        (Some(section), field) => {
            let entry = table
                .entry(section.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = entry {
                t.insert(field.to_owned(), value);
            }
        }
    }
}

/// The settings' flat names (`listen`, `database_pool_size`, …), read off the structs
/// themselves, so no list of names is kept by hand.
struct SettingNames {
    /// flat name → (section, field)
    paths: BTreeMap<String, (Option<&'static str>, &'static str)>,
    sections: Vec<&'static str>,
}

impl SettingNames {
    fn of_config() -> SettingNames {
        // A section is a field whose own fields can be read off its type; the others are
        // leaves. Sections are the struct-typed fields of `Config`.
        let sections: [(&'static str, &'static [&'static str]); 7] = [
            ("database", fields_of::<DatabaseConfig>()),
            ("metrics", fields_of::<MetricsConfig>()),
            ("tls", fields_of::<TlsConfig>()),
            ("worker", fields_of::<WorkerSettings>()),
            ("provider", fields_of::<ProviderSettings>()),
            ("webhook", fields_of::<WebhookConfig>()),
            ("oidc", fields_of::<OidcConfig>()),
        ];
        let mut paths = BTreeMap::new();
        for &field in fields_of::<Config>() {
            match sections.iter().find(|(name, _)| *name == field) {
                Some((section, inner)) => {
                    for &f in *inner {
                        paths.insert(format!("{section}_{f}"), (Some(*section), f));
                    }
                }
                None => {
                    paths.insert(field.to_owned(), (None, field));
                }
            }
        }
        SettingNames {
            paths,
            sections: sections.iter().map(|(s, _)| *s).collect(),
        }
    }

    fn path(&self, flat: &str) -> Option<(Option<&'static str>, &'static str)> {
        self.paths.get(flat).copied()
    }

    fn is_section(&self, name: &str) -> bool {
        self.sections.contains(&name)
    }
}

/// The field names serde knows a struct by.
fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Fields;
    #[derive(Debug)]
    struct Found(&'static [&'static str]);
    impl fmt::Display for Found {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("fields")
        }
    }
    impl std::error::Error for Found {}
    impl de::Error for Found {
        fn custom<M: fmt::Display>(_: M) -> Found {
            Found(&[])
        }
    }
    impl<'de> Deserializer<'de> for Fields {
        type Error = Found;
        fn deserialize_any<V: de::Visitor<'de>>(self, _: V) -> Result<V::Value, Found> {
            Err(Found(&[]))
        }
        fn deserialize_struct<V: de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Found> {
            Err(Found(fields))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    match T::deserialize(Fields) {
        Err(Found(fields)) => fields,
        Ok(_) => &[],
    }
}

// ---- one check per kind of value; each names what it expected -------------------------

/// A string, or (from the file) a number or a boolean written as one.
fn scalar<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        B(bool),
    }
    Ok(match Scalar::deserialize(d)? {
        Scalar::S(s) => s.trim().to_owned(),
        Scalar::I(n) => n.to_string(),
        Scalar::B(b) => b.to_string(),
    })
}

fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = scalar(d)?;
    if s.is_empty() {
        return Err(de::Error::custom("expected a value, got an empty one"));
    }
    Ok(s)
}

fn within<'de, D, T, const MIN: u64, const MAX: u64>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    let raw = scalar(d)?;
    match raw.parse::<u64>() {
        Ok(n) if (MIN..=MAX).contains(&n) => T::try_from(n).map_err(|_| de::Error::custom("out of range")),
        _ => Err(de::Error::custom(format!(
            "expected a whole number from {MIN} to {MAX}, got {raw:?}"
        ))),
    }
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let raw = scalar(d)?;
    raw.parse()
        .map_err(|_| de::Error::custom(format!("expected IP:PORT such as 127.0.0.1:8080, got {raw:?}")))
}

fn some_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let raw = scalar(d)?;
    if raw.is_empty() {
        return Ok(None);
    }
    raw.parse()
        .map(Some)
        .map_err(|_| de::Error::custom(format!("expected IP:PORT such as 127.0.0.1:9100, got {raw:?}")))
}

fn some_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let raw = scalar(d)?;
    Ok((!raw.is_empty()).then_some(raw))
}

/// `1`/`0` (or `true`/`false`).
fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let raw = scalar(d)?;
    match raw.as_str() {
        "1" | "true" => Ok(true),
        "0" | "false" | "" => Ok(false),
        _ => Err(de::Error::custom(format!("expected 0 or 1, got {raw:?}"))),
    }
}

fn some_base_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let raw = scalar(d)?;
    if raw.is_empty() {
        return Ok(None);
    }
    base_url(serde::de::value::StrDeserializer::<D::Error>::new(&raw)).map(Some)
}

fn some_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let raw = scalar(d)?;
    Ok((!raw.is_empty()).then(|| PathBuf::from(raw)))
}

fn kek_spec<'de, D: Deserializer<'de>>(d: D) -> Result<KekSpec, D::Error> {
    let raw = scalar(d)?;
    KekSpec::parse(if raw.is_empty() { "local" } else { &raw }).map_err(de::Error::custom)
}

fn database_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DatabaseUrl>, D::Error> {
    let raw = scalar(d)?;
    if raw.is_empty() {
        return Ok(None);
    }
    // The value is not echoed: it may hold a password.
    DatabaseUrl::parse(&raw)
        .map(Some)
        .ok_or_else(|| de::Error::custom("expected sqlite://PATH, postgres://… or postgresql://…"))
}

fn base_url<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let raw = scalar(d)?;
    let url = raw.trim_end_matches('/');
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && !url.contains(char::is_whitespace)
        && !url.contains('?')
        && !url.contains('#');
    if !ok {
        return Err(de::Error::custom(format!(
            "expected an http(s):// URL without query, got {url:?}"
        )));
    }
    Ok(url.to_owned())
}

/// Comma-separated http(s) URLs (empty: none).
fn path_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    let raw = scalar(d)?;
    raw.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            if p.starts_with('/') {
                Ok(PathBuf::from(p))
            } else {
                Err(de::Error::custom(format!(
                    "expected comma-separated absolute paths, got {p:?}"
                )))
            }
        })
        .collect()
}

fn url_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let raw = scalar(d)?;
    raw.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            let ok = (u.starts_with("https://") || u.starts_with("http://")) && !u.contains(char::is_whitespace);
            if ok {
                Ok(u.to_owned())
            } else {
                Err(de::Error::custom(format!(
                    "expected comma-separated http(s):// URLs, got {u:?}"
                )))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn webhook_settings_load_and_urls_need_their_secrets() {
        let c = Config::load(
            None,
            env(&[
                ("KEYWARD_WEBHOOK_URLS", "https://a.example/hooks, http://127.0.0.1:9/h"),
                ("KEYWARD_WEBHOOK_SECRETS_FILE", "/etc/keyward/webhook-secrets"),
                ("KEYWARD_WEBHOOK_RETRY_BASE_MS", "200"),
                ("KEYWARD_KEY_FAILING_AFTER", "5"),
            ]),
        )
        .unwrap();
        assert_eq!(c.webhook.urls, ["https://a.example/hooks", "http://127.0.0.1:9/h"]);
        assert_eq!(c.webhook.retry_base_ms, 200);
        assert_eq!(c.webhook.retry_for_secs, 86_400);
        assert_eq!(c.key_failing_after, 5);
        let err = Config::load(None, env(&[("KEYWARD_WEBHOOK_URLS", "https://a.example/hooks")])).unwrap_err();
        assert!(err.to_string().starts_with("KEYWARD_WEBHOOK_SECRETS_FILE"), "{err}");
        let err = Config::load(None, env(&[("KEYWARD_WEBHOOK_URLS", "ftp://x")])).unwrap_err();
        assert!(err.to_string().starts_with("KEYWARD_WEBHOOK_URLS"), "{err}");
    }

    #[test]
    fn defaults_match_the_api_table() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("./keyward-data"));
        assert_eq!(
            c.database_url(),
            DatabaseUrl::Sqlite(PathBuf::from("./keyward-data/keyward.db"))
        );
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.workers, 2);
        assert_eq!(c.base_url(Provider::OpenAi), "https://api.openai.com");
        assert_eq!(c.log, "info");
        assert_eq!(c.worker.threads, 1);
        assert_eq!((c.provider.timeout_ms, c.provider.connect_timeout_ms), (60_000, 5_000));
        assert_eq!(c.metrics.listen, None);
    }

    #[test]
    fn kek_is_local_unless_set() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.kek, keyward_crypto::KekSpec::local());
        assert_eq!(c.kek.backend(), "local");
        let err = Config::load(None, env(&[("KEYWARD_KEK", "vault:x")])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("KEYWARD_KEK: unknown backend \"vault\": this build supports \"local\""),
            "{err}"
        );
    }

    #[cfg(feature = "awskms")]
    #[test]
    fn awskms_is_selectable_and_the_worker_is_not_told_the_gateways_credentials_file() {
        let value = "awskms:key-id=k1;region=eu-west-1;endpoint=http://127.0.0.1:4566;\
                     gateway-credentials-file=/etc/kw/gateway;worker-credentials-file=/etc/kw/worker";
        let c = Config::load(None, env(&[("KEYWARD_KEK", value), ("KEYWARD_DATA_DIR", "/srv/kw")])).unwrap();
        assert_eq!(c.kek.backend(), "awskms");
        // The backend keeps its versions under KEYWARD_DATA_DIR.
        assert_eq!(
            crate::runtime::kek_backend(&c).data_dir(),
            std::path::Path::new("/srv/kw")
        );
        let worker = c.kek.worker_value();
        assert!(worker.contains("worker-credentials-file=/etc/kw/worker"), "{worker}");
        assert!(!worker.contains("/etc/kw/gateway"), "{worker}");
        let bad = Config::load(None, env(&[("KEYWARD_KEK", "awskms:region=eu-west-1")])).unwrap_err();
        assert!(bad.to_string().contains("KEYWARD_KEK"), "{bad}");
    }

    #[test]
    fn env_wins_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nworkers = 3\ndata_dir = \"/tmp/x\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), env(&[("KEYWARD_LISTEN", "127.0.0.1:9001")])).unwrap();
        assert_eq!(c.listen.port(), 9001);
        assert_eq!(c.workers, 3);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, val) in [
            ("KEYWARD_LISTEN", "localhost"),
            ("KEYWARD_WORKERS", "0"),
            ("KEYWARD_WORKERS", "two"),
            ("KEYWARD_KEK", "vault"),
            ("KEYWARD_OPENAI_BASE_URL", "ftp://x"),
            ("KEYWARD_LOG_FORMAT", "xml"),
            ("KEYWARD_DATABASE_URL", "mysql://x"),
            ("KEYWARD_DATABASE_URL", "postgres:/x"),
            ("KEYWARD_DATABASE_POOL_SIZE", "0"),
            ("KEYWARD_DATABASE_POOL_SIZE", "ten"),
            ("KEYWARD_DATABASE_STATEMENT_TIMEOUT_MS", "10"),
            ("KEYWARD_DATABASE_STATEMENT_TIMEOUT_MS", "-1"),
            ("KEYWARD_DATABASE_CONNECT_TIMEOUT_MS", "5s"),
        ] {
            let err = Config::load(None, env(&[(var, val)])).unwrap_err();
            assert!(err.to_string().starts_with(var), "{err}");
        }
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.toml");
        std::fs::write(&file, "lissen = \"127.0.0.1:9000\"\n").unwrap();
        let err = Config::load(Some(&file), env(&[])).unwrap_err();
        assert!(err.to_string().contains("unknown key \"lissen\""), "{err}");
    }

    #[test]
    fn database_url_debug_hides_password() {
        let u = DatabaseUrl::parse("postgres://u:secret@db/k").unwrap();
        assert!(!format!("{u:?}").contains("secret"));
        assert_eq!(format!("{u:?}"), "DatabaseUrl(postgres://…@db/k)");
        for url in [
            "postgres://u:se@cret@db:5432/k",
            "postgresql://u:se/c?ret@db/k",
            "postgres://u@db/k?password=secret",
            "postgres:///k?user=u&password=secret",
            "postgres://u:secret@db/k?application_name=a@b",
        ] {
            let shown = format!("{:?}", DatabaseUrl::parse(url).unwrap());
            assert!(
                !shown.contains("secret") && !shown.contains("cret"),
                "{url} shown as {shown}"
            );
        }
        let c = Config::load(None, env(&[("KEYWARD_DATABASE_URL", "postgres://u:secret@db/k")])).unwrap();
        assert!(!format!("{c:?}").contains("u:secret"));
    }

    #[test]
    fn postgres_urls_and_options() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.database_url().backend(), DatabaseBackend::Sqlite);
        assert_eq!(
            (
                c.database.pool_size,
                c.database.statement_timeout_ms,
                c.database.connect_timeout_ms
            ),
            (10, 5_000, 5_000)
        );
        for url in ["postgres://u@db:5432/k", "postgresql://u:pw@db/k?sslmode=disable"] {
            let c = Config::load(None, env(&[("KEYWARD_DATABASE_URL", url)])).unwrap();
            assert_eq!(c.database_url(), DatabaseUrl::Postgres(url.to_owned()));
            assert!(c.database_url().is_postgres() && !c.database_url().is_sqlite());
            assert_eq!(c.database_url().sqlite_path(), None);
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.toml");
        std::fs::write(
            &file,
            "database_url = \"postgres://db/k\"\ndatabase_pool_size = 32\ndatabase_statement_timeout_ms = 2000\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), env(&[("KEYWARD_DATABASE_CONNECT_TIMEOUT_MS", "750")])).unwrap();
        assert_eq!(
            (
                c.database.pool_size,
                c.database.statement_timeout_ms,
                c.database.connect_timeout_ms
            ),
            (32, 2_000, 750)
        );
        let err = Config::load(None, env(&[("KEYWARD_DATABASE_URL", "mysql://u:secret@db/k")])).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn the_file_takes_sections_or_flat_names_and_every_variable_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.toml");
        std::fs::write(
            &file,
            "worker_threads = 3\nkek_rewrap = \"manual\"\n[database]\npool_size = 7\n[tls]\ncert = \"/c\"\nkey = \"/k\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), env(&[])).unwrap();
        assert_eq!(c.database.pool_size, 7);
        assert_eq!(
            (c.tls.cert.as_deref(), c.tls.key.as_deref()),
            (Some(Path::new("/c")), Some(Path::new("/k")))
        );
        assert_eq!(c.worker.threads, 3);
        assert_eq!(c.kek_rewrap, KekRewrap::Manual);
        std::fs::write(&file, "[database]\npool_sise = 7\n").unwrap();
        let err = Config::load(Some(&file), env(&[])).unwrap_err();
        assert!(err.to_string().contains("unknown key \"database.pool_sise\""), "{err}");

        // The names the README documents are the names the struct answers to.
        let names = SettingNames::of_config();
        let mut vars: Vec<String> = names
            .paths
            .keys()
            .map(|k| format!("KEYWARD_{}", k.to_uppercase()))
            .collect();
        vars.sort();
        assert_eq!(
            vars,
            [
                "KEYWARD_ALLOW_SAME_USER",
                "KEYWARD_ANTHROPIC_BASE_URL",
                "KEYWARD_AUDIT_CHECKPOINT_KEY",
                "KEYWARD_CATALOGUE",
                "KEYWARD_DATABASE_CONNECT_TIMEOUT_MS",
                "KEYWARD_DATABASE_POOL_SIZE",
                "KEYWARD_DATABASE_STATEMENT_TIMEOUT_MS",
                "KEYWARD_DATABASE_URL",
                "KEYWARD_DATA_DIR",
                "KEYWARD_GOOGLE_BASE_URL",
                "KEYWARD_KEK",
                "KEYWARD_KEK_REWRAP",
                "KEYWARD_KEY_FAILING_AFTER",
                "KEYWARD_KEY_TESTS_PER_MINUTE",
                "KEYWARD_LISTEN",
                "KEYWARD_LOG",
                "KEYWARD_LOG_FORMAT",
                "KEYWARD_MAX_AI_BODY_BYTES",
                "KEYWARD_MAX_BODY_BYTES",
                "KEYWARD_METRICS_LISTEN",
                "KEYWARD_OIDC_CLIENT_ID",
                "KEYWARD_OIDC_CLIENT_SECRET_FILE",
                "KEYWARD_OIDC_ISSUER",
                "KEYWARD_OIDC_JIT",
                "KEYWARD_OIDC_MATCH_EMAIL",
                "KEYWARD_OIDC_PUBLIC_URL",
                "KEYWARD_OIDC_TIMEOUT_MS",
                "KEYWARD_OIDC_USER_CLAIM",
                "KEYWARD_OPENAI_BASE_URL",
                "KEYWARD_PROVIDER_CONNECT_TIMEOUT_MS",
                "KEYWARD_PROVIDER_TIMEOUT_MS",
                "KEYWARD_TLS_CERT",
                "KEYWARD_TLS_KEY",
                "KEYWARD_TOKEN_LOGIN",
                "KEYWARD_USER",
                "KEYWARD_WEBHOOK_POLL_MS",
                "KEYWARD_WEBHOOK_RETRY_BASE_MS",
                "KEYWARD_WEBHOOK_RETRY_FOR_SECS",
                "KEYWARD_WEBHOOK_SECRETS_FILE",
                "KEYWARD_WEBHOOK_TIMEOUT_MS",
                "KEYWARD_WEBHOOK_URLS",
                "KEYWARD_WORKERS",
                "KEYWARD_WORKER_GATEWAY_USER",
                "KEYWARD_WORKER_SOCKETS",
                "KEYWARD_WORKER_THREADS",
                "KEYWARD_WORKER_USER",
            ]
        );
    }

    #[test]
    fn single_sign_on_needs_its_settings_and_token_login_needs_an_alternative_to_be_off() {
        let c = Config::load(None, env(&[])).unwrap();
        assert!(c.token_login && c.oidc.issuer.is_none() && c.oidc.user_claim == "sub" && !c.oidc.jit);
        let err = Config::load(None, env(&[("KEYWARD_TOKEN_LOGIN", "0")])).unwrap_err();
        assert!(err.to_string().contains("KEYWARD_TOKEN_LOGIN"), "{err}");
        let err = Config::load(None, env(&[("KEYWARD_OIDC_ISSUER", "https://id.example.test")])).unwrap_err();
        assert!(err.to_string().contains("KEYWARD_OIDC_CLIENT_ID"), "{err}");
        let c = Config::load(
            None,
            env(&[
                ("KEYWARD_OIDC_ISSUER", "https://id.example.test/"),
                ("KEYWARD_OIDC_CLIENT_ID", "keyward"),
                ("KEYWARD_OIDC_CLIENT_SECRET_FILE", "/s"),
                ("KEYWARD_OIDC_PUBLIC_URL", "https://keys.example.test"),
                ("KEYWARD_OIDC_JIT", "1"),
                ("KEYWARD_TOKEN_LOGIN", "0"),
            ]),
        )
        .unwrap();
        assert_eq!(c.oidc.issuer.as_deref(), Some("https://id.example.test"));
        assert!(c.oidc.jit && !c.token_login);
        let err = Config::load(None, env(&[("KEYWARD_OIDC_JIT", "yes")])).unwrap_err();
        assert!(err.to_string().contains("KEYWARD_OIDC_JIT"), "{err}");
    }

    #[test]
    fn empty_variables_are_unset_and_worker_process_settings_are_apart() {
        let c = Config::load(None, env(&[("KEYWARD_LISTEN", ""), ("KEYWARD_WORKERS", " ")])).unwrap();
        assert_eq!((c.listen.port(), c.workers), (8080, 2));
        // The worker's own settings are not the gateway's: ignored by Config::load ...
        let c = Config::load(
            None,
            env(&[("KEYWARD_WORKER_SOCKET", "/s"), ("KEYWARD_WORKER_PARENT", "1")]),
        )
        .unwrap();
        assert_eq!(c, Config::load(None, env(&[])).unwrap());
        // ... and read, checked, by the worker.
        let w = WorkerProcess::from_env(
            env(&[("KEYWARD_WORKER_SOCKET", "/s"), ("KEYWARD_WORKER_PARENT", "42")]),
            None,
        )
        .unwrap();
        assert_eq!((w.socket, w.parent), (PathBuf::from("/s"), Some(42)));
        let err = WorkerProcess::from_env(env(&[("KEYWARD_WORKER_SOCKET", "/s")]), None).unwrap_err();
        assert!(err.to_string().starts_with("KEYWARD_WORKER_PARENT"), "{err}");
        // Run as its own service: the socket from `--listen`, no parent needed.
        let w = WorkerProcess::from_env(env(&[]), Some(Path::new("/l"))).unwrap();
        assert_eq!((w.socket, w.parent), (PathBuf::from("/l"), None));
        // The two-user settings.
        let c = Config::load(
            None,
            env(&[
                ("KEYWARD_USER", "kw"),
                ("KEYWARD_WORKER_USER", "kwk"),
                ("KEYWARD_WORKER_SOCKETS", "/a.sock, /b.sock"),
                ("KEYWARD_WORKER_GATEWAY_USER", "1001"),
                ("KEYWARD_ALLOW_SAME_USER", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(c.user.as_deref(), Some("kw"));
        assert_eq!(c.worker.user.as_deref(), Some("kwk"));
        assert_eq!(c.worker.sockets, [PathBuf::from("/a.sock"), PathBuf::from("/b.sock")]);
        assert_eq!(c.worker.gateway_user.as_deref(), Some("1001"));
        assert!(c.allow_same_user);
        let err = Config::load(None, env(&[("KEYWARD_WORKER_SOCKETS", "rel.sock")])).unwrap_err();
        assert!(err.to_string().starts_with("KEYWARD_WORKER_SOCKETS"), "{err}");
    }

    #[test]
    fn sqlite_urls_are_parsed_once_into_a_path() {
        for (url, path) in [
            ("sqlite:///srv/kw/k.db", "/srv/kw/k.db"),
            ("sqlite://rel/k.db", "rel/k.db"),
            ("sqlite:k.db?mode=rwc", "k.db"),
        ] {
            assert_eq!(
                DatabaseUrl::parse(url).unwrap().sqlite_path(),
                Some(Path::new(path)),
                "{url}"
            );
        }
        assert_eq!(DatabaseUrl::parse("sqlite://"), None);
    }
}
