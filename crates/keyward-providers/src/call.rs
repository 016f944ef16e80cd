//! Provider HTTP calls without their key: what to send, where the key goes, and what a worker
//! may send at all (paths, request headers) and pass back (answer headers). The provider
//! modules hold each provider's part; this module dispatches to them.

use keyward_core::Provider;
use serde::{Deserialize, Serialize};

use crate::wire::wire;

/// The one user message a key test sends.
pub const PROBE_PROMPT: &str = "ping";

/// Longest model id keyward puts on a wire.
const MAX_MODEL_ID_LEN: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatRole {
    User,
    Assistant,
}

impl ChatRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ChatRole::User => "user",
            ChatRole::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: ChatRole,
    pub content: String,
}

/// A provider-neutral chat request. `system: Some("")` is treated as no system prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub system: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: u32,
    pub temperature: Option<f32>,
    pub stream: bool,
}

impl ChatRequest {
    /// The system prompt, if there is a non-empty one.
    pub(crate) fn system_prompt(&self) -> Option<&str> {
        self.system.as_deref().filter(|s| !s.is_empty())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpMethod {
    Post,
    Get,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Post => "POST",
            HttpMethod::Get => "GET",
        }
    }
}

/// A provider HTTP call without its key.
///
/// `path_and_query` is relative to the provider's base URL and starts with `/`. `headers` hold
/// only non-secret headers (names in lower case); the worker adds the key as
/// [`key_placement`] says, and must refuse the call unless [`path_allowed`] accepts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    pub method: HttpMethod,
    pub path_and_query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpCall {
    pub(crate) fn post_json(path_and_query: String, extra: &[(&str, &str)], body: Vec<u8>) -> HttpCall {
        let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
        headers.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        HttpCall {
            method: HttpMethod::Post,
            path_and_query,
            headers,
            body,
        }
    }
}

/// The call for one chat answer (plain or streamed, as `req.stream` says).
///
/// - Anthropic: `POST /v1/messages` with `anthropic-version: 2023-06-01`.
/// - OpenAI: `POST /v1/chat/completions`; the system prompt becomes the first message; a
///   streamed call asks for the final usage chunk (`stream_options.include_usage`).
/// - Google: `POST /v1beta/models/{model}:generateContent`, or
///   `:streamGenerateContent?alt=sse` when streamed. A model id that is not
///   [`model_id_is_safe`] is percent-encoded, so it cannot change the path, and the resulting
///   path is refused by [`path_allowed`].
pub fn build_chat(provider: Provider, req: &ChatRequest) -> HttpCall {
    wire(provider).chat_call(req)
}

/// One minimal generation for "Test key": one user message `ping`, one output token
/// (Anthropic `max_tokens: 1`, OpenAI `max_completion_tokens: 1`, Google
/// `generationConfig.maxOutputTokens: 1`), not streamed.
pub fn build_probe(provider: Provider, model: &str) -> HttpCall {
    build_chat(
        provider,
        &ChatRequest {
            model: model.to_owned(),
            system: None,
            messages: vec![ChatMessage {
                role: ChatRole::User,
                content: PROBE_PROMPT.to_owned(),
            }],
            max_tokens: 1,
            temperature: None,
            stream: false,
        },
    )
}

/// Models asked for per page of a listing: the most Anthropic and Google return at once.
pub const MODELS_PAGE_SIZE: u32 = 1000;

/// One page of the provider's free model listing, after `page` (the token the previous page
/// gave, see [`crate::ModelPage::next`]):
/// - Anthropic: `GET /v1/models?limit=1000[&after_id=…]` with `anthropic-version`;
/// - OpenAI: `GET /v1/models` (one page);
/// - Google: `GET /v1beta/models?pageSize=1000[&pageToken=…]`.
///
/// A page token is percent-encoded unless it is plain `[A-Za-z0-9._~-]`, so it can only ever
/// be one query value.
pub fn build_list_models(provider: Provider, page: Option<&str>) -> HttpCall {
    let token = page.map(percent_encode_query_value);
    wire(provider).list_models_call(token.as_deref())
}

/// A `GET` of `path_and_query` with `headers`, no body.
pub(crate) fn get(path_and_query: String, headers: &[(&str, &str)]) -> HttpCall {
    HttpCall {
        method: HttpMethod::Get,
        path_and_query,
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        body: Vec::new(),
    }
}

fn percent_encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A page token as [`build_list_models`] writes it: 1–512 of `[A-Za-z0-9._~-]` or `%XX`.
fn page_token_is_safe(token: &str) -> bool {
    let b = token.as_bytes();
    if b.is_empty() || b.len() > 512 {
        return false;
    }
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = |j: usize| b.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return false;
            }
            i += 3;
        } else if c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'~' | b'-') {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// Whether `query` is a model listing's: exactly `{size_name}=1000`, optionally followed by
/// `&{token_name}=<safe token>`.
pub(crate) fn listing_query_allowed(query: Option<&str>, size_name: &str, token_name: &str) -> bool {
    let Some(q) = query else { return true };
    let first = format!("{size_name}={MODELS_PAGE_SIZE}");
    match q.split_once('&') {
        None => q == first,
        Some((size, rest)) => {
            size == first
                && rest
                    .strip_prefix(token_name)
                    .and_then(|r| r.strip_prefix('='))
                    .is_some_and(page_token_is_safe)
        }
    }
}

/// Where a provider wants its key: the header name and what precedes the key in its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPlacement {
    pub header: &'static str,
    pub value_prefix: &'static str,
}

/// Where `provider` wants its key.
pub fn key_placement(provider: Provider) -> KeyPlacement {
    wire(provider).key_placement()
}

/// The response header carrying the provider's request id. Google sends none: its id is the
/// `responseId` field of the body (see [`ChatResponse::id`](crate::ChatResponse)).
pub fn request_id_header(provider: Provider) -> Option<&'static str> {
    wire(provider).request_id_header()
}

/// Request headers any provider call may carry besides the key.
const COMMON_REQUEST_HEADERS: [&str; 2] = ["content-type", "accept"];

/// Answer headers passed back from any provider: the content type, when to retry, and a
/// redirect's target (keyward follows none, but diagnoses it).
const COMMON_ANSWER_HEADERS: [&str; 3] = ["content-type", "retry-after", "location"];

/// Whether a provider call may carry request header `name` (any case) besides the key: the
/// common ones and every provider's own (Anthropic's `anthropic-version`, `anthropic-beta`).
/// The worker checks this again on every call, trusting nothing the gateway sends.
///
/// The list is the same for every provider, as it was when the worker kept it; the calls
/// this crate builds carry only their own provider's headers.
pub fn request_header_allowed(name: &str) -> bool {
    Provider::ALL
        .iter()
        .flat_map(|p| wire(*p).own_request_headers())
        .chain(&COMMON_REQUEST_HEADERS)
        .any(|allowed| name.eq_ignore_ascii_case(allowed))
}

/// Whether the worker passes answer header `name` (lower case) back to the gateway: the
/// common ones and every provider's request ids and rate limits (`request-id`,
/// `x-request-id`, `openai-processing-ms`, `anthropic-ratelimit-*`, `x-ratelimit-*`).
pub fn answer_header_kept(name: &str) -> bool {
    COMMON_ANSWER_HEADERS.contains(&name) || Provider::ALL.iter().any(|p| wire(*p).keeps_own_answer_header(name))
}

/// Whether `model` may appear as a path segment: 1–256 of `[A-Za-z0-9._-]`, not `.`, and no `..`.
pub fn model_id_is_safe(model: &str) -> bool {
    !model.is_empty()
        && model.len() <= MAX_MODEL_ID_LEN
        && model != "."
        && !model.contains("..")
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The exact allowlist of calls a worker may send for `provider`:
///
/// - Anthropic: `POST /v1/messages`, `POST /v1/messages/count_tokens`,
///   `GET /v1/models[?limit=1000[&after_id=…]]`.
/// - OpenAI: `POST /v1/chat/completions`, `POST /v1/responses`, `POST /v1/embeddings`,
///   `GET /v1/models`.
/// - Google: `POST /v1beta/models/{model}:generateContent`,
///   `POST /v1beta/models/{model}:streamGenerateContent` with no query or exactly `?alt=sse`,
///   the same two under `/v1/models/` (google-genai 3.x calls `v1`),
///   `GET /v1beta/models[?pageSize=1000[&pageToken=…]]`; `{model}` must be [`model_id_is_safe`].
///
/// Anything else is refused: other paths or methods, any other query (so never `key=`),
/// an empty query (`…?`), fragments, percent-encoding outside a page token, `..`, `//`.
pub fn path_allowed(provider: Provider, method: HttpMethod, path_and_query: &str) -> bool {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    wire(provider).path_allowed(method, path, query)
}

/// `model` as a path segment: unchanged when safe, else every byte outside `[A-Za-z0-9_-]`
/// percent-encoded (dots too, so `..` cannot survive), which `path_allowed` then refuses.
pub(crate) fn model_path_segment(model: &str) -> String {
    if model_id_is_safe(model) {
        return model.to_owned();
    }
    let mut out = String::with_capacity(model.len() * 3);
    for b in model.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        // An empty model id must not collapse the path to `/v1beta/models/:…`.
        out.push_str("%00");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn req(stream: bool) -> ChatRequest {
        ChatRequest {
            model: "m-1".to_owned(),
            system: Some("Be brief.".to_owned()),
            messages: vec![
                ChatMessage {
                    role: ChatRole::User,
                    content: "Hi there".to_owned(),
                },
                ChatMessage {
                    role: ChatRole::Assistant,
                    content: "Hello".to_owned(),
                },
                ChatMessage {
                    role: ChatRole::User,
                    content: "Write a haiku".to_owned(),
                },
            ],
            max_tokens: 300,
            temperature: Some(0.7),
            stream,
        }
    }

    fn header<'a>(call: &'a HttpCall, name: &str) -> Option<&'a str> {
        call.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn anthropic_chat_is_exact() {
        let call = build_chat(Provider::Anthropic, &req(false));
        assert_eq!(call.method, HttpMethod::Post);
        assert_eq!(call.path_and_query, "/v1/messages");
        assert_eq!(header(&call, "content-type"), Some("application/json"));
        assert_eq!(header(&call, "anthropic-version"), Some("2023-06-01"));
        assert_eq!(
            String::from_utf8(call.body).unwrap(),
            r#"{"model":"m-1","max_tokens":300,"messages":[{"role":"user","content":"Hi there"},{"role":"assistant","content":"Hello"},{"role":"user","content":"Write a haiku"}],"system":"Be brief.","temperature":0.7}"#
        );
        let streamed: Value = serde_json::from_slice(&build_chat(Provider::Anthropic, &req(true)).body).unwrap();
        assert_eq!(streamed["stream"], json!(true));
    }

    #[test]
    fn anthropic_omits_what_was_not_asked() {
        let mut r = req(false);
        r.system = Some(String::new());
        r.temperature = None;
        let body: Value = serde_json::from_slice(&build_chat(Provider::Anthropic, &r).body).unwrap();
        let keys: Vec<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["max_tokens", "messages", "model"]);
    }

    #[test]
    fn openai_chat_is_exact() {
        let call = build_chat(Provider::OpenAi, &req(false));
        assert_eq!(call.path_and_query, "/v1/chat/completions");
        assert_eq!(
            call.headers,
            [("content-type".to_owned(), "application/json".to_owned())]
        );
        assert_eq!(
            String::from_utf8(call.body).unwrap(),
            r#"{"model":"m-1","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi there"},{"role":"assistant","content":"Hello"},{"role":"user","content":"Write a haiku"}],"max_completion_tokens":300,"temperature":0.7}"#
        );
        let streamed = build_chat(Provider::OpenAi, &req(true));
        assert_eq!(
            String::from_utf8(streamed.body).unwrap(),
            r#"{"model":"m-1","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi there"},{"role":"assistant","content":"Hello"},{"role":"user","content":"Write a haiku"}],"max_completion_tokens":300,"temperature":0.7,"stream":true,"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn google_chat_is_exact() {
        let call = build_chat(Provider::Google, &req(false));
        assert_eq!(call.path_and_query, "/v1beta/models/m-1:generateContent");
        assert_eq!(
            call.headers,
            [("content-type".to_owned(), "application/json".to_owned())]
        );
        assert_eq!(
            String::from_utf8(call.body).unwrap(),
            r#"{"contents":[{"role":"user","parts":[{"text":"Hi there"}]},{"role":"model","parts":[{"text":"Hello"}]},{"role":"user","parts":[{"text":"Write a haiku"}]}],"systemInstruction":{"parts":[{"text":"Be brief."}]},"generationConfig":{"maxOutputTokens":300,"temperature":0.7}}"#
        );
        let streamed = build_chat(Provider::Google, &req(true));
        assert_eq!(
            streamed.path_and_query,
            "/v1beta/models/m-1:streamGenerateContent?alt=sse"
        );
        assert_eq!(streamed.body, build_chat(Provider::Google, &req(false)).body);
    }

    #[test]
    fn probes_ask_for_exactly_one_token() {
        let a: Value =
            serde_json::from_slice(&build_probe(Provider::Anthropic, "claude-3-haiku-20240307").body).unwrap();
        assert_eq!(
            a,
            json!({"model": "claude-3-haiku-20240307", "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]})
        );
        let o: Value = serde_json::from_slice(&build_probe(Provider::OpenAi, "gpt-4o-mini").body).unwrap();
        assert_eq!(
            o,
            json!({"model": "gpt-4o-mini", "max_completion_tokens": 1, "messages": [{"role": "user", "content": "ping"}]})
        );
        let g_call = build_probe(Provider::Google, "gemini-1.5-flash");
        assert_eq!(g_call.path_and_query, "/v1beta/models/gemini-1.5-flash:generateContent");
        let g: Value = serde_json::from_slice(&g_call.body).unwrap();
        assert_eq!(
            g,
            json!({"contents": [{"role": "user", "parts": [{"text": "ping"}]}], "generationConfig": {"maxOutputTokens": 1}})
        );
        for p in Provider::ALL {
            let call = build_probe(p, "x");
            assert_eq!(call.method, HttpMethod::Post);
            assert!(path_allowed(p, call.method, &call.path_and_query), "{p}");
        }
    }

    #[test]
    fn no_call_carries_a_key_slot() {
        for p in Provider::ALL {
            let placement = key_placement(p);
            let calls = [
                build_chat(p, &req(false)),
                build_chat(p, &req(true)),
                build_probe(p, "m"),
                build_list_models(p, None),
                build_list_models(p, Some("next-page")),
            ];
            for call in calls {
                assert!(call.headers.iter().all(|(k, _)| k != placement.header
                    && k != "authorization"
                    && k != "x-api-key"
                    && k != "x-goog-api-key"));
                assert!(!call.path_and_query.contains("key"), "{p}: {}", call.path_and_query);
                let body = String::from_utf8(call.body).unwrap();
                assert!(!body.contains("key"), "{p}: {body}");
                assert!(call.headers.iter().all(|(k, _)| k == &k.to_ascii_lowercase()));
            }
        }
    }

    #[test]
    fn key_placement_and_request_ids() {
        assert_eq!(
            key_placement(Provider::Anthropic),
            KeyPlacement {
                header: "x-api-key",
                value_prefix: ""
            }
        );
        assert_eq!(
            key_placement(Provider::OpenAi),
            KeyPlacement {
                header: "authorization",
                value_prefix: "Bearer "
            }
        );
        assert_eq!(
            key_placement(Provider::Google),
            KeyPlacement {
                header: "x-goog-api-key",
                value_prefix: ""
            }
        );
        assert_eq!(request_id_header(Provider::Anthropic), Some("request-id"));
        assert_eq!(request_id_header(Provider::OpenAi), Some("x-request-id"));
        assert_eq!(request_id_header(Provider::Google), None);
    }

    #[test]
    fn list_models_calls_are_allowed() {
        for p in Provider::ALL {
            for page in [None, Some("tok_1"), Some("a/b+c==&key=x"), Some("ü")] {
                let call = build_list_models(p, page);
                assert_eq!(call.method, HttpMethod::Get);
                assert!(call.body.is_empty());
                assert!(
                    path_allowed(p, HttpMethod::Get, &call.path_and_query),
                    "{}",
                    call.path_and_query
                );
                assert!(!call.path_and_query.contains("&key="), "{}", call.path_and_query);
            }
        }
        assert_eq!(
            build_list_models(Provider::Anthropic, None).headers,
            [("anthropic-version".to_owned(), "2023-06-01".to_owned())]
        );
        assert_eq!(
            build_list_models(Provider::Anthropic, Some("claude-x")).path_and_query,
            "/v1/models?limit=1000&after_id=claude-x"
        );
        assert_eq!(
            build_list_models(Provider::Google, Some("a/b=")).path_and_query,
            "/v1beta/models?pageSize=1000&pageToken=a%2Fb%3D"
        );
    }

    #[test]
    fn path_allowed_accepts_the_routes() {
        use HttpMethod::{Get, Post};
        let ok = [
            (Provider::Anthropic, Post, "/v1/messages"),
            (Provider::Anthropic, Get, "/v1/models"),
            (Provider::OpenAi, Post, "/v1/chat/completions"),
            (Provider::OpenAi, Get, "/v1/models"),
            (
                Provider::Google,
                Post,
                "/v1beta/models/gemini-1.5-flash:generateContent",
            ),
            (
                Provider::Google,
                Post,
                "/v1beta/models/gemini-1.5-flash:streamGenerateContent",
            ),
            (
                Provider::Google,
                Post,
                "/v1beta/models/gemini-1.5-flash:streamGenerateContent?alt=sse",
            ),
            (
                Provider::Google,
                Post,
                "/v1beta/models/gemini-2.0-flash-exp_1:generateContent",
            ),
            (Provider::Google, Get, "/v1beta/models"),
        ];
        for (p, m, path) in ok {
            assert!(path_allowed(p, m, path), "{p} {m:?} {path}");
        }
    }

    #[test]
    fn path_allowed_refuses_everything_else() {
        use HttpMethod::{Get, Post};
        let refused = [
            // wrong method
            (Provider::Anthropic, Get, "/v1/messages"),
            (Provider::Anthropic, Post, "/v1/models"),
            (Provider::Google, Get, "/v1beta/models/gemini-1.5-flash:generateContent"),
            // another provider's route
            (Provider::Anthropic, Post, "/v1/chat/completions"),
            (Provider::OpenAi, Post, "/v1/messages"),
            (
                Provider::OpenAi,
                Post,
                "/v1beta/models/gemini-1.5-flash:generateContent",
            ),
            (Provider::Google, Post, "/v1/messages"),
            (Provider::Google, Post, "/v1/models/gemini:countTokens"),
            (Provider::Google, Post, "/v2/models/gemini:generateContent"),
            (Provider::OpenAi, Post, "/v1/responses/resp_1/cancel"),
            (Provider::OpenAi, Get, "/v1/responses"),
            (Provider::Anthropic, Post, "/v1/messages/batches"),
            (Provider::Google, Get, "/v1/models"),
            // traversal and odd paths
            (Provider::Anthropic, Post, "/v1/messages/../../admin"),
            (Provider::Anthropic, Post, "/v1//messages"),
            (Provider::Anthropic, Post, "//v1/messages"),
            (Provider::Anthropic, Post, "/v1/messages/"),
            (Provider::Anthropic, Post, "v1/messages"),
            (Provider::Anthropic, Post, "/V1/MESSAGES"),
            (Provider::Anthropic, Post, "/v1/messages#frag"),
            (Provider::Google, Post, "/v1beta/models/..:generateContent"),
            (Provider::Google, Post, "/v1beta/models/.:generateContent"),
            (Provider::Google, Post, "/v1beta/models/a..b:generateContent"),
            (Provider::Google, Post, "/v1beta/models/../files:generateContent"),
            (Provider::Google, Post, "/v1beta/models/%2E%2E:generateContent"),
            (Provider::Google, Post, "/v1beta/models/a/b:generateContent"),
            (Provider::Google, Post, "/v1beta/models//gemini:generateContent"),
            (Provider::Google, Post, "/v1beta/models/:generateContent"),
            (Provider::Google, Post, "/v1beta/models/gemini:generateContent:x"),
            (Provider::Google, Post, "/v1beta/models/gemini:countTokens"),
            (Provider::Google, Post, "/v1beta/models/gemini"),
            (Provider::Google, Post, "/v1beta/tunedModels/gemini:generateContent"),
            // queries
            (Provider::Anthropic, Post, "/v1/messages?beta=true"),
            (Provider::Anthropic, Post, "/v1/messages?"),
            (Provider::OpenAi, Get, "/v1/models?key=sk-abc"),
            (Provider::Google, Post, "/v1beta/models/gemini:generateContent?alt=sse"),
            (
                Provider::Google,
                Post,
                "/v1beta/models/gemini:generateContent?key=AIza123",
            ),
            (
                Provider::Google,
                Post,
                "/v1beta/models/gemini:streamGenerateContent?key=AIza123",
            ),
            (
                Provider::Google,
                Post,
                "/v1beta/models/gemini:streamGenerateContent?alt=sse&key=AIza123",
            ),
            (
                Provider::Google,
                Post,
                "/v1beta/models/gemini:streamGenerateContent?key=AIza123&alt=sse",
            ),
            (
                Provider::Google,
                Post,
                "/v1beta/models/gemini:streamGenerateContent?alt=json",
            ),
            (Provider::Google, Post, "/v1beta/models/gemini:streamGenerateContent?"),
            (Provider::Google, Get, "/v1beta/models?key=AIza123"),
            (Provider::Google, Get, "/v1beta/models?pageSize=5"),
            (Provider::Google, Get, "/v1beta/models?pageSize=1000&key=AIza123"),
            (Provider::Google, Get, "/v1beta/models?pageSize=1000&pageToken=a&key=b"),
            (Provider::Google, Get, "/v1beta/models?pageSize=1000&pageToken=%2"),
            (Provider::Google, Get, "/v1beta/models?pageToken=x"),
            (Provider::Anthropic, Get, "/v1/models?limit=20"),
            (Provider::Anthropic, Get, "/v1/models?limit=1000&before_id=x"),
            (Provider::OpenAi, Get, "/v1/models?limit=1000"),
            (Provider::Google, Post, ""),
        ];
        for (p, m, path) in refused {
            assert!(!path_allowed(p, m, path), "{p} {m:?} {path} must be refused");
        }
    }

    #[test]
    fn hostile_google_model_ids_cannot_change_the_path() {
        for model in [
            "../../v1/files",
            "gemini?key=x",
            "a/b",
            "..",
            ".",
            "",
            "gemini#x",
            "gem ini",
            "gémini",
            "a:b",
        ] {
            let mut r = req(false);
            r.model = model.to_owned();
            let call = build_chat(Provider::Google, &r);
            let segment = call
                .path_and_query
                .strip_prefix("/v1beta/models/")
                .and_then(|s| s.strip_suffix(":generateContent"))
                .unwrap();
            assert!(
                !segment.contains('/') && !segment.contains('?') && !segment.contains('#'),
                "{model:?}: {segment}"
            );
            assert!(!segment.contains(".."), "{model:?}: {segment}");
            assert!(
                !path_allowed(Provider::Google, HttpMethod::Post, &call.path_and_query),
                "{model:?} must leave a refused path"
            );
        }
        assert!(model_id_is_safe("gemini-1.5-flash"));
        assert!(!model_id_is_safe(&"a".repeat(257)));
    }

    #[test]
    fn header_allowlists() {
        for name in ["content-type", "Accept", "anthropic-version", "ANTHROPIC-BETA"] {
            assert!(request_header_allowed(name), "{name}");
        }
        for name in [
            "x-api-key",
            "authorization",
            "x-goog-api-key",
            "host",
            "cookie",
            "openai-organization",
            "",
        ] {
            assert!(!request_header_allowed(name), "{name}");
        }
        for name in [
            "content-type",
            "request-id",
            "x-request-id",
            "retry-after",
            "location",
            "openai-processing-ms",
            "anthropic-ratelimit-tokens-remaining",
            "x-ratelimit-reset-requests",
        ] {
            assert!(answer_header_kept(name), "{name}");
        }
        for name in ["set-cookie", "x-api-key", "server", "Content-Type", "x-goog-api-key"] {
            assert!(!answer_header_kept(name), "{name}");
        }
    }
}
