//! Webhook delivery: posts the store's outbox events to the product's endpoints, signed as
//! the Standard Webhooks specification says (<https://www.standardwebhooks.com/>, spec
//! `spec/standard-webhooks.md`: headers `webhook-id`, `webhook-timestamp` and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, secrets `whsec_<base64>`).
//!
//! At least once, in order per account: each node claims due events under a lease (one per
//! account at a time, see `Store::claim_webhooks`), posts each to every endpoint that has not
//! accepted it yet, and records the attempt. A failed attempt is retried with exponential
//! backoff and jitter for `KEYWARD_WEBHOOK_RETRY_FOR_SECS` (24 h), then kept as dead for
//! `keyward webhooks list --failed` and `replay`. The outbox is in the database, so retries
//! survive restarts and a node that dies mid-delivery only delays its events until its
//! lease runs out, or until it starts again: then it frees its earlier runs' claims at once
//! ([`free_claims_of_earlier_runs`]).
//!
//! Must never: read a secret from anywhere but its 0600 file, log a secret or a body, or
//! follow a redirect (an endpoint is exactly the configured URL).

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use keyward_core::UnixMillis;
use keyward_store::{AttemptOutcome, Store, WebhookEvent};
use rand::Rng;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::clock::SharedClock;
use crate::config::WebhookConfig;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("KEYWARD_WEBHOOK_SECRETS_FILE {path}: {reason}")]
    Secrets { path: String, reason: String },
    #[error("webhook client: {0}")]
    Client(String),
}

/// A Standard Webhooks signing secret: the bytes after `whsec_`, base64-decoded.
pub struct WebhookSecret(Zeroizing<Vec<u8>>);

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(…)")
    }
}

impl WebhookSecret {
    /// `whsec_<base64>` (the prefix is optional, as in the reference libraries).
    pub fn parse(text: &str) -> Option<WebhookSecret> {
        let b64 = text.trim().strip_prefix("whsec_").unwrap_or(text.trim());
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        // The specification asks for 24 to 64 bytes of randomness.
        (24..=64)
            .contains(&bytes.len())
            .then(|| WebhookSecret(Zeroizing::new(bytes)))
    }

    /// `v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        // HMAC takes a key of any length.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            return String::new();
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        format!("v1,{sig}")
    }
}

/// One configured endpoint.
#[derive(Debug)]
pub struct Endpoint {
    pub url: String,
    pub secret: WebhookSecret,
}

/// The endpoints of `config`, each with its secret from the secrets file (one `whsec_…` per
/// line, in the same order; blank lines and `#` comments skipped). The file must be a regular
/// file with no group or other permission bits. No URLs: no endpoints.
pub fn load_endpoints(config: &WebhookConfig) -> Result<Vec<Endpoint>, WebhookError> {
    if config.urls.is_empty() {
        return Ok(Vec::new());
    }
    let Some(path) = &config.secrets_file else {
        return Err(WebhookError::Secrets {
            path: "(unset)".into(),
            reason: "KEYWARD_WEBHOOK_URLS needs one secret per endpoint".into(),
        });
    };
    let secrets = read_secrets(path)?;
    let bad = |reason: String| WebhookError::Secrets {
        path: path.display().to_string(),
        reason,
    };
    if secrets.len() != config.urls.len() {
        return Err(bad(format!(
            "{} secrets for {} URLs: give one per URL, in the same order",
            secrets.len(),
            config.urls.len()
        )));
    }
    Ok(config
        .urls
        .iter()
        .zip(secrets)
        .map(|(url, secret)| Endpoint {
            url: url.clone(),
            secret,
        })
        .collect())
}

fn read_secrets(path: &Path) -> Result<Vec<WebhookSecret>, WebhookError> {
    let bad = |reason: String| WebhookError::Secrets {
        path: path.display().to_string(),
        reason,
    };
    let text = crate::outbound::read_private_file(path).map_err(bad)?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .enumerate()
        .map(|(i, line)| {
            WebhookSecret::parse(line).ok_or_else(|| {
                bad(format!(
                    "secret {} is not whsec_ followed by base64 of 24 to 64 bytes",
                    i + 1
                ))
            })
        })
        .collect()
}

/// How a node delivers: its endpoints, its HTTP client and its timing.
pub struct Deliverer {
    store: Arc<dyn Store>,
    endpoints: Vec<Endpoint>,
    client: reqwest::Client,
    node: String,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    poll: Duration,
    retry_base_ms: u64,
    retry_for_ms: i64,
    lease_ms: i64,
}

impl fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deliverer")
            .field("endpoints", &self.endpoints.len())
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Frees, at start, the claims this node's earlier runs held: they died with their process,
/// and their events go out now instead of when the dead claims' leases run out (up to
/// `KEYWARD_WEBHOOK_TIMEOUT_MS` × endpoints + 30 s later).
pub async fn free_claims_of_earlier_runs(store: &dyn Store, leases: &crate::engine::leases::Leases) {
    let Some(prefix) = leases.earlier_runs_prefix() else {
        return;
    };
    match store.release_webhook_claims(&prefix).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(freed = n, "freed the webhook claims this node's last run held"),
        Err(e) => {
            tracing::warn!(error = %e, "could not free the last run's webhook claims; they are taken again when they expire")
        }
    }
}

/// Events claimed per round; an account contributes at most one.
const CLAIM_BATCH: u32 = 64;
/// Deliveries in flight at once per node.
const CONCURRENCY: usize = 16;
/// The longest wait between two attempts.
const MAX_BACKOFF_MS: u64 = 3_600_000;
/// How often the backlog gauge is refreshed.
const BACKLOG_EVERY: Duration = Duration::from_secs(1);
/// How long delivered events are kept (for `keyward webhooks list`); dead ones stay until
/// replayed.
const KEEP_DELIVERED_MS: i64 = 7 * 24 * 3_600_000;
/// How often delivered events older than that are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3_600);

impl Deliverer {
    pub fn new(
        store: Arc<dyn Store>,
        endpoints: Vec<Endpoint>,
        config: &WebhookConfig,
        node: String,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Result<Deliverer, WebhookError> {
        let timeout = Duration::from_millis(u64::from(config.timeout_ms));
        let client = crate::outbound::http_client(timeout, concat!("keyward-webhooks/", env!("CARGO_PKG_VERSION")))
            .map_err(WebhookError::Client)?;
        let lease_ms = i64::from(config.timeout_ms)
            .saturating_mul(i64::try_from(endpoints.len()).unwrap_or(1))
            .saturating_add(30_000);
        Ok(Deliverer {
            store,
            endpoints,
            client,
            node,
            clock,
            metrics,
            poll: Duration::from_millis(u64::from(config.poll_ms)),
            retry_base_ms: u64::from(config.retry_base_ms),
            retry_for_ms: i64::from(config.retry_for_secs).saturating_mul(1_000),
            lease_ms,
        })
    }

    /// Delivers until the task is aborted. A round that delivered something is followed at
    /// once by the next (an account's next event may be due); otherwise it waits one poll.
    pub async fn run(self) {
        let mut backlog_at = tokio::time::Instant::now();
        let mut pruned_at: Option<tokio::time::Instant> = None;
        self.refresh_backlog().await;
        loop {
            if pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                let before = UnixMillis(self.clock.now().as_i64().saturating_sub(KEEP_DELIVERED_MS));
                if let Err(e) = self.store.prune_webhooks(before).await {
                    tracing::warn!(error = %e, "could not prune delivered webhook events");
                }
                pruned_at = Some(tokio::time::Instant::now());
            }
            let progressed = match self.round().await {
                Ok(n) => n > 0,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook outbox unavailable; retrying");
                    false
                }
            };
            if backlog_at.elapsed() >= BACKLOG_EVERY {
                self.refresh_backlog().await;
                backlog_at = tokio::time::Instant::now();
            }
            if !progressed {
                tokio::time::sleep(self.poll).await;
            }
        }
    }

    async fn refresh_backlog(&self) {
        if let Ok(b) = self.store.webhook_backlog().await {
            let now = self.clock.now().as_i64();
            let age = b
                .oldest_pending_at
                .map_or(0.0, |at| now.saturating_sub(at.as_i64()).max(0) as f64 / 1e3);
            self.metrics.set_webhook_backlog(b.pending, age);
        }
    }

    /// Claims due events and delivers them; returns how many were delivered to every
    /// endpoint.
    pub async fn round(&self) -> Result<usize, keyward_store::StoreError> {
        let now = self.clock.now();
        let claimed = self
            .store
            .claim_webhooks(
                &self.node,
                now,
                UnixMillis(now.as_i64().saturating_add(self.lease_ms)),
                CLAIM_BATCH,
            )
            .await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        let delivered = futures_util::stream::iter(claimed)
            .map(|event| self.deliver(event))
            .buffer_unordered(CONCURRENCY)
            .filter(|done| std::future::ready(*done))
            .count()
            .await;
        Ok(delivered)
    }

    /// One attempt at one event: every endpoint that has not accepted it yet, then the
    /// outcome recorded. Returns whether it is now delivered everywhere.
    async fn deliver(&self, event: WebhookEvent) -> bool {
        let mut done = event.delivered_to.clone();
        let mut errors = Vec::new();
        // The signature's timestamp is the attempt's: receivers reject stale ones.
        let timestamp = self.clock.now().as_i64() / 1_000;
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if done.contains(&i) {
                continue;
            }
            match self.post(endpoint, &event, timestamp).await {
                Ok(()) => done.push(i),
                Err(e) => errors.push(format!("endpoint {}: {e}", i + 1)),
            }
        }
        let now = self.clock.now();
        let outcome = if errors.is_empty() {
            AttemptOutcome::Delivered
        } else {
            let error = errors.join("; ");
            let next = now
                .as_i64()
                .saturating_add(i64::try_from(self.backoff_ms(event.attempts + 1)).unwrap_or(i64::MAX));
            if next.saturating_sub(event.created_at.as_i64()) > self.retry_for_ms {
                AttemptOutcome::Dead { error }
            } else {
                AttemptOutcome::Retry {
                    next_attempt_at: UnixMillis(next),
                    error,
                }
            }
        };
        let label = match &outcome {
            AttemptOutcome::Delivered => "delivered",
            AttemptOutcome::Retry { .. } => "retry",
            AttemptOutcome::Dead { .. } => "dead",
        };
        self.metrics.record_webhook_delivery(label);
        if let AttemptOutcome::Dead { error } | AttemptOutcome::Retry { error, .. } = &outcome {
            tracing::warn!(event = %event.event_id, kind = %event.kind, attempts = event.attempts + 1, outcome = label, %error, "webhook not delivered");
        }
        match self
            .store
            .record_webhook_attempt(event.id, &self.node, &done, &outcome, now)
            .await
        {
            Ok(held) => held && outcome == AttemptOutcome::Delivered,
            Err(e) => {
                // The lease runs out and the event is sent again: at least once.
                tracing::warn!(event = %event.event_id, error = %e, "could not record a webhook attempt");
                false
            }
        }
    }

    async fn post(&self, endpoint: &Endpoint, event: &WebhookEvent, timestamp: i64) -> Result<(), String> {
        let signature = endpoint
            .secret
            .sign(&event.event_id, timestamp, event.payload.as_bytes());
        let answer = self
            .client
            .post(&endpoint.url)
            .header("content-type", "application/json")
            .header("webhook-id", &event.event_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(event.payload.clone())
            .send()
            .await
            .map_err(|e| describe(&e))?;
        let status = answer.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", status.as_u16()))
        }
    }

    /// Attempt `n`'s wait: base × 2^(n-1), at most an hour, ±25% jitter so a recovering
    /// endpoint is not hit by every event at once.
    fn backoff_ms(&self, n: i64) -> u64 {
        let exp = u32::try_from(n.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
        let base = self.retry_base_ms.saturating_mul(1u64 << exp).min(MAX_BACKOFF_MS);
        let jitter = rand::thread_rng().gen_range(0.75..1.25);
        ((base as f64) * jitter) as u64
    }
}

/// `keyward webhooks list`: the newest `limit` events (only those not delivered, with
/// `failed`: dead ones and ones still being retried), newest first, as JSON.
pub async fn list(
    store: &dyn Store,
    failed: bool,
    limit: u32,
) -> Result<Vec<serde_json::Value>, keyward_store::StoreError> {
    let filter = if failed {
        keyward_store::WebhookFilter::Failed
    } else {
        keyward_store::WebhookFilter::All
    };
    let events = store.webhook_events(filter, limit).await?;
    Ok(events
        .into_iter()
        .map(|e| {
            let status = if e.delivered_at.is_some() {
                "delivered"
            } else if e.dead_at.is_some() {
                "dead"
            } else {
                "pending"
            };
            serde_json::json!({
                "event_id": e.event_id,
                "type": e.kind,
                "account_id": e.account_id,
                "status": status,
                "created_at": e.created_at.rfc3339(),
                "attempts": e.attempts,
                "next_attempt_at": (status == "pending").then(|| e.next_attempt_at.rfc3339()),
                "delivered_at": e.delivered_at.map(UnixMillis::rfc3339),
                "dead_at": e.dead_at.map(UnixMillis::rfc3339),
                "last_error": e.last_error,
                "payload": serde_json::from_str::<serde_json::Value>(&e.payload).unwrap_or(serde_json::Value::Null),
            })
        })
        .collect())
}

/// A transport error in a few words (never the URL's query, which may carry a token).
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "cannot connect".into()
    } else {
        "request failed".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_standard_webhooks_example() {
        // The reference libraries' test vector (standard-webhooks/standard-webhooks,
        // libraries/go/webhook_test.go, TestWebhookSign).
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_must_be_whsec_base64_of_a_sane_length() {
        assert!(WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_some());
        assert!(WebhookSecret::parse("whsec_not base64!").is_none());
        assert!(WebhookSecret::parse("whsec_c2hvcnQ=").is_none(), "5 bytes is too short");
        assert_eq!(
            format!(
                "{:?}",
                WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()
            ),
            "WebhookSecret(…)"
        );
    }

    #[test]
    fn the_secrets_file_must_not_be_readable_by_others() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets");
        std::fs::write(&path, "# endpoint 1\nwhsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let config = WebhookConfig {
            urls: vec!["http://127.0.0.1:1/hook".into()],
            secrets_file: Some(path.clone()),
            ..WebhookConfig::default()
        };
        let err = load_endpoints(&config).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_endpoints(&config).unwrap().len(), 1);
        let two = WebhookConfig {
            urls: vec!["http://127.0.0.1:1/a".into(), "http://127.0.0.1:1/b".into()],
            ..config
        };
        let err = load_endpoints(&two).unwrap_err().to_string();
        assert!(err.contains("1 secrets for 2 URLs"), "{err}");
        assert!(!err.contains("MfKQ"), "a secret is never in an error: {err}");
    }
}
