//! The provider APIs the native pass-through carries, as each official SDK calls them: which
//! request is which, what keyward reads from (and bounds in) its body, where it goes, how to
//! read the usage of its answer, and what keyward itself answers an SDK (its refusals in the
//! provider's error envelope, the model listing).
//!
//! | provider | API | path (after the SDK's base URL) | costs money |
//! |---|---|---|---|
//! | Anthropic | Messages | `POST /v1/messages` | yes |
//! | Anthropic | Token counting | `POST /v1/messages/count_tokens` | no (free) |
//! | OpenAI | Chat Completions | `POST /v1/chat/completions` | yes |
//! | OpenAI | Responses | `POST /v1/responses` | yes |
//! | OpenAI | Embeddings | `POST /v1/embeddings` | yes (input only) |
//! | Google | generateContent | `POST /v1/models/{m}:generateContent`, `:streamGenerateContent?alt=sse`, and the same under `/v1beta` | yes |
//!
//! Sources: <https://platform.claude.com/docs/en/api/messages>,
//! <https://platform.claude.com/docs/en/build-with-claude/token-counting> ("Token counting is
//! free"), <https://developers.openai.com/api/reference/resources/responses>,
//! <https://developers.openai.com/api/reference/resources/embeddings>,
//! <https://ai.google.dev/gemini-api/docs/api-versions> (google-genai 3.x calls `v1`).
//!
//! This module holds what the APIs share; each provider's module reads and writes its own
//! (through [`ProviderWire`](crate::wire::ProviderWire)). The gateway only moves bytes
//! between HTTP and these functions.

use keyward_core::{ErrorCode, ModelEntry, ModelKind, Provider};
use serde_json::{Map, Value};

use crate::call::{HttpCall, HttpMethod, KeyPlacement};
use crate::failure::{diagnose, ProviderFailure};
use crate::google::GoogleVersion;
use crate::response::{json_problem, parse_chat, Usage};
use crate::sse::SseBlockFilter;
use crate::stream::{StreamDecoder, StreamSummary};
use crate::wire::wire;

/// The output bound keyward sets when a native request names none: a shared-pool call is
/// reserved by its bound, so the provider must not produce more than was reserved.
pub const DEFAULT_MAX_OUTPUT: u32 = 4096;

/// One provider API the pass-through carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NativeApi {
    AnthropicMessages,
    AnthropicCountTokens,
    OpenAiChat,
    OpenAiResponses,
    OpenAiEmbeddings,
    GoogleGenerate(GoogleVersion),
}

impl NativeApi {
    /// Every API the pass-through carries: the gateway's routes and their documentation are
    /// built from this list.
    pub const ALL: [NativeApi; 7] = [
        NativeApi::AnthropicMessages,
        NativeApi::AnthropicCountTokens,
        NativeApi::OpenAiChat,
        NativeApi::OpenAiResponses,
        NativeApi::OpenAiEmbeddings,
        NativeApi::GoogleGenerate(GoogleVersion::V1),
        NativeApi::GoogleGenerate(GoogleVersion::V1Beta),
    ];

    /// The route under the account's `/providers/`, as the SDK calls it (axum's syntax:
    /// Google's model and action are one path parameter, `{model_action}`).
    pub fn route(self) -> &'static str {
        match self {
            NativeApi::AnthropicMessages => "anthropic/v1/messages",
            NativeApi::AnthropicCountTokens => "anthropic/v1/messages/count_tokens",
            NativeApi::OpenAiChat => "openai/v1/chat/completions",
            NativeApi::OpenAiResponses => "openai/v1/responses",
            NativeApi::OpenAiEmbeddings => "openai/v1/embeddings",
            NativeApi::GoogleGenerate(GoogleVersion::V1) => "google/v1/models/{model_action}",
            NativeApi::GoogleGenerate(GoogleVersion::V1Beta) => "google/v1beta/models/{model_action}",
        }
    }

    /// What it is, in a few words (the OpenAPI summary).
    pub fn summary(self) -> &'static str {
        match self {
            NativeApi::AnthropicMessages => "Anthropic Messages",
            NativeApi::AnthropicCountTokens => "Anthropic token counting (free: audited, never charged)",
            NativeApi::OpenAiChat => "OpenAI Chat Completions",
            NativeApi::OpenAiResponses => "OpenAI Responses",
            NativeApi::OpenAiEmbeddings => "OpenAI Embeddings",
            NativeApi::GoogleGenerate(GoogleVersion::V1) => "Google generateContent (v1, google-genai's default)",
            NativeApi::GoogleGenerate(GoogleVersion::V1Beta) => "Google generateContent (v1beta)",
        }
    }

    pub fn provider(self) -> Provider {
        match self {
            NativeApi::AnthropicMessages | NativeApi::AnthropicCountTokens => Provider::Anthropic,
            NativeApi::OpenAiChat | NativeApi::OpenAiResponses | NativeApi::OpenAiEmbeddings => Provider::OpenAi,
            NativeApi::GoogleGenerate(_) => Provider::Google,
        }
    }

    /// Whether the provider bills it (token counting is free: it is audited, never charged).
    pub fn costs_money(self) -> bool {
        self != NativeApi::AnthropicCountTokens
    }

    /// The kind of catalogued model it takes.
    pub fn model_kind(self) -> ModelKind {
        match self {
            NativeApi::OpenAiEmbeddings => ModelKind::Embedding,
            _ => ModelKind::Chat,
        }
    }

    /// Whether it can answer with an event stream.
    pub fn streams(self) -> bool {
        !matches!(self, NativeApi::AnthropicCountTokens | NativeApi::OpenAiEmbeddings)
    }
}

/// The model-listing routes under the account's `/providers/` for `provider`
/// (`openai/v1/models`, …), answered from the catalogue.
pub fn model_list_routes(provider: Provider) -> Vec<String> {
    wire(provider)
        .model_list_versions()
        .iter()
        .map(|v| format!("{}/{v}/models", provider.as_str()))
        .collect()
}

/// What the pass-through carries for `provider`, in words, for refusals of anything else.
pub fn native_routes(provider: Provider) -> &'static str {
    wire(provider).native_routes()
}

/// The refusal of `what` (e.g. `GET /v1/files`) under `provider`'s base URL: not carried,
/// and what is.
pub fn not_carried_message(provider: Provider, what: &str) -> String {
    format!(
        "{what} is not carried by keyward's {} pass-through: it carries {}",
        provider.display_name(),
        native_routes(provider)
    )
}

/// What keyward reads from a client's native request, and the body it forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeRequest {
    pub api: NativeApi,
    /// The body to forward: the client's, or rewritten when keyward had to set an output
    /// bound or ask for usage.
    pub body: Vec<u8>,
    pub model: String,
    /// The output bound (0 for APIs without output: embeddings, token counting).
    pub max_output: u32,
    pub stream: bool,
    /// OpenAI chat: keyward asked for the usage chunk the client did not ask for, so the
    /// client must not see it.
    pub hide_usage_chunk: bool,
}

/// Why a native request was refused before anything was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NativeRequestError {
    #[error("the body is not valid JSON")]
    NotJson,
    #[error("{0}")]
    Invalid(String),
}

/// What a provider module read from a native request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NativeFields {
    pub model: String,
    pub max_output: u32,
    pub stream: bool,
    /// keyward changed the body, so it forwards its own serialization.
    pub rewritten: bool,
    pub hide_usage_chunk: bool,
}

impl NativeFields {
    /// Fields read from a body keyward forwards as the client sent it.
    pub(crate) fn as_sent(model: String, max_output: u32, stream: bool) -> NativeFields {
        NativeFields {
            model,
            max_output,
            stream,
            rewritten: false,
            hide_usage_chunk: false,
        }
    }
}

pub(crate) fn invalid(m: impl Into<String>) -> NativeRequestError {
    NativeRequestError::Invalid(m.into())
}

pub(crate) fn as_u32(v: Option<&Value>) -> Option<u32> {
    v.and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok())
}

pub(crate) fn model_of(obj: &Map<String, Value>) -> Result<String, NativeRequestError> {
    obj.get("model")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| invalid("model: required"))
}

/// The body's `stream` flag (absent: not streamed).
pub(crate) fn stream_of(obj: &Map<String, Value>) -> bool {
    obj.get("stream").and_then(Value::as_bool).unwrap_or(false)
}

/// Reads a native request. `google` is the model and streaming of a Google call, which
/// travel in its path (`models/{model}:streamGenerateContent`), not its body.
pub fn read_native_request(
    api: NativeApi,
    raw: &[u8],
    google: Option<(&str, bool)>,
) -> Result<NativeRequest, NativeRequestError> {
    let mut v: Value = serde_json::from_slice(raw).map_err(|_| NativeRequestError::NotJson)?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| invalid("the body must be a JSON object"))?;
    let fields = wire(api.provider()).read_native(api, obj, google)?;
    let body = if fields.rewritten {
        serde_json::to_vec(&v).map_err(|_| NativeRequestError::NotJson)?
    } else {
        raw.to_vec()
    };
    Ok(NativeRequest {
        api,
        body,
        model: fields.model,
        max_output: fields.max_output,
        stream: fields.stream,
        hide_usage_chunk: fields.hide_usage_chunk,
    })
}

/// The provider call for a native request: its path, the body, and the non-secret headers
/// it may carry. Of the client's headers only Anthropic's `anthropic-version` (default
/// 2023-06-01) and `anthropic-beta` travel on; anything else a client sent stays here.
pub fn native_call(req: &NativeRequest, client_header: impl Fn(&str) -> Option<String>) -> HttpCall {
    let wire = wire(req.api.provider());
    let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
    headers.extend(wire.native_headers(&client_header));
    HttpCall {
        method: HttpMethod::Post,
        path_and_query: wire.native_path(req),
        headers,
        body: req.body.clone(),
    }
}

/// What keyward reads from a plain native answer: the provider's id for it and its usage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NativeAnswer {
    pub id: String,
    pub usage: Usage,
}

/// Reads a plain native answer: a status outside 2xx goes to [`diagnose`]; a 2xx that is not
/// the API's answer is `malformed_response`.
pub fn parse_native(api: NativeApi, status: u16, body: &[u8]) -> Result<NativeAnswer, ProviderFailure> {
    wire(api.provider()).parse_native(api, status, body)
}

/// A chat API's plain answer, read as `ai/messages` reads it.
pub(crate) fn chat_answer(provider: Provider, status: u16, body: &[u8]) -> Result<NativeAnswer, ProviderFailure> {
    parse_chat(provider, status, body).map(|a| NativeAnswer {
        id: a.id,
        usage: a.usage,
    })
}

/// Any other API's plain answer: a status outside 2xx goes to [`diagnose`], a body that is
/// not JSON is `malformed_response`, and `read` takes what keyward needs from the JSON
/// (`None` when it is not the API's answer).
pub(crate) fn json_answer(
    provider: Provider,
    status: u16,
    body: &[u8],
    read: impl FnOnce(&Value) -> Option<Result<NativeAnswer, ProviderFailure>>,
) -> Result<NativeAnswer, ProviderFailure> {
    if !(200..300).contains(&status) {
        return Err(diagnose(provider, status, body));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ProviderFailure::malformed(provider, Some(status), json_problem(&e)))?;
    read(&v).unwrap_or_else(|| {
        Err(ProviderFailure::malformed(
            provider,
            Some(status),
            "JSON that is not the API's answer (fields missing or of the wrong type)",
        ))
    })
}

/// A streamed native answer on its way to the client: its bytes pass on as they come, read
/// for the usage on the way, less the usage-only event keyward asked for on the client's
/// behalf ([`NativeRequest::hide_usage_chunk`]).
#[derive(Debug)]
pub struct NativeStream {
    decoder: StreamDecoder,
    hidden: Option<SseBlockFilter>,
}

impl NativeStream {
    pub fn new(req: &NativeRequest) -> NativeStream {
        let hidden = if req.hide_usage_chunk {
            wire(req.api.provider()).usage_only_event().map(SseBlockFilter::new)
        } else {
            None
        };
        NativeStream {
            decoder: StreamDecoder::for_native(req.api),
            hidden,
        }
    }

    /// Reads the next chunk of the answer. Returns what the client sees in its place: `None`
    /// when that is `chunk` itself, else the bytes of every event the chunk completed, less
    /// the hidden one (the rest is held until its event is complete).
    pub fn feed(&mut self, chunk: &[u8]) -> Option<Vec<u8>> {
        // The decoder reads the usage; its text deltas are not needed: the client gets the
        // provider's own bytes.
        let _ = self.decoder.feed(chunk);
        self.hidden.as_mut().map(|f| f.feed(chunk))
    }

    /// Whether the provider's end marker has arrived.
    pub fn is_complete(&self) -> bool {
        self.decoder.is_complete()
    }

    /// The bytes the client has yet to see once the answer has ended (or broken off): an
    /// event still held, as it came.
    pub fn rest(&mut self) -> Vec<u8> {
        self.hidden.as_mut().map(SseBlockFilter::finish).unwrap_or_default()
    }

    /// Whether the stream was complete, with its usage; see [`StreamDecoder::finish`].
    pub fn finish(&mut self) -> Result<StreamSummary, ProviderFailure> {
        self.decoder.finish()
    }
}

/// A JSON answer keyward gives an SDK itself (`content-type: application/json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeReply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// keyward's own refusal of a native call as the SDK expects it: the code's status and
/// `message` in the provider's error envelope, so the SDK raises its own exception (e.g.
/// `openai.RateLimitError` with code `insufficient_quota` when the shared credits are spent).
/// A missing or wrong token is explained with the header this SDK sends its key in.
pub fn native_refusal(provider: Provider, code: ErrorCode, message: &str) -> NativeReply {
    let wire = wire(provider);
    let unauthorized;
    let message = if code == ErrorCode::Unauthorized {
        unauthorized = format!(
            "a valid keyward token is required as this SDK's API key (sent in {}: kw_…)",
            wire.sdk_key_header()
        );
        &unauthorized
    } else {
        message
    };
    let status = code.http_status();
    NativeReply {
        status,
        body: wire.refusal_body(code, status, message).to_string().into_bytes(),
    }
}

/// The SDK's model listing (`GET …/v1/models`), answered from the catalogue's `models`.
pub fn native_model_list(provider: Provider, models: &[&ModelEntry]) -> NativeReply {
    NativeReply {
        status: 200,
        body: wire(provider).model_list_body(models).to_string().into_bytes(),
    }
}

/// The message of keyward's own `unknown_provider` refusal of a pass-through path that
/// names no provider (so there is no provider's error format to use).
pub fn unknown_provider_message() -> String {
    let names: Vec<&str> = Provider::ALL.iter().map(|p| p.as_str()).collect();
    match names.split_last() {
        Some((last, [])) => format!("unknown provider: expected {last}"),
        Some((last, rest)) => format!("unknown provider: expected {} or {last}", rest.join(", ")),
        None => "unknown provider".to_owned(),
    }
}

/// The API key an official SDK sent, from whichever provider's key header carries one
/// (trimmed, not empty; `header` gives a request header's value by its lower-case name).
/// Headers that carry nothing but a key are read first: `Authorization` is a general header
/// that other software may set too.
pub fn sdk_key<'h>(header: impl Fn(&str) -> Option<&'h str>) -> Option<&'h str> {
    let placements = Provider::ALL.map(|p| wire(p).key_placement());
    let (bare, prefixed): (Vec<&KeyPlacement>, Vec<&KeyPlacement>) =
        placements.iter().partition(|p| p.value_prefix.is_empty());
    bare.into_iter().chain(prefixed).find_map(|p| {
        header(p.header)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .and_then(|v| v.strip_prefix(p.value_prefix))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{path_allowed, Diagnosis, ANTHROPIC_VERSION};
    use serde_json::json;

    fn read(api: NativeApi, body: Value) -> NativeRequest {
        read_native_request(api, body.to_string().as_bytes(), Some(("gemini-3.8-flash", false))).unwrap()
    }

    #[test]
    fn bounds_are_read_or_set() {
        let r = read(
            NativeApi::OpenAiResponses,
            json!({"model": "gpt-6-luna", "input": "hi"}),
        );
        assert_eq!((r.max_output, r.stream), (DEFAULT_MAX_OUTPUT, false));
        let sent: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(sent["max_output_tokens"], DEFAULT_MAX_OUTPUT);
        let r = read(
            NativeApi::OpenAiResponses,
            json!({"model": "gpt-6-luna", "input": "hi", "max_output_tokens": 64, "stream": true}),
        );
        assert_eq!((r.max_output, r.stream), (64, true));
        let raw = json!({"model": "text-embedding-3-small", "input": "hi"});
        let r = read(NativeApi::OpenAiEmbeddings, raw.clone());
        assert_eq!((r.max_output, r.body.clone()), (0, raw.to_string().into_bytes()));
        let r = read(
            NativeApi::AnthropicCountTokens,
            json!({"model": "claude-haiku-5-5", "messages": []}),
        );
        assert_eq!((r.max_output, r.stream), (0, false));
        let r = read(
            NativeApi::OpenAiChat,
            json!({"model": "gpt-6-luna", "messages": [], "stream": true}),
        );
        assert!(r.hide_usage_chunk);
        let sent: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true);
        assert_eq!(
            read_native_request(NativeApi::OpenAiResponses, b"{", None),
            Err(NativeRequestError::NotJson)
        );
        assert!(read_native_request(
            NativeApi::OpenAiResponses,
            br#"{"model":"m","input":"x","background":true}"#,
            None
        )
        .is_err());
    }

    #[test]
    fn calls_go_where_the_worker_lets_them() {
        let cases = [
            (NativeApi::AnthropicMessages, "/v1/messages"),
            (NativeApi::AnthropicCountTokens, "/v1/messages/count_tokens"),
            (NativeApi::OpenAiChat, "/v1/chat/completions"),
            (NativeApi::OpenAiResponses, "/v1/responses"),
            (NativeApi::OpenAiEmbeddings, "/v1/embeddings"),
            (
                NativeApi::GoogleGenerate(GoogleVersion::V1),
                "/v1/models/gemini-3.8-flash:generateContent",
            ),
            (
                NativeApi::GoogleGenerate(GoogleVersion::V1Beta),
                "/v1beta/models/gemini-3.8-flash:generateContent",
            ),
        ];
        for (api, path) in cases {
            let req = read(api, json!({"model": "m", "max_tokens": 5, "messages": []}));
            let call = native_call(&req, |_| None);
            assert_eq!(call.path_and_query, path);
            assert!(
                path_allowed(api.provider(), call.method, &call.path_and_query),
                "{path}"
            );
        }
        let mut req = read(NativeApi::GoogleGenerate(GoogleVersion::V1), json!({}));
        req.stream = true;
        let call = native_call(&req, |_| None);
        assert_eq!(
            call.path_and_query,
            "/v1/models/gemini-3.8-flash:streamGenerateContent?alt=sse"
        );
        assert!(path_allowed(Provider::Google, HttpMethod::Post, &call.path_and_query));
        // Anthropic's own headers travel on; nothing else does.
        let req = read(NativeApi::AnthropicCountTokens, json!({"model": "m", "messages": []}));
        let call = native_call(&req, |h| (h == "anthropic-beta").then(|| "x".to_owned()));
        assert_eq!(
            call.headers,
            [
                ("content-type".to_owned(), "application/json".to_owned()),
                ("anthropic-version".to_owned(), ANTHROPIC_VERSION.to_owned()),
                ("anthropic-beta".to_owned(), "x".to_owned()),
            ]
        );
    }

    #[test]
    fn answers_give_their_usage() {
        let count = parse_native(NativeApi::AnthropicCountTokens, 200, br#"{"input_tokens": 14}"#).unwrap();
        assert_eq!(
            count.usage,
            Usage {
                input_tokens: 14,
                output_tokens: 0
            }
        );
        let emb = parse_native(
            NativeApi::OpenAiEmbeddings,
            200,
            br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":3,"total_tokens":3}}"#,
        )
        .unwrap();
        assert_eq!(emb.usage.input_tokens, 3);
        let resp = parse_native(
            NativeApi::OpenAiResponses,
            200,
            br#"{"id":"resp_1","object":"response","status":"completed","model":"gpt-6-luna","output":[],"usage":{"input_tokens":12,"output_tokens":2,"total_tokens":14}}"#,
        )
        .unwrap();
        assert_eq!((resp.id.as_str(), resp.usage.output_tokens), ("resp_1", 2));
        let f = parse_native(NativeApi::OpenAiEmbeddings, 200, b"{}").unwrap_err();
        assert_eq!(f.diagnosis, Diagnosis::MalformedResponse);
        let f = parse_native(
            NativeApi::AnthropicCountTokens,
            404,
            br#"{"type":"error","error":{"type":"not_found_error","message":"model: x"}}"#,
        )
        .unwrap_err();
        assert!(f.is_model_not_found());
    }

    #[test]
    fn refusals_use_each_sdks_envelope() {
        let body = |p, code, m| String::from_utf8(native_refusal(p, code, m).body).unwrap();
        assert_eq!(
            body(Provider::Anthropic, ErrorCode::SharedPoolUnavailable, "no shared key"),
            r#"{"error":{"message":"no shared key","type":"api_error"},"type":"error"}"#
        );
        assert_eq!(
            body(Provider::OpenAi, ErrorCode::SharedQuotaExhausted, "spent"),
            r#"{"error":{"code":"insufficient_quota","message":"spent","param":null,"type":"insufficient_quota"}}"#
        );
        assert_eq!(
            body(Provider::OpenAi, ErrorCode::ModelRetired, "retired"),
            r#"{"error":{"code":"model_retired","message":"retired","param":null,"type":"invalid_request_error"}}"#
        );
        assert_eq!(
            body(Provider::Google, ErrorCode::SharedPoolUnavailable, "no shared key"),
            r#"{"error":{"code":503,"message":"no shared key","status":"FAILED_PRECONDITION"}}"#
        );
        assert_eq!(native_refusal(Provider::Google, ErrorCode::NotFound, "x").status, 404);
        // A bad token is explained with the SDK's own key header.
        for (p, header) in [
            (Provider::Anthropic, "x-api-key"),
            (Provider::OpenAi, "Authorization: Bearer"),
            (Provider::Google, "x-goog-api-key"),
        ] {
            let r = native_refusal(p, ErrorCode::Unauthorized, "a valid token is required");
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            let message = v.pointer("/error/message").and_then(Value::as_str).unwrap();
            assert_eq!(
                message,
                format!("a valid keyward token is required as this SDK's API key (sent in {header}: kw_…)")
            );
            assert_eq!(r.status, 401);
        }
    }

    #[test]
    fn model_lists_use_each_sdks_shape() {
        let entry = |id: &str, name: &str| -> ModelEntry {
            serde_json::from_value(json!({"id": id, "name": name, "input_per_mtok": 1, "output_per_mtok": 1})).unwrap()
        };
        let (a, b) = (entry("m-1", "M One"), entry("m-2", "M Two"));
        let list = |p| String::from_utf8(native_model_list(p, &[&a, &b]).body).unwrap();
        assert_eq!(
            list(Provider::Anthropic),
            r#"{"data":[{"created_at":"2024-01-01T00:00:00Z","display_name":"M One","id":"m-1","type":"model"},{"created_at":"2024-01-01T00:00:00Z","display_name":"M Two","id":"m-2","type":"model"}],"first_id":"m-1","has_more":false,"last_id":"m-2"}"#
        );
        assert_eq!(
            list(Provider::OpenAi),
            r#"{"data":[{"created":0,"id":"m-1","object":"model","owned_by":"openai"},{"created":0,"id":"m-2","object":"model","owned_by":"openai"}],"object":"list"}"#
        );
        assert_eq!(
            list(Provider::Google),
            r#"{"models":[{"displayName":"M One","name":"models/m-1","supportedGenerationMethods":["generateContent","streamGenerateContent"]},{"displayName":"M Two","name":"models/m-2","supportedGenerationMethods":["generateContent","streamGenerateContent"]}]}"#
        );
        assert_eq!(native_model_list(Provider::OpenAi, &[]).status, 200);
    }

    #[test]
    fn an_unknown_provider_is_told_which_there_are() {
        assert_eq!(
            unknown_provider_message(),
            "unknown provider: expected anthropic, openai or google"
        );
    }

    #[test]
    fn keys_come_from_each_sdk_header() {
        let from = |pairs: &[(&'static str, &'static str)]| {
            let pairs = pairs.to_vec();
            sdk_key(move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)).map(str::to_owned)
        };
        assert_eq!(from(&[("x-api-key", "kw_a")]).as_deref(), Some("kw_a"));
        assert_eq!(from(&[("authorization", "Bearer kw_b")]).as_deref(), Some("kw_b"));
        assert_eq!(from(&[("x-goog-api-key", " kw_c ")]).as_deref(), Some("kw_c"));
        assert_eq!(from(&[]), None);
        assert_eq!(from(&[("authorization", "Basic x")]), None);
        assert_eq!(
            from(&[("x-api-key", " "), ("authorization", "Bearer kw_d")]).as_deref(),
            Some("kw_d")
        );
        // A header carrying only a key wins over the general Authorization header.
        assert_eq!(
            from(&[("authorization", "Bearer kw_b"), ("x-goog-api-key", "kw_c")]).as_deref(),
            Some("kw_c")
        );
    }

    /// Feeds `stream` to a [`NativeStream`] hiding the usage chunk, cut at `cuts`, and returns
    /// what the client sees.
    fn relayed(stream: &[u8], cuts: &[usize]) -> Vec<u8> {
        let req = read(
            NativeApi::OpenAiChat,
            json!({"model": "m", "messages": [], "stream": true}),
        );
        assert!(req.hide_usage_chunk);
        let mut relay = NativeStream::new(&req);
        let mut out = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain([stream.len()].iter()) {
            let chunk = &stream[from..cut];
            out.extend(relay.feed(chunk).unwrap());
            from = cut;
        }
        out.extend(relay.rest());
        out
    }

    const HI: &str = r#"data: {"choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}"#;
    const USAGE: &str = r#"data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#;

    #[test]
    fn the_usage_chunk_is_hidden_wherever_the_stream_is_cut() {
        for eol in ["\n", "\r\n", "\r"] {
            let stream = format!("{HI}{eol}{eol}{USAGE}{eol}{eol}data: [DONE]{eol}{eol}");
            let expected = format!("{HI}{eol}{eol}data: [DONE]{eol}{eol}");
            let bytes = stream.as_bytes();
            for cut in 0..=bytes.len() {
                assert_eq!(
                    String::from_utf8(relayed(bytes, &[cut])).unwrap(),
                    expected,
                    "{eol:?} cut at {cut}"
                );
            }
            for i in (0..=bytes.len()).step_by(7) {
                for j in i..=bytes.len() {
                    assert_eq!(relayed(bytes, &[i, j]), expected.as_bytes(), "{eol:?} cut at {i},{j}");
                }
            }
        }
    }

    #[test]
    fn everything_else_passes_byte_for_byte() {
        // Comments, extra blank lines, a BOM, `event:` and `id:` fields, mixed line endings.
        let stream =
            format!("\u{feff}: hello\n\n\n{HI}\r\nid: 1\r\n\r\nevent: x\ndata: 2\n\n{USAGE}\n\ndata: [DONE]\n\n");
        let expected = stream.replace(&format!("{USAGE}\n\n"), "");
        let bytes = stream.as_bytes();
        for cut in 0..=bytes.len() {
            assert_eq!(relayed(bytes, &[cut]), expected.as_bytes(), "cut at {cut}");
        }
        // An incomplete last event still reaches the client at the end.
        assert_eq!(relayed(b"data: {\"cho", &[3]), b"data: {\"cho");
        // A client that asked for usage sees it: nothing is filtered.
        let req = read(
            NativeApi::OpenAiChat,
            json!({"model": "m", "messages": [], "stream": true, "stream_options": {"include_usage": true}}),
        );
        let mut relay = NativeStream::new(&req);
        assert_eq!(relay.feed(stream.as_bytes()), None);
        assert!(relay.rest().is_empty());
    }

    #[test]
    fn an_oversized_event_stops_the_filtering_not_the_relay() {
        let mut relay = NativeStream::new(&read(
            NativeApi::OpenAiChat,
            json!({"model": "m", "messages": [], "stream": true}),
        ));
        let big = vec![b'a'; 1024 * 1024];
        let mut out = relay.feed(b"data: ").unwrap();
        for _ in 0..5 {
            out.extend(relay.feed(&big).unwrap());
        }
        // Past the bound nothing more is held: bytes pass on as they come.
        assert_eq!(out.len(), 6 + 5 * big.len());
        let tail = format!("\n\n{USAGE}\n\n");
        assert_eq!(relay.feed(tail.as_bytes()).unwrap(), tail.as_bytes());
        assert!(relay.rest().is_empty());
        assert!(relay.finish().is_err());
    }

    #[test]
    fn a_stream_reads_its_usage_on_the_way() {
        let stream = format!("{HI}\n\n{USAGE}\n\ndata: [DONE]\n\n");
        let mut relay = NativeStream::new(&read(
            NativeApi::OpenAiChat,
            json!({"model": "m", "messages": [], "stream": true}),
        ));
        relay.feed(stream.as_bytes());
        assert!(relay.is_complete());
        assert_eq!(
            relay.finish().unwrap().usage,
            Usage {
                input_tokens: 1,
                output_tokens: 1
            }
        );
    }
}
