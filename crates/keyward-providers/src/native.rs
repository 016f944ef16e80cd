//! The provider APIs the native pass-through carries, as each official SDK calls them: which
//! request is which, what keyward reads from (and bounds in) its body, where it goes, and how
//! to read the usage of its answer.
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

use keyward_core::{ModelKind, Provider};
use serde_json::{json, Value};

use crate::call::{model_id_is_safe, HttpCall, HttpMethod, ANTHROPIC_VERSION};
use crate::failure::{diagnose, ProviderFailure};
use crate::response::{json_problem, parse_chat, Usage};

/// The output bound keyward sets when a native request names none: a shared-pool call is
/// reserved by its bound, so the provider must not produce more than was reserved.
pub const DEFAULT_MAX_OUTPUT: u32 = 4096;

/// Google's API versions, both carried (google-genai 3.x calls `v1`, older SDKs `v1beta`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GoogleVersion {
    V1,
    V1Beta,
}

impl GoogleVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            GoogleVersion::V1 => "v1",
            GoogleVersion::V1Beta => "v1beta",
        }
    }
}

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

/// What the pass-through carries for `provider`, in words, for refusals of anything else.
pub fn native_routes(provider: Provider) -> &'static str {
    match provider {
        Provider::Anthropic => "POST /v1/messages, POST /v1/messages/count_tokens and GET /v1/models",
        Provider::OpenAi => "POST /v1/chat/completions, POST /v1/responses, POST /v1/embeddings and GET /v1/models",
        Provider::Google => {
            "POST /v1/models/{model}:generateContent, POST /v1/models/{model}:streamGenerateContent?alt=sse \
             (the same under /v1beta) and GET /v1/models (or /v1beta/models)"
        }
    }
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

fn invalid(m: impl Into<String>) -> NativeRequestError {
    NativeRequestError::Invalid(m.into())
}

fn as_u32(v: Option<&Value>) -> Option<u32> {
    v.and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok())
}

fn model_of(obj: &serde_json::Map<String, Value>) -> Result<String, NativeRequestError> {
    obj.get("model")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| invalid("model: required"))
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
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    // Whether keyward changed the body (and so must forward its own serialization).
    let mut changed = false;
    let mut hide_usage_chunk = false;
    let (model, max_output, stream) = match api {
        NativeApi::AnthropicMessages => {
            let max = as_u32(obj.get("max_tokens")).ok_or_else(|| invalid("max_tokens: required"))?;
            (model_of(obj)?, max, stream)
        }
        NativeApi::AnthropicCountTokens => (model_of(obj)?, 0, false),
        NativeApi::OpenAiChat => {
            if obj.get("n").and_then(Value::as_u64).is_some_and(|n| n != 1) {
                return Err(invalid("n: keyward relays one choice per call (n must be 1)"));
            }
            let max = match as_u32(obj.get("max_completion_tokens")).or_else(|| as_u32(obj.get("max_tokens"))) {
                Some(n) => n,
                None => {
                    obj.insert("max_completion_tokens".into(), json!(DEFAULT_MAX_OUTPUT));
                    changed = true;
                    DEFAULT_MAX_OUTPUT
                }
            };
            if stream {
                let asked = obj
                    .get("stream_options")
                    .and_then(|o| o.get("include_usage"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                if !asked {
                    // Metering needs the usage; the client did not ask for it, so it will not see it.
                    let opts = obj.entry("stream_options").or_insert_with(|| json!({}));
                    if let Some(o) = opts.as_object_mut() {
                        o.insert("include_usage".into(), Value::Bool(true));
                    }
                    hide_usage_chunk = true;
                    changed = true;
                }
            }
            (model_of(obj)?, max, stream)
        }
        NativeApi::OpenAiResponses => {
            if obj.get("background").and_then(Value::as_bool) == Some(true) {
                return Err(invalid(
                    "background: keyward relays a response while it is made (background responses are not carried)",
                ));
            }
            let max = match as_u32(obj.get("max_output_tokens")) {
                Some(n) => n,
                None => {
                    obj.insert("max_output_tokens".into(), json!(DEFAULT_MAX_OUTPUT));
                    changed = true;
                    DEFAULT_MAX_OUTPUT
                }
            };
            (model_of(obj)?, max, stream)
        }
        NativeApi::OpenAiEmbeddings => (model_of(obj)?, 0, false),
        NativeApi::GoogleGenerate(_) => {
            let (model, stream) = google.unwrap_or_default();
            let config = obj.entry("generationConfig").or_insert_with(|| json!({}));
            let config = config
                .as_object_mut()
                .ok_or_else(|| invalid("generationConfig must be an object"))?;
            if config
                .get("candidateCount")
                .and_then(Value::as_u64)
                .is_some_and(|n| n != 1)
            {
                return Err(invalid(
                    "candidateCount: keyward relays one candidate per call (it must be 1)",
                ));
            }
            let max = match as_u32(config.get("maxOutputTokens")) {
                Some(n) => n,
                None => {
                    config.insert("maxOutputTokens".into(), json!(DEFAULT_MAX_OUTPUT));
                    changed = true;
                    DEFAULT_MAX_OUTPUT
                }
            };
            (model.to_owned(), max, stream)
        }
    };
    let body = if changed {
        serde_json::to_vec(&v).map_err(|_| NativeRequestError::NotJson)?
    } else {
        raw.to_vec()
    };
    Ok(NativeRequest {
        api,
        body,
        model,
        max_output,
        stream,
        hide_usage_chunk,
    })
}

/// The provider call for a native request: its path, the body, and the non-secret headers
/// it may carry. Of the client's headers only Anthropic's `anthropic-version` (default
/// 2023-06-01) and `anthropic-beta` travel on; anything else a client sent stays here.
pub fn native_call(req: &NativeRequest, client_header: impl Fn(&str) -> Option<String>) -> HttpCall {
    let path = match req.api {
        NativeApi::AnthropicMessages => "/v1/messages".to_owned(),
        NativeApi::AnthropicCountTokens => "/v1/messages/count_tokens".to_owned(),
        NativeApi::OpenAiChat => "/v1/chat/completions".to_owned(),
        NativeApi::OpenAiResponses => "/v1/responses".to_owned(),
        NativeApi::OpenAiEmbeddings => "/v1/embeddings".to_owned(),
        NativeApi::GoogleGenerate(version) => {
            // An unsafe model id is percent-encoded so it cannot change the path; the
            // worker's allowlist then refuses the call.
            let model = crate::call::model_path_segment(&req.model);
            if req.stream {
                format!("/{}/models/{model}:streamGenerateContent?alt=sse", version.as_str())
            } else {
                format!("/{}/models/{model}:generateContent", version.as_str())
            }
        }
    };
    let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
    if req.api.provider() == Provider::Anthropic {
        let version = client_header("anthropic-version").unwrap_or_else(|| ANTHROPIC_VERSION.to_owned());
        headers.push(("anthropic-version".to_owned(), version));
        if let Some(beta) = client_header("anthropic-beta") {
            headers.push(("anthropic-beta".to_owned(), beta));
        }
    }
    HttpCall {
        method: HttpMethod::Post,
        path_and_query: path,
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
    let provider = api.provider();
    match api {
        NativeApi::AnthropicMessages | NativeApi::OpenAiChat | NativeApi::GoogleGenerate(_) => {
            parse_chat(provider, status, body).map(|a| NativeAnswer {
                id: a.id,
                usage: a.usage,
            })
        }
        _ => {
            if !(200..300).contains(&status) {
                return Err(diagnose(provider, status, body));
            }
            let v: Value = serde_json::from_slice(body)
                .map_err(|e| ProviderFailure::malformed(provider, Some(status), json_problem(&e)))?;
            let not_an_answer = || {
                ProviderFailure::malformed(
                    provider,
                    Some(status),
                    "JSON that is not the API's answer (fields missing or of the wrong type)",
                )
            };
            let u64_at = |p: &str| v.pointer(p).and_then(Value::as_u64);
            match api {
                // `{"input_tokens": N}`.
                NativeApi::AnthropicCountTokens => Ok(NativeAnswer {
                    id: String::new(),
                    usage: Usage {
                        input_tokens: u64_at("/input_tokens").ok_or_else(not_an_answer)?,
                        output_tokens: 0,
                    },
                }),
                NativeApi::OpenAiResponses => crate::openai::parse_response(status, &v).ok_or_else(not_an_answer)?,
                // `{"object": "list", "data": [...], "model", "usage": {"prompt_tokens", "total_tokens"}}`.
                NativeApi::OpenAiEmbeddings => Ok(NativeAnswer {
                    id: String::new(),
                    usage: Usage {
                        input_tokens: u64_at("/usage/prompt_tokens").ok_or_else(not_an_answer)?,
                        output_tokens: 0,
                    },
                }),
                _ => Err(not_an_answer()),
            }
        }
    }
}

/// Why a Google `models/{model}:{action}` call is not carried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GoogleActionError {
    /// A method keyward does not carry (`countTokens`, `embedContent`, …).
    #[error("{0}")]
    NotCarried(String),
    /// A malformed path or query.
    #[error("{0}")]
    Invalid(String),
}

/// Whether a Google model path segment and action are carried: `{model}:generateContent`
/// or `{model}:streamGenerateContent` with `?alt=sse`. Returns the model and whether it
/// streams, or why not.
pub fn google_action<'a>(model_action: &'a str, query: Option<&str>) -> Result<(&'a str, bool), GoogleActionError> {
    let Some((model, action)) = model_action.rsplit_once(':') else {
        return Err(GoogleActionError::Invalid(
            "expected models/{model}:generateContent or :streamGenerateContent".to_owned(),
        ));
    };
    if !model_id_is_safe(model) {
        return Err(GoogleActionError::Invalid(format!("{model:?} is not a model id")));
    }
    match (action, query) {
        ("generateContent", None) => Ok((model, false)),
        ("streamGenerateContent", Some("alt=sse")) => Ok((model, true)),
        ("streamGenerateContent", _) => Err(GoogleActionError::Invalid(
            "keyward relays streamGenerateContent as server-sent events only: add ?alt=sse".to_owned(),
        )),
        (other, _) => Err(GoogleActionError::NotCarried(format!(
            "{other} is not carried by keyward's Google AI (Gemini) pass-through: it carries {}",
            native_routes(Provider::Google)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{path_allowed, Diagnosis};

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
    fn google_actions() {
        assert_eq!(
            google_action("gemini-3.8-flash:generateContent", None),
            Ok(("gemini-3.8-flash", false))
        );
        assert_eq!(
            google_action("gemini-3.8-flash:streamGenerateContent", Some("alt=sse")),
            Ok(("gemini-3.8-flash", true))
        );
        assert!(google_action("gemini-3.8-flash:streamGenerateContent", None).is_err());
        assert!(matches!(
            google_action("gemini-3.8-flash:countTokens", None),
            Err(GoogleActionError::NotCarried(m)) if m.contains("generateContent")
        ));
        assert!(google_action("../x:generateContent", None).is_err());
    }
}
