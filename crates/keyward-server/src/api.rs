//! The shapes of keyward's own JSON API (API.md), as types.
//!
//! Handlers build these and serialize them; the OpenAPI document (`/openapi.json`) is
//! derived from the same types and from the handlers' annotations, so the document and
//! the answers cannot drift apart.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `{"error": {"code", "message"}}`; `provider_status` only on `provider_error`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable code, e.g. `invalid_key_format`.
    pub code: String,
    /// A sentence for a person; never holds a key.
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_status: Option<Option<u16>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AccountSummary {
    pub account_id: String,
    pub name: String,
    #[schema(example = "pro")]
    pub plan: String,
    #[schema(example = "owner")]
    pub role: String,
}

/// `GET /v1/me`.
#[derive(Debug, Serialize, ToSchema)]
pub struct MeBody {
    pub user_id: String,
    pub email: String,
    pub accounts: Vec<AccountSummary>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LastTestBody {
    pub ok: bool,
    /// RFC 3339.
    pub at: String,
    pub message: String,
}

/// What may be shown about a saved key: never the key.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyBody {
    pub last4: String,
    pub created_at: String,
    pub updated_at: String,
    pub last_test: Option<LastTestBody>,
}

/// One provider's state for an account.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProviderStateBody {
    #[schema(example = "openai")]
    pub provider: String,
    #[schema(example = "shared")]
    pub source: String,
    pub key: Option<KeyBody>,
    pub models: Vec<String>,
}

/// `GET …/model-keys`: always all three providers.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProviderListBody {
    pub providers: Vec<ProviderStateBody>,
}

/// `PUT …/model-keys/{provider}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SaveKeyRequest {
    /// The provider API key. Checked against the provider's format; never returned.
    #[schema(value_type = String, example = "sk-proj-…")]
    pub api_key: secrecy::SecretString,
}

/// `PUT …/model-keys/{provider}/source`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceRequest {
    /// `own` or `shared`.
    #[schema(example = "own")]
    pub source: String,
}

/// `POST …/model-keys/{provider}/test`: `ok` with model and latency, or a diagnosis.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyTestBody {
    pub ok: bool,
    /// `ok`, or the diagnosis (`invalid_key`, `no_credit`, …).
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_status: Option<Option<u16>>,
    /// The provider's own message (any echo of the key removed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEventBody {
    pub id: i64,
    pub at: String,
    pub actor: String,
    #[schema(example = "key.saved")]
    pub action: String,
    pub provider: Option<String>,
    pub key_source: Option<String>,
    pub key_last4: Option<String>,
    pub model: Option<String>,
    pub outcome: String,
    pub detail: Option<String>,
    pub provider_request_id: Option<String>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub feature: Option<String>,
}

/// `GET …/audit`, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditListBody {
    pub events: Vec<AuditEventBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SharedCredits {
    pub credit_limit: i64,
    pub credits_used: i64,
    pub credits_remaining: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Counts {
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SourceCounts {
    pub own: Counts,
    pub shared: Counts,
}

/// `GET …/usage`: this calendar month.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageBody {
    pub plan: String,
    pub period_start: String,
    pub period_end: String,
    pub shared: SharedCredits,
    pub by_provider: BTreeMap<String, SourceCounts>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatMessageSchema {
    /// `user` or `assistant`.
    pub role: String,
    pub content: String,
}

/// `POST …/ai/messages`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct MessagesRequest {
    pub provider: String,
    pub model: Option<String>,
    pub system: Option<String>,
    pub messages: Vec<ChatMessageSchema>,
    pub max_tokens: u32,
    pub temperature: Option<f32>,
    pub stream: Option<bool>,
    pub feature: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageCounts {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// A plain AI answer (streamed answers send the same fields, less `content`, as `done`).
#[derive(Debug, Serialize, ToSchema)]
pub struct AiAnswerBody {
    pub id: String,
    pub provider: String,
    pub model: String,
    pub key_source: String,
    pub content: String,
    pub stop_reason: String,
    pub usage: UsageCounts,
    pub credits_charged: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthBody {
    pub ok: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyBody {
    pub ready: bool,
    pub database: String,
    pub workers_ready: usize,
    /// The key-encryption backend, checked by sealing a random canary and having a worker
    /// open it.
    pub kek: KekReady,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct KekReady {
    /// `local`, `pkcs11` or `awskms`.
    pub backend: String,
    /// The KEK version new keys are sealed to.
    pub kek_id: String,
    /// `ok`; `unavailable` (the backend did not answer or refused: calls get
    /// `503 kek_unavailable`); `failing` (the canary did not open for another reason);
    /// `unchecked` (no worker to check with).
    pub status: String,
    /// What went wrong, when something did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
