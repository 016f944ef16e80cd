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
    /// On `model_retired`: the catalogued model to use instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
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

/// The last "Test key" of a saved key: `ok`, when, the message, and what the test found
/// (the same fields as the test's own answer, where it kept them).
#[derive(Debug, Serialize, ToSchema)]
pub struct LastTestBody {
    pub ok: bool,
    /// RFC 3339.
    pub at: String,
    pub message: String,
    #[serde(flatten)]
    pub found: Option<KeyTestFindings>,
}

/// What may be shown about a saved key: never the key.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyBody {
    pub last4: String,
    pub created_at: String,
    pub updated_at: String,
    pub last_test: Option<LastTestBody>,
    /// The key's format class from its prefix (`anthropic_api`, `openai_project`,
    /// `openai_service_account`, `openai_legacy`, `google_auth`, `google_standard`); null
    /// for keys saved before keyward recorded it.
    pub kind: Option<String>,
    /// A warning about this kind of key (Google standard keys), if any.
    pub notice: Option<String>,
    /// When the provider reported the key as leaked (RFC 3339): calls on it are refused
    /// (`409 key_reported_leaked`) until it is replaced.
    pub reported_leaked_at: Option<String>,
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
    /// `ok`, or the diagnosis (`invalid_key`, `no_credit`, `model_not_available`,
    /// `key_reported_leaked`, …).
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
    #[serde(flatten)]
    pub found: KeyTestFindings,
}

/// What a key test found beyond ok and the message. Kept with the key (its `last_test`)
/// and shown on its card as "what this key can do".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyTestFindings {
    /// The diagnosis (`ok` when the test worked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// What to do about the failure, where the provider's answer says (Google's answers on
    /// a key's type and state), or about the kind of key saved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
    /// `model_not_available` only: whether the key itself works, from the provider's free
    /// model listing (made with the same key, in a worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_valid: Option<bool>,
    /// `model_not_available` with a valid key: the catalogued models the key can use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// What the provider's rate-limit headers said: `requests`, `tokens` (Anthropic also
    /// `input_tokens`, `output_tokens`), each `{"limit", "remaining", "reset"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub rate_limits: Option<keyward_providers::RateLimits>,
    /// Why there are no rate limits, for a provider that never sends them (Google).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits_note: Option<String>,
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
    /// The user a service acted for (`keyward-on-behalf-of`), when it named one.
    pub on_behalf_of: Option<String>,
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

/// `PUT /v1/external/accounts/{external_id}`: the account's whole state.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExternalAccountRequest {
    /// 1 to 200 printable characters.
    #[schema(example = "Acme")]
    pub name: String,
    /// `free`, `pro` or `business`.
    #[schema(example = "pro")]
    pub plan: String,
    /// Shared-pool credits per calendar month; absent or null: the plan's default.
    #[serde(default)]
    pub shared_credit_limit: Option<i64>,
}

/// An account the product knows by its own id.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExternalAccountBody {
    /// keyward's id (`acc_…`): the one the account routes take.
    pub account_id: String,
    /// The product's id.
    pub external_id: String,
    pub name: String,
    #[schema(example = "pro")]
    pub plan: String,
    /// Shared-pool credits per calendar month in force (the plan's default unless set).
    pub shared_credit_limit: i64,
}

/// `PUT /v1/external/users/{external_id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExternalUserRequest {
    #[schema(example = "ana@example.com")]
    pub email: String,
}

/// A user the product knows by its own id.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExternalUserBody {
    /// keyward's id (`usr_…`).
    pub user_id: String,
    pub external_id: String,
    pub email: String,
}

/// `PUT /v1/external/accounts/{external_id}/members/{user_external_id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExternalMemberRequest {
    /// `owner`, `admin` or `member`.
    #[schema(example = "member")]
    pub role: String,
}

/// A membership made through the provisioning API.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExternalMemberBody {
    pub account_id: String,
    pub external_account_id: String,
    pub user_id: String,
    pub external_user_id: String,
    #[schema(example = "member")]
    pub role: String,
}
