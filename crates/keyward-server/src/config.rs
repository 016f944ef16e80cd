//! Configuration: one typed struct, read once at start-up.
//!
//! Sources, lowest to highest precedence: built-in defaults, a TOML file (`--config`;
//! keys are the variable names without `KEYWARD_`, lower case, e.g. `listen = "…"`),
//! then `KEYWARD_*` environment variables. A bad value is an error that names the
//! variable; an unknown key in the file is an error too (a typo must not pass silently).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Every setting, by its environment name. The file uses the same names, lower case,
/// without the prefix.
const KNOWN: &[&str] = &[
    "KEYWARD_DATA_DIR",
    "KEYWARD_DATABASE_URL",
    "KEYWARD_DATABASE_POOL_SIZE",
    "KEYWARD_DATABASE_STATEMENT_TIMEOUT_MS",
    "KEYWARD_DATABASE_CONNECT_TIMEOUT_MS",
    "KEYWARD_LISTEN",
    "KEYWARD_KEK",
    "KEYWARD_WORKERS",
    "KEYWARD_ANTHROPIC_BASE_URL",
    "KEYWARD_OPENAI_BASE_URL",
    "KEYWARD_GOOGLE_BASE_URL",
    "KEYWARD_LOG",
    "KEYWARD_LOG_FORMAT",
    "KEYWARD_TLS_CERT",
    "KEYWARD_TLS_KEY",
    "KEYWARD_MAX_BODY_BYTES",
    "KEYWARD_MAX_AI_BODY_BYTES",
    "KEYWARD_METRICS_LISTEN",
    "KEYWARD_WORKER_PARENT",
    "KEYWARD_PROVIDER_TIMEOUT_MS",
    "KEYWARD_PROVIDER_CONNECT_TIMEOUT_MS",
    "KEYWARD_WORKER_THREADS",
    "KEYWARD_KEY_TESTS_PER_MINUTE",
    "KEYWARD_CATALOGUE",
    "KEYWARD_KEK_REWRAP",
    // Internal: set by `serve` for each worker it starts.
    "KEYWARD_WORKER_SOCKET",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{var}: {reason}")]
    Invalid { var: &'static str, reason: String },
    #[error("config file {path}: {reason}")]
    File { path: String, reason: String },
}

/// Who moves saved keys to a new primary KEK version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KekRewrap {
    /// `serve` does, in a worker of its own, after it switches to a new primary and at start
    /// when keys are left under older versions.
    Background,
    /// Only `keyward kek rewrap` does.
    Manual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
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

/// A database URL, `sqlite://…`, `postgres://…` or `postgresql://…` (checked when the
/// configuration is read). Its `Debug` hides any password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The embedded default: `sqlite://<data_dir>/keyward.db`.
    pub fn sqlite_in(data_dir: &Path) -> DatabaseUrl {
        DatabaseUrl(format!("sqlite://{}", data_dir.join("keyward.db").display()))
    }

    fn parse(raw: &str) -> Option<DatabaseUrl> {
        let url = DatabaseUrl(raw.to_owned());
        url.scheme_backend().map(|_| url)
    }

    fn scheme_backend(&self) -> Option<DatabaseBackend> {
        if self.0.starts_with("sqlite:") {
            Some(DatabaseBackend::Sqlite)
        } else if self.0.starts_with("postgres://") || self.0.starts_with("postgresql://") {
            Some(DatabaseBackend::Postgres)
        } else {
            None
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The backend, from the URL's scheme.
    pub fn backend(&self) -> DatabaseBackend {
        self.scheme_backend().unwrap_or(DatabaseBackend::Sqlite)
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
        if self.is_sqlite() {
            return write!(f, "DatabaseUrl({})", self.0);
        }
        let (scheme, rest) = self.0.split_once("://").unwrap_or(("", self.0.as_str()));
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub data_dir: PathBuf,
    pub database_url: DatabaseUrl,
    /// PostgreSQL: connections per node.
    pub database_pool_size: u32,
    /// PostgreSQL: the longest one statement may run (lock waits included).
    pub database_statement_timeout_ms: u32,
    /// PostgreSQL: the longest to wait for a connection (a new one, or a free one).
    pub database_connect_timeout_ms: u32,
    pub listen: SocketAddr,
    /// `KEYWARD_KEK`, parsed by keyward-crypto (which alone tells the backends apart).
    pub kek: keyward_crypto::KekSpec,
    pub workers: u16,
    pub anthropic_base_url: String,
    pub openai_base_url: String,
    pub google_base_url: String,
    pub log: String,
    pub log_format: LogFormat,
    pub kek_rewrap: KekRewrap,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub max_body_bytes: usize,
    /// Limit for AI request bodies (prompts carry whole email threads).
    pub max_ai_body_bytes: usize,
    /// Where `/metrics` is served, if not on the API's own listener (an internal address).
    pub metrics_listen: Option<SocketAddr>,
    /// Set only in a worker process: the pid of the gateway that started it.
    pub worker_parent: Option<u32>,
    /// How long a provider may take to start answering, and may pause mid-stream.
    pub provider_timeout_ms: u32,
    pub provider_connect_timeout_ms: u32,
    /// Threads per worker process.
    pub worker_threads: u16,
    /// "Test key" calls allowed per account and provider per minute.
    pub key_tests_per_minute: u32,
    /// A model catalogue file replacing the built-in one.
    pub catalogue: Option<PathBuf>,
    /// Set only in a worker process: the socket it serves.
    pub worker_socket: Option<PathBuf>,
}

impl Config {
    /// Reads the file (if any) and the given environment (pass `std::env::vars()`).
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let mut values: BTreeMap<&'static str, String> = BTreeMap::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            for (k, v) in parse_file(&text).map_err(|reason| ConfigError::File {
                path: path.display().to_string(),
                reason,
            })? {
                values.insert(k, v);
            }
        }
        for (k, v) in env {
            if let Some(known) = KNOWN.iter().find(|n| **n == k) {
                values.insert(known, v);
            }
        }
        Config::from_values(&values)
    }

    fn from_values(v: &BTreeMap<&'static str, String>) -> Result<Config, ConfigError> {
        let get = |k: &str| v.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());
        let data_dir = PathBuf::from(get("KEYWARD_DATA_DIR").unwrap_or("./keyward-data"));
        let database_url = match get("KEYWARD_DATABASE_URL") {
            None => DatabaseUrl::sqlite_in(&data_dir),
            // The value is not echoed: it may hold a password.
            Some(u) => DatabaseUrl::parse(u).ok_or_else(|| ConfigError::Invalid {
                var: "KEYWARD_DATABASE_URL",
                reason: "expected sqlite://PATH, postgres://… or postgresql://…".into(),
            })?,
        };
        let database_pool_size = parse_num::<u32>(
            get("KEYWARD_DATABASE_POOL_SIZE"),
            "KEYWARD_DATABASE_POOL_SIZE",
            10,
            1,
            1_000,
        )?;
        let database_statement_timeout_ms = parse_num::<u32>(
            get("KEYWARD_DATABASE_STATEMENT_TIMEOUT_MS"),
            "KEYWARD_DATABASE_STATEMENT_TIMEOUT_MS",
            5_000,
            100,
            600_000,
        )?;
        let database_connect_timeout_ms = parse_num::<u32>(
            get("KEYWARD_DATABASE_CONNECT_TIMEOUT_MS"),
            "KEYWARD_DATABASE_CONNECT_TIMEOUT_MS",
            5_000,
            100,
            120_000,
        )?;
        let listen = get("KEYWARD_LISTEN").unwrap_or("127.0.0.1:8080");
        let listen: SocketAddr = listen.parse().map_err(|_| ConfigError::Invalid {
            var: "KEYWARD_LISTEN",
            reason: format!("expected IP:PORT such as 127.0.0.1:8080, got {listen:?}"),
        })?;
        let kek = keyward_crypto::KekSpec::parse(get("KEYWARD_KEK").unwrap_or("local")).map_err(|e| {
            ConfigError::Invalid {
                var: "KEYWARD_KEK",
                reason: e.to_string(),
            }
        })?;
        let workers = parse_num::<u16>(get("KEYWARD_WORKERS"), "KEYWARD_WORKERS", 2, 1, 64)?;
        let max_body_bytes = parse_num::<usize>(
            get("KEYWARD_MAX_BODY_BYTES"),
            "KEYWARD_MAX_BODY_BYTES",
            64 * 1024,
            1024,
            16 * 1024 * 1024,
        )?;
        let max_ai_body_bytes = parse_num::<usize>(
            get("KEYWARD_MAX_AI_BODY_BYTES"),
            "KEYWARD_MAX_AI_BODY_BYTES",
            4 * 1024 * 1024,
            1024,
            // A worker frame carries the body and must stay under its 8 MiB limit.
            6 * 1024 * 1024,
        )?;
        let worker_parent = get("KEYWARD_WORKER_PARENT")
            .map(|p| p.parse::<u32>())
            .transpose()
            .map_err(|_| ConfigError::Invalid {
                var: "KEYWARD_WORKER_PARENT",
                reason: "expected a process id".into(),
            })?;
        let provider_timeout_ms = parse_num::<u32>(
            get("KEYWARD_PROVIDER_TIMEOUT_MS"),
            "KEYWARD_PROVIDER_TIMEOUT_MS",
            60_000,
            100,
            600_000,
        )?;
        let provider_connect_timeout_ms = parse_num::<u32>(
            get("KEYWARD_PROVIDER_CONNECT_TIMEOUT_MS"),
            "KEYWARD_PROVIDER_CONNECT_TIMEOUT_MS",
            5_000,
            100,
            60_000,
        )?;
        let worker_threads = parse_num::<u16>(get("KEYWARD_WORKER_THREADS"), "KEYWARD_WORKER_THREADS", 1, 1, 16)?;
        let key_tests_per_minute = parse_num::<u32>(
            get("KEYWARD_KEY_TESTS_PER_MINUTE"),
            "KEYWARD_KEY_TESTS_PER_MINUTE",
            10,
            1,
            10_000,
        )?;
        let log_format = match get("KEYWARD_LOG_FORMAT").unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::Invalid {
                    var: "KEYWARD_LOG_FORMAT",
                    reason: format!("expected text or json, got {other:?}"),
                })
            }
        };
        let kek_rewrap = match get("KEYWARD_KEK_REWRAP").unwrap_or("background") {
            "background" => KekRewrap::Background,
            "manual" => KekRewrap::Manual,
            other => {
                return Err(ConfigError::Invalid {
                    var: "KEYWARD_KEK_REWRAP",
                    reason: format!("expected background or manual, got {other:?}"),
                })
            }
        };
        let tls_cert = get("KEYWARD_TLS_CERT").map(PathBuf::from);
        let tls_key = get("KEYWARD_TLS_KEY").map(PathBuf::from);
        if tls_cert.is_some() != tls_key.is_some() {
            let var = if tls_cert.is_some() {
                "KEYWARD_TLS_KEY"
            } else {
                "KEYWARD_TLS_CERT"
            };
            return Err(ConfigError::Invalid {
                var,
                reason: "KEYWARD_TLS_CERT and KEYWARD_TLS_KEY must be set together".into(),
            });
        }
        Ok(Config {
            database_url,
            database_pool_size,
            database_statement_timeout_ms,
            database_connect_timeout_ms,
            listen,
            kek,
            workers,
            anthropic_base_url: base_url(
                get("KEYWARD_ANTHROPIC_BASE_URL"),
                "KEYWARD_ANTHROPIC_BASE_URL",
                "https://api.anthropic.com",
            )?,
            openai_base_url: base_url(
                get("KEYWARD_OPENAI_BASE_URL"),
                "KEYWARD_OPENAI_BASE_URL",
                "https://api.openai.com",
            )?,
            google_base_url: base_url(
                get("KEYWARD_GOOGLE_BASE_URL"),
                "KEYWARD_GOOGLE_BASE_URL",
                "https://generativelanguage.googleapis.com",
            )?,
            log: get("KEYWARD_LOG").unwrap_or("info").to_owned(),
            log_format,
            kek_rewrap,
            tls_cert,
            tls_key,
            max_body_bytes,
            max_ai_body_bytes,
            worker_parent,
            provider_timeout_ms,
            provider_connect_timeout_ms,
            worker_threads,
            key_tests_per_minute,
            worker_socket: get("KEYWARD_WORKER_SOCKET").map(PathBuf::from),
            catalogue: get("KEYWARD_CATALOGUE").map(PathBuf::from),
            metrics_listen: get("KEYWARD_METRICS_LISTEN")
                .map(|v| {
                    v.parse::<SocketAddr>().map_err(|_| ConfigError::Invalid {
                        var: "KEYWARD_METRICS_LISTEN",
                        reason: format!("expected IP:PORT such as 127.0.0.1:9100, got {v:?}"),
                    })
                })
                .transpose()?,
            data_dir,
        })
    }

    /// The path of the SQLite file when the database is SQLite.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        let rest = self.database_url.as_str().strip_prefix("sqlite:")?;
        let rest = rest.strip_prefix("//").unwrap_or(rest);
        let path = rest.split('?').next().unwrap_or(rest);
        Some(PathBuf::from(path))
    }
}

fn parse_num<T: std::str::FromStr + PartialOrd + fmt::Display + Copy>(
    raw: Option<&str>,
    var: &'static str,
    default: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(ConfigError::Invalid {
            var,
            reason: format!("expected a whole number from {min} to {max}, got {raw:?}"),
        }),
    }
}

fn base_url(raw: Option<&str>, var: &'static str, default: &str) -> Result<String, ConfigError> {
    let url = raw.unwrap_or(default).trim_end_matches('/');
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && !url.contains(char::is_whitespace)
        && !url.contains('?')
        && !url.contains('#');
    if !ok {
        return Err(ConfigError::Invalid {
            var,
            reason: format!("expected an http(s):// URL without query, got {url:?}"),
        });
    }
    Ok(url.to_owned())
}

/// The TOML file: a flat table of known keys (lower case, no prefix) to strings or numbers.
fn parse_file(text: &str) -> Result<Vec<(&'static str, String)>, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| e.message().to_owned())?;
    let mut out = Vec::new();
    for (key, value) in table {
        let env_name = format!("KEYWARD_{}", key.to_uppercase());
        let Some(known) = KNOWN.iter().find(|n| **n == env_name) else {
            return Err(format!("unknown key {key:?}"));
        };
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(n) => n.to_string(),
            other => {
                return Err(format!(
                    "{key}: expected a string or a number, got {}",
                    other.type_str()
                ))
            }
        };
        out.push((*known, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_match_the_api_table() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("./keyward-data"));
        assert_eq!(c.database_url.as_str(), "sqlite://./keyward-data/keyward.db");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.workers, 2);
        assert_eq!(c.openai_base_url, "https://api.openai.com");
        assert_eq!(c.log, "info");
        assert_eq!(c.sqlite_path(), Some(PathBuf::from("./keyward-data/keyward.db")));
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
        let u = DatabaseUrl("postgres://u:secret@db/k".into());
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
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn postgres_urls_and_options() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.database_url.backend(), DatabaseBackend::Sqlite);
        assert_eq!(
            (
                c.database_pool_size,
                c.database_statement_timeout_ms,
                c.database_connect_timeout_ms
            ),
            (10, 5_000, 5_000)
        );
        for url in ["postgres://u@db:5432/k", "postgresql://u:pw@db/k?sslmode=disable"] {
            let c = Config::load(None, env(&[("KEYWARD_DATABASE_URL", url)])).unwrap();
            assert_eq!(c.database_url.as_str(), url);
            assert_eq!(c.database_url.backend(), DatabaseBackend::Postgres);
            assert!(c.database_url.is_postgres() && !c.database_url.is_sqlite());
            assert_eq!(c.sqlite_path(), None);
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
                c.database_pool_size,
                c.database_statement_timeout_ms,
                c.database_connect_timeout_ms
            ),
            (32, 2_000, 750)
        );
        let err = Config::load(None, env(&[("KEYWARD_DATABASE_URL", "mysql://u:secret@db/k")])).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
