//! The call engine shared by every AI route (`ai/messages`, "Test key", and the native
//! pass-through): choose the key, reserve shared credits, hand the sealed key and the
//! provider call to a worker, read the answer as it streams back, settle and audit.
//!
//! The gateway never sees a plaintext key here: it ships the sealed blob and its binding
//! to the worker, which opens it, calls the provider and returns only the response.

use std::time::Instant;

use keyward_core::{AccountId, ErrorCode, KeySource, Provider};
use keyward_providers::{HttpCall, HttpMethod, ProviderFailure};
use keyward_store::StoredKey;
use keyward_worker::protocol::{CallRequest, FailKind, FromWorker, Method, ToWorker};

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::workers::Lease;

/// The account id shared-pool keys are sealed to (one constant, owned by the store).
pub use keyward_store::SHARED_KEY_ACCOUNT as PLATFORM_ACCOUNT;

/// Which key pays for a call, sealed, with what it is bound to.
#[derive(Debug, Clone)]
pub struct KeyChoice {
    pub source: KeySource,
    pub key: StoredKey,
    /// The account part of the blob's binding: the account, or `platform` for the pool.
    pub binding_account: String,
}

/// The account's source for `provider` decides the key. An own-key account whose key is
/// gone gets `no_key_saved`; a shared call with no platform key configured gets a 503.
/// `current` is [`keyward_store::Store::call_key`]'s answer: one read for the source and the
/// key it selects (this is on every AI call's path).
pub fn choose_key(account: &AccountId, provider: Provider, current: keyward_store::CallKey) -> ApiResult<KeyChoice> {
    match current.source {
        KeySource::Own => {
            let key = current.key.ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NoKeySaved,
                    "this account uses its own key for this provider, but none is saved",
                )
            })?;
            Ok(KeyChoice {
                source: KeySource::Own,
                key,
                binding_account: account.to_string(),
            })
        }
        KeySource::Shared => {
            let key = current.key.ok_or_else(|| {
                ApiError::new(
                    ErrorCode::SharedPoolUnavailable,
                    format!(
                        "the shared pool has no {} key configured; save your own key to use {}",
                        provider.display_name(),
                        provider.display_name()
                    ),
                )
            })?;
            Ok(KeyChoice {
                source: KeySource::Shared,
                key,
                binding_account: PLATFORM_ACCOUNT.to_owned(),
            })
        }
    }
}

/// Why a call produced no provider answer.
#[derive(Debug)]
pub enum CallFailure {
    /// No worker, or the worker died mid-call.
    WorkerUnavailable,
    /// The KEK backend (HSM, KMS) did not answer or refused: the key could not be opened.
    KekUnavailable(String),
    /// The provider could not be reached or answered unreadably.
    Provider(ProviderFailure),
    /// Something keyward got wrong (a key that does not open, a refused path).
    Internal(String),
}

impl CallFailure {
    pub fn into_api_error(self) -> ApiError {
        match self {
            CallFailure::WorkerUnavailable => ApiError::new(
                ErrorCode::WorkerUnavailable,
                "no isolated worker is available right now; retry shortly",
            ),
            CallFailure::KekUnavailable(m) => ApiError::new(ErrorCode::KekUnavailable, kek_unavailable_message(&m)),
            CallFailure::Provider(f) => provider_error(&f),
            CallFailure::Internal(m) => ApiError::internal(&m),
        }
    }

    /// The audit outcome word.
    pub fn outcome(&self) -> String {
        match self {
            CallFailure::WorkerUnavailable => "error:worker_unavailable".to_owned(),
            CallFailure::KekUnavailable(_) => "error:kek_unavailable".to_owned(),
            CallFailure::Provider(f) => format!("error:{}", f.diagnosis.as_str()),
            CallFailure::Internal(_) => "error:internal".to_owned(),
        }
    }
}

/// The message of `503 kek_unavailable`: what the backend said (never key material; the
/// crypto errors carry none), and that retrying later is the remedy.
pub fn kek_unavailable_message(reason: &str) -> String {
    format!(
        "the key-encryption backend is not available, so no key could be opened or sealed; retry shortly ({reason})"
    )
}

/// `502 provider_error` carrying the provider's status and message.
pub fn provider_error(f: &ProviderFailure) -> ApiError {
    let mut e = ApiError::new(
        ErrorCode::ProviderError,
        format!("{} ({})", f.message, f.diagnosis.as_str()),
    );
    e.provider_status = f.status;
    e
}

/// An answer streaming back from a provider through a worker.
#[derive(Debug)]
pub struct Upstream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub started: Instant,
    lease: Option<Lease>,
    provider: Provider,
}

impl Upstream {
    /// The next body chunk as it arrives; `None` at the clean end.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, CallFailure> {
        let Some(lease) = self.lease.as_mut() else {
            return Ok(None);
        };
        match lease.conn.recv().await {
            Ok(FromWorker::Chunk(b)) => Ok(Some(b)),
            Ok(FromWorker::End) => {
                if let Some(l) = self.lease.take() {
                    l.release();
                }
                Ok(None)
            }
            Ok(FromWorker::Fail { kind, message }) => {
                // The exchange is complete (the worker ended it): the connection is reusable.
                if let Some(l) = self.lease.take() {
                    l.release();
                }
                Err(match kind {
                    FailKind::Connect | FailKind::Timeout | FailKind::Io | FailKind::UpstreamProtocol => {
                        CallFailure::Provider(ProviderFailure::new(
                            Some(self.status),
                            keyward_providers::Diagnosis::ProviderUnavailable,
                            &format!("{}'s answer broke off: {message}", self.provider.display_name()),
                        ))
                    }
                    _ => worker_fail(self.provider, kind, &message),
                })
            }
            Ok(_) => {
                self.lease = None;
                Err(CallFailure::Internal("worker protocol: unexpected frame".into()))
            }
            Err(_) => {
                self.lease = None;
                Err(CallFailure::WorkerUnavailable)
            }
        }
    }

    /// The whole body (for plain answers), bounded.
    pub async fn collect(&mut self, limit: usize) -> Result<Vec<u8>, CallFailure> {
        let mut body = Vec::new();
        while let Some(chunk) = self.next_chunk().await? {
            if body.len() + chunk.len() > limit {
                return Err(CallFailure::Provider(ProviderFailure::new(
                    Some(self.status),
                    keyward_providers::Diagnosis::MalformedResponse,
                    "the provider's answer is larger than keyward accepts",
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

fn worker_fail(provider: Provider, kind: FailKind, message: &str) -> CallFailure {
    match kind {
        FailKind::Connect | FailKind::Timeout | FailKind::Io => {
            CallFailure::Provider(ProviderFailure::unreachable(provider, message))
        }
        FailKind::UpstreamProtocol => CallFailure::Provider(ProviderFailure::new(
            None,
            keyward_providers::Diagnosis::MalformedResponse,
            &format!(
                "{} answered with something that is not HTTP: {message}",
                provider.display_name()
            ),
        )),
        FailKind::KekUnavailable => CallFailure::KekUnavailable(message.to_owned()),
        FailKind::OpenFailed | FailKind::PathRefused | FailKind::BadRequest | FailKind::Internal => {
            CallFailure::Internal(format!("worker refused the call ({kind:?}): {message}"))
        }
    }
}

static NEXT_REQUEST_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Sends `call` with `choice`'s sealed key through a worker and returns once the
/// provider's response head is in.
pub async fn open_and_call(
    state: &AppState,
    provider: Provider,
    choice: &KeyChoice,
    call: HttpCall,
) -> Result<Upstream, CallFailure> {
    let started = Instant::now();
    let request = CallRequest {
        request_id: NEXT_REQUEST_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        provider: provider.as_str().to_owned(),
        account_id: choice.binding_account.clone(),
        key_id: choice.key.key_id.to_string(),
        blob: choice.key.sealed.as_bytes().to_vec(),
        method: match call.method {
            HttpMethod::Get => Method::Get,
            HttpMethod::Post => Method::Post,
        },
        path_and_query: call.path_and_query,
        headers: call.headers,
        body: call.body,
        timeout_ms: state.provider_timeout_ms,
    };
    let mut lease = state
        .workers
        .lease()
        .await
        .map_err(|_| CallFailure::WorkerUnavailable)?;
    if lease.conn.send(&ToWorker::Call(request)).await.is_err() {
        return Err(CallFailure::WorkerUnavailable);
    }
    match lease.conn.recv().await {
        Ok(FromWorker::Head { status, headers }) => Ok(Upstream {
            status,
            headers,
            started,
            lease: Some(lease),
            provider,
        }),
        Ok(FromWorker::Fail { kind, message }) => {
            // The exchange is complete: the connection can be reused.
            lease.release();
            Err(worker_fail(provider, kind, &message))
        }
        Ok(_) => Err(CallFailure::Internal("worker protocol: unexpected frame".into())),
        Err(_) => Err(CallFailure::WorkerUnavailable),
    }
}

/// The calendar month a call is metered in: `YYYY-MM` (UTC), with its bounds.
pub fn period_of(now: keyward_core::UnixMillis) -> (String, time::OffsetDateTime, time::OffsetDateTime) {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now.as_i64()) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let start = t
        .replace_day(1)
        .ok()
        .map(|d| d.replace_time(time::Time::MIDNIGHT))
        .unwrap_or(t);
    let (y, m) = (start.year(), start.month());
    let end = if m == time::Month::December {
        start
            .replace_year(y + 1)
            .ok()
            .and_then(|d| d.replace_month(time::Month::January).ok())
    } else {
        start.replace_month(m.next()).ok()
    }
    .unwrap_or(start);
    (format!("{:04}-{:02}", y, u8::from(m)), start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_calendar_months() {
        // 2026-12-31T23:59:59Z
        let (p, s, e) = period_of(keyward_core::UnixMillis(1_798_761_599_000));
        assert_eq!(p, "2026-12");
        assert_eq!(s.unix_timestamp(), 1_796_083_200);
        assert_eq!(e.unix_timestamp(), 1_798_761_600);
    }

    #[test]
    fn a_kek_backend_that_does_not_answer_is_503_kek_unavailable() {
        let f = worker_fail(Provider::OpenAi, FailKind::KekUnavailable, "pkcs11: CKR_DEVICE_REMOVED");
        assert_eq!(f.outcome(), "error:kek_unavailable");
        let e = f.into_api_error();
        assert_eq!((e.code.as_str(), e.code.http_status()), ("kek_unavailable", 503));
        assert!(e.message.contains("CKR_DEVICE_REMOVED"), "{}", e.message);
        // A blob that does not open is not an outage: it stays a 500, never a retry hint.
        let e = worker_fail(Provider::OpenAi, FailKind::OpenFailed, "tampered").into_api_error();
        assert_eq!(e.code.http_status(), 500);
    }
}
