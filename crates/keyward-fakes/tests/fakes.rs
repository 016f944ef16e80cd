//! The fakes answer like the providers, and keyward-providers reads those answers.
//! One test binary for the crate (each extra binary costs link time).

// Test helpers outside `#[test]` functions may fail loudly too (clippy's allow-in-tests
// covers only the test functions themselves).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use keyward_core::{Catalogue, Provider};
use keyward_fakes::{Behaviour, FakeProviders};
use keyward_providers::{
    build_chat, build_list_models, build_probe, diagnose, key_placement, native_call, parse_chat, parse_model_page,
    parse_native, rate_limits, read_native_request, request_id_header, ChatMessage, ChatRequest, ChatRole, Diagnosis,
    GoogleVersion, HttpCall, HttpMethod, NativeApi, StreamDecoder, StreamEvent, StreamSummary, Usage,
};
use serde_json::{json, Value};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn key(p: Provider, what: &str) -> String {
    match p {
        Provider::Anthropic => format!("sk-ant-api03-{what}-fakeFAKEfakeFAKE-abcd"),
        Provider::OpenAi => format!("sk-proj-{what}-fakeFAKEfakeFAKE-wxyz"),
        Provider::Google => format!("AQ.Ab8RN6{what}FakeFake_Fake-Fake"),
    }
}

fn model(p: Provider) -> String {
    Catalogue::builtin().probe_model(p).unwrap().id.clone()
}

fn chat(p: Provider, stream: bool, max_tokens: u32) -> ChatRequest {
    ChatRequest {
        model: model(p),
        system: Some("Be brief".into()),
        messages: vec![
            ChatMessage {
                role: ChatRole::User,
                content: "Hi there".into(),
            },
            ChatMessage {
                role: ChatRole::Assistant,
                content: "Hello".into(),
            },
            ChatMessage {
                role: ChatRole::User,
                content: "Say hello back".into(),
            },
        ],
        max_tokens,
        temperature: Some(0.5),
        stream,
    }
}

/// `Be brief` + `Hi there` + `Hello` + `Say hello back`.
const INPUT_WORDS: u64 = 8;

async fn send_with(
    client: &reqwest::Client,
    fakes: &FakeProviders,
    p: Provider,
    call: &HttpCall,
    key: Option<&str>,
) -> reqwest::Result<reqwest::Response> {
    let url = format!("{}{}", fakes.base_url(), call.path_and_query);
    let mut rb = match call.method {
        HttpMethod::Post => client.post(url),
        HttpMethod::Get => client.get(url),
    };
    for (k, v) in &call.headers {
        rb = rb.header(k, v);
    }
    if let Some(key) = key {
        let placement = key_placement(p);
        rb = rb.header(placement.header, format!("{}{key}", placement.value_prefix));
    }
    rb.body(call.body.clone()).send().await
}

async fn send(fakes: &FakeProviders, p: Provider, call: &HttpCall, key: Option<&str>) -> reqwest::Response {
    send_with(&client(), fakes, p, call, key).await.unwrap()
}

struct Decoded {
    text: String,
    deltas: Vec<String>,
    errors: usize,
    chunks: usize,
    broken: bool,
    end: Result<StreamSummary, keyward_providers::ProviderFailure>,
}

async fn decode(p: Provider, mut resp: reqwest::Response) -> Decoded {
    let mut d = StreamDecoder::new(p);
    let mut out = Decoded {
        text: String::new(),
        deltas: Vec::new(),
        errors: 0,
        chunks: 0,
        broken: false,
        end: Ok(StreamSummary::default()),
    };
    loop {
        match resp.chunk().await {
            Ok(Some(bytes)) => {
                out.chunks += 1;
                for ev in d.feed(&bytes) {
                    match ev {
                        StreamEvent::Delta(t) => {
                            out.text.push_str(&t);
                            out.deltas.push(t);
                        }
                        StreamEvent::Error(_) => out.errors += 1,
                    }
                }
            }
            Ok(None) => break,
            Err(_) => {
                out.broken = true;
                break;
            }
        }
    }
    out.end = d.finish();
    out
}

fn stop_reasons(p: Provider) -> (&'static str, &'static str) {
    match p {
        Provider::Anthropic => ("end_turn", "max_tokens"),
        Provider::OpenAi => ("stop", "length"),
        Provider::Google => ("STOP", "MAX_TOKENS"),
    }
}

#[tokio::test]
async fn ok_plain_answers_are_read_by_parse_chat() {
    let fakes = FakeProviders::start().unwrap();
    for p in Provider::ALL {
        let k = key(p, "ok");
        fakes.set_key(p, &k, Behaviour::Ok);
        let resp = send(&fakes, p, &build_chat(p, &chat(p, false, 100)), Some(&k)).await;
        assert_eq!(resp.status(), 200, "{p}");
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let request_id = request_id_header(p).map(|h| resp.headers()[h].to_str().unwrap().to_owned());
        let body = resp.bytes().await.unwrap();
        let answer = parse_chat(p, 200, &body).unwrap();
        assert_eq!(answer.content, format!("Hello from fake {p}."));
        assert_eq!(answer.stop_reason, stop_reasons(p).0);
        assert_eq!(
            answer.usage,
            Usage {
                input_tokens: INPUT_WORDS,
                output_tokens: 4
            }
        );
        assert_eq!(answer.model, model(p));
        match p {
            Provider::Anthropic => {
                assert!(answer.id.starts_with("msg_"));
                assert!(request_id.unwrap().starts_with("req_"));
            }
            Provider::OpenAi => {
                assert!(answer.id.starts_with("chatcmpl-"));
                assert!(request_id.unwrap().starts_with("req_"));
            }
            Provider::Google => {
                assert!(request_id.is_none());
                assert!(!answer.id.is_empty(), "google's id is responseId");
            }
        }
    }
}

#[tokio::test]
async fn ok_streams_are_read_by_the_stream_decoder() {
    let fakes = FakeProviders::start().unwrap();
    for p in Provider::ALL {
        let k = key(p, "ok");
        fakes.set_key(p, &k, Behaviour::Ok);
        let resp = send(&fakes, p, &build_chat(p, &chat(p, true, 100)), Some(&k)).await;
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let d = decode(p, resp).await;
        assert_eq!(
            d.deltas,
            ["Hello", " from", " fake", &format!(" {p}.")],
            "{p}: one word per delta"
        );
        assert_eq!(d.errors, 0);
        assert!(!d.broken);
        let summary = d.end.unwrap();
        assert_eq!(
            summary.usage,
            Usage {
                input_tokens: INPUT_WORDS,
                output_tokens: 4
            },
            "{p}"
        );
        assert_eq!(summary.stop_reason, stop_reasons(p).0);
        assert_eq!(summary.model, model(p));
        assert!(!summary.id.is_empty());
    }
}

#[tokio::test]
async fn the_probe_gets_exactly_one_token() {
    let fakes = FakeProviders::start().unwrap();
    for p in Provider::ALL {
        let k = key(p, "probe");
        fakes.set_key(None, &k, Behaviour::Ok);
        let resp = send(&fakes, p, &build_probe(p, &model(p)), Some(&k)).await;
        let status = resp.status().as_u16();
        let answer = parse_chat(p, status, &resp.bytes().await.unwrap()).unwrap();
        assert_eq!(answer.content, "Hello");
        assert_eq!(answer.stop_reason, stop_reasons(p).1);
        assert_eq!(
            answer.usage,
            Usage {
                input_tokens: 1,
                output_tokens: 1
            }
        );
    }
}

#[tokio::test]
async fn max_tokens_cuts_streams_too() {
    let fakes = FakeProviders::start().unwrap();
    for p in Provider::ALL {
        let k = key(p, "cut");
        fakes.set_key(p, &k, Behaviour::Ok);
        let resp = send(&fakes, p, &build_chat(p, &chat(p, true, 2)), Some(&k)).await;
        let d = decode(p, resp).await;
        assert_eq!(d.text, "Hello from");
        let summary = d.end.unwrap();
        assert_eq!(summary.stop_reason, stop_reasons(p).1);
        assert_eq!(summary.usage.output_tokens, 2);
    }
}

#[tokio::test]
async fn unregistered_keys_get_each_providers_invalid_key_error() {
    let fakes = FakeProviders::start().unwrap();
    for p in Provider::ALL {
        let k = key(p, "unknown");
        let resp = send(&fakes, p, &build_probe(p, &model(p)), Some(&k)).await;
        let status = resp.status().as_u16();
        if let Some(h) = request_id_header(p) {
            assert!(resp.headers().contains_key(h), "{p}: request id on errors too");
        }
        let body: Value = resp.json().await.unwrap();
        let f = diagnose(p, status, body.to_string().as_bytes());
        assert_eq!(f.diagnosis, Diagnosis::InvalidKey, "{p}: {body}");
        match p {
            Provider::Anthropic => {
                assert_eq!(status, 401);
                assert_eq!(body["type"], "error");
                assert_eq!(
                    body["error"],
                    json!({"type": "authentication_error", "message": "invalid x-api-key"})
                );
                assert!(body["request_id"].as_str().unwrap().starts_with("req_"));
            }
            Provider::OpenAi => {
                assert_eq!(status, 401);
                assert_eq!(body["error"]["code"], "invalid_api_key");
                assert_eq!(body["error"]["type"], "invalid_request_error");
                assert_eq!(body["error"]["param"], Value::Null);
                let message = body["error"]["message"].as_str().unwrap();
                assert!(
                    message.starts_with("Incorrect API key provided: sk-proj-****"),
                    "{message}"
                );
                assert!(message
                    .contains("*wxyz. You can find your API key at https://platform.openai.com/account/api-keys."));
                assert!(!message.contains(&k), "masked like the real one");
            }
            Provider::Google => {
                assert_eq!(status, 400);
                assert_eq!(body["error"]["code"], 400);
                assert_eq!(body["error"]["status"], "INVALID_ARGUMENT");
                assert_eq!(
                    body["error"]["message"],
                    "API key not valid. Please pass a valid API key."
                );
                assert_eq!(
                    body["error"]["details"][0]["@type"],
                    "type.googleapis.com/google.rpc.ErrorInfo"
                );
                assert_eq!(body["error"]["details"][0]["reason"], "API_KEY_INVALID");
                assert_eq!(body["error"]["details"][0]["domain"], "googleapis.com");
            }
        }
    }
}

#[tokio::test]
async fn a_key_outside_the_providers_header_counts_as_missing() {
    let fakes = FakeProviders::start().unwrap();
    let c = client();
    for p in Provider::ALL {
        fakes.set_key(None, &key(p, "ok"), Behaviour::Ok);
    }
    let base = fakes.base_url();

    // Google: the key in a `?key=` query is ignored.
    let g = build_probe(Provider::Google, &model(Provider::Google));
    let url = format!("{base}{}?key={}", g.path_and_query, key(Provider::Google, "ok"));
    let resp = c
        .post(url)
        .header("content-type", "application/json")
        .body(g.body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["status"], "PERMISSION_DENIED");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Method doesn't allow unregistered callers"));

    // Anthropic: a Bearer token is not an x-api-key.
    let a = build_probe(Provider::Anthropic, &model(Provider::Anthropic));
    let mut rb = c.post(format!("{base}{}", a.path_and_query));
    for (k, v) in &a.headers {
        rb = rb.header(k, v);
    }
    let resp = rb
        .bearer_auth(key(Provider::Anthropic, "ok"))
        .body(a.body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["message"], "x-api-key header is required");

    // OpenAI: an x-api-key header is not a Bearer token.
    let o = build_probe(Provider::OpenAi, &model(Provider::OpenAi));
    let resp = c
        .post(format!("{base}{}", o.path_and_query))
        .header("content-type", "application/json")
        .header("x-api-key", key(Provider::OpenAi, "ok"))
        .body(o.body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("You didn't provide an API key."));
    assert_eq!(
        diagnose(Provider::OpenAi, 401, body.to_string().as_bytes()).diagnosis,
        Diagnosis::InvalidKey
    );
}

#[tokio::test]
async fn error_behaviours_are_diagnosed_for_every_provider() {
    let fakes = FakeProviders::start().unwrap();
    let table = [
        (Behaviour::NoCredit, Diagnosis::NoCredit, [400, 429, 429]),
        // OpenAI answers a restricted key's missing scopes with 401.
        (
            Behaviour::MissingPermission,
            Diagnosis::MissingPermission,
            [403, 401, 403],
        ),
        (Behaviour::RateLimited, Diagnosis::RateLimited, [429, 429, 429]),
        (Behaviour::Unavailable, Diagnosis::ProviderUnavailable, [529, 503, 503]),
        (Behaviour::EchoKey, Diagnosis::InvalidKey, [401, 401, 400]),
    ];
    for (behaviour, expected, statuses) in table {
        for (p, status) in Provider::ALL.into_iter().zip(statuses) {
            let k = key(p, behaviour.name());
            fakes.set_key(p, &k, behaviour);
            for stream in [false, true] {
                let resp = send(&fakes, p, &build_chat(p, &chat(p, stream, 50)), Some(&k)).await;
                assert_eq!(resp.status().as_u16(), status, "{p} {behaviour:?}");
                let body = resp.bytes().await.unwrap();
                let f = parse_chat(p, status, &body).unwrap_err();
                assert_eq!(f.diagnosis, expected, "{p} {behaviour:?}: {}", f.message);
                assert_eq!(f.status, Some(status));
                assert!(!f.message.is_empty());
                if behaviour == Behaviour::EchoKey {
                    assert!(f.message.contains(&k), "{p}: the careless provider echoes the key");
                } else {
                    assert!(!f.message.contains(&k), "{p} {behaviour:?}");
                }
            }
        }
    }
    // The exact texts tests elsewhere rely on.
    let k = key(Provider::Anthropic, "no_credit");
    let resp = send(
        &fakes,
        Provider::Anthropic,
        &build_probe(Provider::Anthropic, &model(Provider::Anthropic)),
        Some(&k),
    )
    .await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(
        body["error"]["message"],
        "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."
    );
    let k = key(Provider::OpenAi, "no_credit");
    let resp = send(
        &fakes,
        Provider::OpenAi,
        &build_probe(Provider::OpenAi, &model(Provider::OpenAi)),
        Some(&k),
    )
    .await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_quota");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("You exceeded your current quota, please check your plan and billing details."));
    let k = key(Provider::OpenAi, "rate_limited");
    let resp = send(
        &fakes,
        Provider::OpenAi,
        &build_probe(Provider::OpenAi, &model(Provider::OpenAi)),
        Some(&k),
    )
    .await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let k = key(Provider::Google, "rate_limited");
    let resp = send(
        &fakes,
        Provider::Google,
        &build_probe(Provider::Google, &model(Provider::Google)),
        Some(&k),
    )
    .await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED");
    assert_eq!(
        body["error"]["details"][2]["@type"],
        "type.googleapis.com/google.rpc.RetryInfo"
    );
}

#[tokio::test]
async fn unknown_models_get_each_providers_not_found() {
    let fakes = FakeProviders::start().unwrap();
    for p in Provider::ALL {
        let k = key(p, "ok");
        fakes.set_key(p, &k, Behaviour::Ok);
        let mut req = chat(p, false, 10);
        req.model = "no-such-model-9".into();
        let resp = send(&fakes, p, &build_chat(p, &req), Some(&k)).await;
        assert_eq!(resp.status(), 404, "{p}");
        let body = resp.bytes().await.unwrap();
        let f = diagnose(p, 404, &body);
        assert_eq!(f.diagnosis, Diagnosis::ModelNotAvailable);
        assert!(f.message.contains("no-such-model-9"), "{p}: {}", f.message);
        let v: Value = serde_json::from_slice(&body).unwrap();
        match p {
            Provider::Anthropic => assert_eq!(v["error"]["type"], "not_found_error"),
            Provider::OpenAi => assert_eq!(v["error"]["code"], "model_not_found"),
            Provider::Google => assert_eq!(v["error"]["status"], "NOT_FOUND"),
        }
    }
}

#[tokio::test]
async fn retired_models_get_each_providers_not_found() {
    let fakes = FakeProviders::start().unwrap();
    let retired = [
        (
            Provider::Anthropic,
            "claude-3-haiku-20240307",
            "model: claude-3-haiku-20240307",
        ),
        (
            Provider::OpenAi,
            "gpt-4-turbo",
            "The model `gpt-4-turbo` does not exist or you do not have access to it.",
        ),
        (
            Provider::Google,
            "gemini-1.5-flash",
            "models/gemini-1.5-flash is not found for API version v1beta, or is not supported for generateContent.",
        ),
    ];
    for (p, model, says) in retired {
        let k = key(p, "ok");
        fakes.set_key(p, &k, Behaviour::Ok);
        let resp = send(&fakes, p, &build_probe(p, model), Some(&k)).await;
        assert_eq!(resp.status(), 404, "{p}");
        let f = diagnose(p, 404, &resp.bytes().await.unwrap());
        assert!(f.is_model_not_found(), "{p}");
        assert!(f.message.starts_with(says), "{p}: {}", f.message);
    }
    // Anthropic answers the aliases of dated models, like the API.
    let k = key(Provider::Anthropic, "ok");
    let resp = send(
        &fakes,
        Provider::Anthropic,
        &build_probe(Provider::Anthropic, "claude-haiku-4-5"),
        Some(&k),
    )
    .await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn google_takes_auth_keys_only_and_says_what_is_wrong_with_a_key() {
    let fakes = FakeProviders::start().unwrap();
    let p = Provider::Google;
    let probe = build_probe(p, &model(p));
    // A standard key is refused even when registered: Google stopped taking them.
    let standard = "AIzaSyA1234567890abcdefghijklmnopqrstu";
    fakes.set_key(p, standard, Behaviour::Ok);
    let resp = send(&fakes, p, &probe, Some(standard)).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["details"][0]["reason"], "API_KEY_INVALID");
    let auth = key(p, "ok");
    fakes.set_key(p, &auth, Behaviour::Ok);
    assert_eq!(send(&fakes, p, &probe, Some(&auth)).await.status(), 200);

    let cases = [
        (
            Behaviour::Leaked,
            403,
            Diagnosis::KeyReportedLeaked,
            "reported as leaked",
        ),
        (Behaviour::Suspended, 403, Diagnosis::InvalidKey, "has been suspended"),
        (
            Behaviour::KeyTypeUnsupported,
            401,
            Diagnosis::InvalidKey,
            "invalid authentication credentials",
        ),
    ];
    for (behaviour, status, diagnosis, says) in cases {
        let k = key(p, behaviour.name());
        fakes.set_key(p, &k, behaviour);
        let resp = send(&fakes, p, &probe, Some(&k)).await;
        assert_eq!(resp.status().as_u16(), status, "{behaviour:?}");
        let f = diagnose(p, status, &resp.bytes().await.unwrap());
        assert_eq!(f.diagnosis, diagnosis, "{behaviour:?}");
        assert!(f.message.contains(says) && f.advice.is_some(), "{behaviour:?}: {f:?}");
        // Google quotes the key of a suspended consumer: the worker masks it.
        assert_eq!(
            f.message.contains(&k),
            behaviour == Behaviour::Suspended,
            "{behaviour:?}"
        );
    }
    // The others treat a leaked or unsupported key as an invalid one.
    for p in [Provider::Anthropic, Provider::OpenAi] {
        for behaviour in [Behaviour::Leaked, Behaviour::KeyTypeUnsupported] {
            let k = key(p, behaviour.name());
            fakes.set_key(p, &k, behaviour);
            let resp = send(&fakes, p, &build_probe(p, &model(p)), Some(&k)).await;
            assert_eq!(resp.status(), 401, "{p} {behaviour:?}");
            let f = diagnose(p, 401, &resp.bytes().await.unwrap());
            assert_eq!(f.diagnosis, Diagnosis::InvalidKey, "{p} {behaviour:?}");
        }
    }
}

#[tokio::test]
async fn successes_carry_the_rate_limit_headers_google_sends_none() {
    let fakes = FakeProviders::start().unwrap();
    for p in Provider::ALL {
        let k = key(p, "ok");
        fakes.set_key(p, &k, Behaviour::Ok);
        let resp = send(&fakes, p, &build_probe(p, &model(p)), Some(&k)).await;
        assert_eq!(resp.status(), 200);
        let headers: Vec<(String, String)> = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
            .collect();
        let limits = rate_limits(p, &headers);
        match p {
            Provider::Google => assert_eq!(limits, None),
            _ => {
                let l = limits.unwrap_or_else(|| panic!("{p}: no rate-limit headers"));
                let requests = l.requests.unwrap();
                assert!(requests.limit.unwrap() > requests.remaining.unwrap(), "{p}");
                assert!(requests.reset.is_some() && l.tokens.is_some(), "{p}");
                if p == Provider::Anthropic {
                    assert!(requests.reset.unwrap().ends_with('Z'), "RFC 3339");
                    assert!(l.input_tokens.is_some() && l.output_tokens.is_some());
                }
            }
        }
    }
}

#[tokio::test]
async fn garbage_and_truncated_answers_are_malformed() {
    let fakes = FakeProviders::start().unwrap();
    for p in Provider::ALL {
        let garbage = key(p, "garbage");
        let truncated = key(p, "truncated");
        fakes.set_key(p, &garbage, Behaviour::Garbage);
        fakes.set_key(p, &truncated, Behaviour::Truncated);

        let resp = send(&fakes, p, &build_chat(p, &chat(p, false, 50)), Some(&garbage)).await;
        assert_eq!(resp.status(), 200);
        let f = parse_chat(p, 200, &resp.bytes().await.unwrap()).unwrap_err();
        assert_eq!(f.diagnosis, Diagnosis::MalformedResponse);
        assert!(f.message.contains("not JSON"), "{}", f.message);

        let resp = send(&fakes, p, &build_chat(p, &chat(p, true, 50)), Some(&garbage)).await;
        let d = decode(p, resp).await;
        assert_eq!(d.end.unwrap_err().diagnosis, Diagnosis::MalformedResponse);

        let resp = send(&fakes, p, &build_chat(p, &chat(p, false, 50)), Some(&truncated)).await;
        assert_eq!(resp.status(), 200);
        let f = parse_chat(p, 200, &resp.bytes().await.unwrap()).unwrap_err();
        assert_eq!(f.diagnosis, Diagnosis::MalformedResponse);
        assert!(f.message.contains("cut off"), "{}", f.message);

        let resp = send(&fakes, p, &build_chat(p, &chat(p, true, 50)), Some(&truncated)).await;
        let d = decode(p, resp).await;
        assert!(!d.broken, "{p}: a truncated stream ends cleanly");
        let f = d.end.unwrap_err();
        assert_eq!(f.diagnosis, Diagnosis::ProviderUnavailable, "{p}: {}", f.message);
        assert!(f.message.contains("incomplete"), "{}", f.message);
    }
}

#[tokio::test]
async fn drop_closes_the_connection_without_an_answer() {
    let fakes = FakeProviders::start().unwrap();
    for p in Provider::ALL {
        let k = key(p, "drop");
        fakes.set_key(p, &k, Behaviour::Drop);
        for stream in [false, true] {
            let err = send_with(&client(), &fakes, p, &build_chat(p, &chat(p, stream, 10)), Some(&k))
                .await
                .unwrap_err();
            assert!(!err.is_timeout(), "{p}: {err}");
            assert!(err.status().is_none());
        }
    }
}

#[tokio::test]
async fn drop_mid_stream_sends_part_then_breaks() {
    let fakes = FakeProviders::start().unwrap();
    for p in Provider::ALL {
        let k = key(p, "dms");
        fakes.set_key(p, &k, Behaviour::DropMidStream);
        let resp = send(&fakes, p, &build_chat(p, &chat(p, true, 50)), Some(&k)).await;
        assert_eq!(resp.status(), 200);
        let d = decode(p, resp).await;
        assert!(d.broken, "{p}: the body must break");
        assert!(!d.text.is_empty(), "{p}: some text arrived first");
        assert!(d.end.is_err());

        let resp = send(&fakes, p, &build_chat(p, &chat(p, false, 50)), Some(&k)).await;
        assert_eq!(resp.status(), 200);
        assert!(resp.bytes().await.is_err(), "{p}: a plain body breaks too");
    }
}

#[tokio::test]
async fn stall_never_answers_until_shutdown() {
    let fakes = FakeProviders::start().unwrap();
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    for p in Provider::ALL {
        let k = key(p, "stall");
        fakes.set_key(p, &k, Behaviour::Stall);
        let err = send_with(&quick, &fakes, p, &build_probe(p, &model(p)), Some(&k))
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{p}: {err}");
    }
    // A stalled request ends when the fake goes away.
    let k = key(Provider::OpenAi, "stall");
    let call = build_probe(Provider::OpenAi, &model(Provider::OpenAi));
    let url = format!("{}{}", fakes.base_url(), call.path_and_query);
    let pending = tokio::spawn(async move {
        client()
            .post(url)
            .bearer_auth(k)
            .header("content-type", "application/json")
            .body(call.body)
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    drop(fakes);
    let result = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_err());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn redirect_points_at_the_recorder() {
    let fakes = FakeProviders::start().unwrap();
    for p in Provider::ALL {
        let k = key(p, "redirect");
        fakes.set_key(p, &k, Behaviour::Redirect);
        let resp = send(&fakes, p, &build_probe(p, &model(p)), Some(&k)).await;
        assert_eq!(resp.status(), 307);
        assert_eq!(
            resp.headers()["location"].to_str().unwrap(),
            format!("{}/_fake/stolen", fakes.base_url())
        );
        let f = diagnose(p, 307, &resp.bytes().await.unwrap());
        assert_eq!(f.diagnosis, Diagnosis::MalformedResponse);
        assert!(f.message.contains("redirect"));
    }
    assert!(fakes.stolen_requests().is_empty());

    // A client that follows redirects hands the key to the recorder: what keyward must never do.
    let follows = reqwest::Client::new();
    let k = key(Provider::Anthropic, "redirect");
    let resp = send_with(
        &follows,
        &fakes,
        Provider::Anthropic,
        &build_probe(Provider::Anthropic, &model(Provider::Anthropic)),
        Some(&k),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let stolen = fakes.stolen_requests();
    assert_eq!(stolen.len(), 1);
    assert_eq!(stolen[0].method, "POST");
    assert_eq!(stolen[0].header("x-api-key"), Some(k.as_str()));
    assert_eq!(stolen[0].body_json().unwrap()["max_tokens"], 1);
}

#[tokio::test]
async fn slow_stream_spaces_its_chunks() {
    let fakes = FakeProviders::start().unwrap();
    let delay = Duration::from_millis(40);
    for p in Provider::ALL {
        let k = key(p, "slow");
        fakes.set_key(p, &k, Behaviour::SlowStream(delay));
        let started = Instant::now();
        let resp = send(&fakes, p, &build_chat(p, &chat(p, true, 100)), Some(&k)).await;
        let first_byte = started.elapsed();
        let d = decode(p, resp).await;
        let total = started.elapsed();
        assert_eq!(d.text, format!("Hello from fake {p}."));
        assert!(d.end.is_ok());
        assert!(d.chunks >= 4, "{p}: chunks arrive one by one, got {}", d.chunks);
        // Google sends 4 chunks, so at least 3 pauses.
        assert!(total - first_byte >= delay * 3, "{p}: {:?}", total - first_byte);
    }
    // A plain answer waits once.
    let k = key(Provider::OpenAi, "slow");
    let started = Instant::now();
    let resp = send(
        &fakes,
        Provider::OpenAi,
        &build_probe(Provider::OpenAi, &model(Provider::OpenAi)),
        Some(&k),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() >= delay);
}

#[tokio::test]
async fn long_stream_sends_the_first_text_at_once_and_lasts_its_length() {
    let fakes = FakeProviders::start().unwrap();
    let length = Duration::from_millis(600);
    for p in Provider::ALL {
        let k = key(p, "long");
        fakes.set_key(p, &k, Behaviour::LongStream(length));
        let started = Instant::now();
        let mut resp = send(&fakes, p, &build_chat(p, &chat(p, true, 100)), Some(&k)).await;
        let mut decoder = StreamDecoder::new(p);
        let (mut text, mut texts, mut first) = (String::new(), 0, None);
        while let Some(bytes) = resp.chunk().await.unwrap() {
            for ev in decoder.feed(&bytes) {
                if let StreamEvent::Delta(t) = ev {
                    first.get_or_insert_with(|| started.elapsed());
                    text.push_str(&t);
                    texts += 1;
                }
            }
        }
        let total = started.elapsed();
        assert_eq!(text, format!("Hello from fake {p}."));
        assert!(decoder.finish().is_ok());
        assert!(texts >= 4, "{p}: {texts} text events");
        let first = first.unwrap_or_else(|| panic!("{p}: no text"));
        assert!(first < length / 3, "{p}: the first text came after {first:?}");
        assert!(total >= length && total < length * 3, "{p}: the stream took {total:?}");
    }
}

#[tokio::test]
async fn model_lists_have_each_providers_shape() {
    let fakes = FakeProviders::start().unwrap();
    for p in Provider::ALL {
        fakes.set_key(p, &key(p, "ok"), Behaviour::Ok);
    }
    let list = |p: Provider, page: Option<String>| {
        let fakes = &fakes;
        async move {
            let resp = send(fakes, p, &build_list_models(p, page.as_deref()), Some(&key(p, "ok"))).await;
            assert_eq!(resp.status(), 200, "{p}");
            let status = resp.status().as_u16();
            let body = resp.bytes().await.unwrap();
            (
                parse_model_page(p, status, &body).unwrap(),
                serde_json::from_slice::<Value>(&body).unwrap(),
            )
        }
    };
    let catalogue = Catalogue::builtin();
    for p in Provider::ALL {
        let (page, raw) = list(p, None).await;
        // The fake lists what the provider serves today: every model keyward offers, and
        // none of those the provider retired.
        for m in catalogue.models(p) {
            assert_eq!(page.ids.contains(&m.id), m.is_served(), "{p} {} ({:?})", m.id, m.status);
        }
        let served: Vec<String> = keyward_fakes::models::served(p).into_iter().map(|m| m.id).collect();
        assert_eq!(page.ids, served, "{p}");
        assert_eq!(page.next, None, "{p}: one page of 1000 holds them all");
        match p {
            Provider::Anthropic => {
                assert_eq!(raw["has_more"], false);
                assert_eq!(raw["data"][0]["type"], "model");
                assert_eq!(raw["first_id"], page.ids[0]);
            }
            Provider::OpenAi => assert_eq!(raw["data"][0]["object"], "model"),
            Provider::Google => assert!(raw["models"][0]["name"].as_str().unwrap().starts_with("models/")),
        }
    }

    // Smaller pages are followed to the end (Anthropic `limit`/`after_id`, Google
    // `pageSize`/`pageToken`, as the APIs page them).
    for (p, first) in [
        (Provider::Anthropic, "/v1/models?limit=3"),
        (Provider::Google, "/v1beta/models?pageSize=3"),
    ] {
        let mut got = Vec::new();
        let mut path = first.to_owned();
        for _ in 0..20 {
            let call = HttpCall {
                method: HttpMethod::Get,
                path_and_query: path.clone(),
                headers: build_list_models(p, None).headers,
                body: Vec::new(),
            };
            let resp = send(&fakes, p, &call, Some(&key(p, "ok"))).await;
            let body = resp.bytes().await.unwrap();
            let page = parse_model_page(p, 200, &body).unwrap();
            assert!(page.ids.len() <= 3);
            got.extend(page.ids);
            match (p, page.next) {
                (_, None) => break,
                (Provider::Anthropic, Some(n)) => path = format!("/v1/models?limit=3&after_id={n}"),
                (_, Some(n)) => path = format!("/v1beta/models?pageSize=3&pageToken={n}"),
            }
        }
        let served: Vec<String> = keyward_fakes::models::served(p).into_iter().map(|m| m.id).collect();
        assert_eq!(got, served, "{p}: pages in order, none twice");
    }

    // A model taken away (a retirement) leaves the listing and is answered as not found.
    fakes.set_model_available(Provider::OpenAi, "gpt-6-luna", false);
    let (page, _) = list(Provider::OpenAi, None).await;
    assert!(!page.ids.iter().any(|id| id == "gpt-6-luna"));
    fakes.set_model_available(Provider::OpenAi, "gpt-6-luna", true);
    let (page, _) = list(Provider::OpenAi, None).await;
    assert!(page.ids.iter().any(|id| id == "gpt-6-luna"));

    // Without anthropic-version, /v1/models is OpenAI's, which wants a Bearer key.
    let resp = client()
        .get(format!("{}/v1/models", fakes.base_url()))
        .header("x-api-key", key(Provider::Anthropic, "ok"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn a_provider_specific_key_wins_over_an_all_provider_one() {
    let fakes = FakeProviders::start().unwrap();
    let k = "sk-shared-fake-key-0000";
    fakes.set_key(None, k, Behaviour::Ok);
    fakes.set_key(Provider::OpenAi, k, Behaviour::RateLimited);
    let a = send(
        &fakes,
        Provider::Anthropic,
        &build_probe(Provider::Anthropic, &model(Provider::Anthropic)),
        Some(k),
    )
    .await;
    assert_eq!(a.status(), 200);
    let o = send(
        &fakes,
        Provider::OpenAi,
        &build_probe(Provider::OpenAi, &model(Provider::OpenAi)),
        Some(k),
    )
    .await;
    assert_eq!(o.status(), 429);
    fakes.remove_key(Provider::OpenAi, k);
    let o = send(
        &fakes,
        Provider::OpenAi,
        &build_probe(Provider::OpenAi, &model(Provider::OpenAi)),
        Some(k),
    )
    .await;
    assert_eq!(o.status(), 200);
    fakes.remove_key(None, k);
    let g = send(
        &fakes,
        Provider::Google,
        &build_probe(Provider::Google, &model(Provider::Google)),
        Some(k),
    )
    .await;
    assert_eq!(g.status(), 400);
}

#[tokio::test]
async fn requests_validate_like_the_providers() {
    let fakes = FakeProviders::start().unwrap();
    for p in Provider::ALL {
        fakes.set_key(p, &key(p, "ok"), Behaviour::Ok);
    }
    let c = client();
    let base = fakes.base_url();
    let post = |path: &str, headers: Vec<(&'static str, String)>, body: Value| {
        let mut rb = c
            .post(format!("{base}{path}"))
            .header("content-type", "application/json");
        for (k, v) in headers {
            rb = rb.header(k, v);
        }
        rb.body(body.to_string()).send()
    };
    let anthropic_key = ("x-api-key", key(Provider::Anthropic, "ok"));
    let version = ("anthropic-version", "2023-06-01".to_owned());
    let cases: Vec<(Provider, reqwest::Response, &str)> = vec![
        (
            Provider::Anthropic,
            post("/v1/messages", vec![anthropic_key.clone()],
                 json!({"model": model(Provider::Anthropic), "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
            .await
            .unwrap(),
            "anthropic-version: header is required",
        ),
        (
            Provider::Anthropic,
            post("/v1/messages", vec![anthropic_key.clone(), version.clone()],
                 json!({"model": model(Provider::Anthropic), "max_completion_tokens": 5, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
            .await
            .unwrap(),
            "max_completion_tokens: Extra inputs are not permitted",
        ),
        (
            Provider::Anthropic,
            post("/v1/messages", vec![anthropic_key.clone(), version.clone()],
                 json!({"model": model(Provider::Anthropic), "max_tokens": 5, "messages": [{"role": "system", "content": "hi"}]}))
            .await
            .unwrap(),
            "messages.0.role: Input should be 'user' or 'assistant'",
        ),
        (
            Provider::OpenAi,
            post("/v1/chat/completions", vec![("authorization", format!("Bearer {}", key(Provider::OpenAi, "ok")))],
                 json!({"model": model(Provider::OpenAi), "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": true}}))
            .await
            .unwrap(),
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        ),
        (
            Provider::OpenAi,
            post("/v1/chat/completions", vec![("authorization", format!("Bearer {}", key(Provider::OpenAi, "ok")))],
                 json!({"model": model(Provider::OpenAi), "messages": [{"role": "user", "content": "hi"}], "system": "x"}))
            .await
            .unwrap(),
            "Unrecognized request argument supplied: system",
        ),
        (
            Provider::Google,
            post(&format!("/v1beta/models/{}:generateContent", model(Provider::Google)),
                 vec![("x-goog-api-key", key(Provider::Google, "ok"))],
                 json!({"contents": [{"role": "assistant", "parts": [{"text": "hi"}]}]}))
            .await
            .unwrap(),
            "Please use a valid role: user, model.",
        ),
        (
            Provider::Google,
            post(&format!("/v1beta/models/{}:generateContent", model(Provider::Google)),
                 vec![("x-goog-api-key", key(Provider::Google, "ok"))],
                 json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"max_tokens": 5}}))
            .await
            .unwrap(),
            "Invalid JSON payload received. Unknown name \"max_tokens\" at 'generation_config': Cannot find field.",
        ),
        (
            Provider::Google,
            post(&format!("/v1beta/models/{}:generateContent?foo=1", model(Provider::Google)),
                 vec![("x-goog-api-key", key(Provider::Google, "ok"))],
                 json!({"contents": [{"parts": [{"text": "hi"}]}]}))
            .await
            .unwrap(),
            "Invalid JSON payload received. Unknown name \"foo\": Cannot bind query parameter.",
        ),
    ];
    for (p, resp, expected) in cases {
        assert_eq!(resp.status(), 400, "{p}: {expected}");
        let body = resp.bytes().await.unwrap();
        let f = diagnose(p, 400, &body);
        assert_eq!(f.diagnosis, Diagnosis::BadRequest, "{p}: {}", f.message);
        assert!(
            f.message.starts_with(expected),
            "{p}: {} does not start with {expected}",
            f.message
        );
    }
}

#[tokio::test]
async fn google_streams_a_json_array_without_alt_sse() {
    let fakes = FakeProviders::start().unwrap();
    let k = key(Provider::Google, "ok");
    fakes.set_key(Provider::Google, &k, Behaviour::Ok);
    let mut call = build_chat(Provider::Google, &chat(Provider::Google, true, 100));
    call.path_and_query = call.path_and_query.replace("?alt=sse", "");
    let resp = send(&fakes, Provider::Google, &call, Some(&k)).await;
    assert_eq!(resp.status(), 200);
    let items: Vec<Value> = resp.json().await.unwrap();
    assert_eq!(items.len(), 4);
    let text: String = items
        .iter()
        .map(|i| i["candidates"][0]["content"]["parts"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "Hello from fake google.");
    assert_eq!(items[3]["candidates"][0]["finishReason"], "STOP");
    assert_eq!(items[3]["usageMetadata"]["candidatesTokenCount"], 4);
}

#[tokio::test]
async fn openai_sends_the_usage_chunk_only_when_asked() {
    let fakes = FakeProviders::start().unwrap();
    let k = key(Provider::OpenAi, "ok");
    fakes.set_key(Provider::OpenAi, &k, Behaviour::Ok);
    let call = build_chat(Provider::OpenAi, &chat(Provider::OpenAi, true, 100));
    let text = send(&fakes, Provider::OpenAi, &call, Some(&k))
        .await
        .text()
        .await
        .unwrap();
    let datas: Vec<&str> = text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect();
    assert_eq!(datas.last(), Some(&"[DONE]"));
    let usage_only: Vec<&&str> = datas
        .iter()
        .filter(|d| keyward_providers::openai_is_usage_only_chunk(d.as_bytes()))
        .collect();
    assert_eq!(usage_only.len(), 1);
    assert_eq!(
        datas[datas.len() - 2],
        *usage_only[0],
        "the usage chunk comes just before [DONE]"
    );

    let mut body: Value = serde_json::from_slice(&call.body).unwrap();
    body.as_object_mut().unwrap().remove("stream_options");
    let plain_stream = HttpCall {
        body: body.to_string().into_bytes(),
        ..call
    };
    let text = send(&fakes, Provider::OpenAi, &plain_stream, Some(&k))
        .await
        .text()
        .await
        .unwrap();
    assert!(!text.contains("\"usage\""), "no usage field at all when not asked");
    let d = {
        let mut d = StreamDecoder::new(Provider::OpenAi);
        d.feed(text.as_bytes());
        d.finish()
    };
    assert_eq!(
        d.unwrap_err().diagnosis,
        Diagnosis::MalformedResponse,
        "keyward always asks for usage"
    );
}

#[tokio::test]
async fn requests_are_recorded_and_controlled_over_http() {
    let fakes = FakeProviders::start().unwrap();
    let c = client();
    let base = fakes.base_url();

    let r = c
        .post(format!("{base}/_fake/keys"))
        .json(&json!({"key": "sk-proj-http-control-0001", "behaviour": "rate_limited", "provider": "openai"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(format!("{base}/_fake/keys"))
        .json(&json!({"key": "x", "behaviour": "explode"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("slow_stream"));

    let call = build_probe(Provider::OpenAi, &model(Provider::OpenAi));
    let resp = send(&fakes, Provider::OpenAi, &call, Some("sk-proj-http-control-0001")).await;
    assert_eq!(resp.status(), 429);
    // The same key is unknown to the other providers.
    let resp = send(
        &fakes,
        Provider::Anthropic,
        &build_probe(Provider::Anthropic, "x"),
        Some("sk-proj-http-control-0001"),
    )
    .await;
    assert_eq!(resp.status(), 401);

    let v: Value = c
        .get(format!("{base}/_fake/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let requests = v["requests"].as_array().unwrap();
    assert_eq!(requests.len(), 2, "control calls are not recorded: {v}");
    assert_eq!(requests[0]["method"], "POST");
    assert_eq!(requests[0]["path"], "/v1/chat/completions");
    assert_eq!(requests[0]["query"], Value::Null);
    assert_eq!(
        requests[0]["headers"]["authorization"],
        "Bearer sk-proj-http-control-0001"
    );
    let body: Value = serde_json::from_str(requests[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["max_completion_tokens"], 1);
    assert_eq!(fakes.requests().len(), 2);
    assert_eq!(
        fakes.requests()[1].header("x-api-key"),
        Some("sk-proj-http-control-0001")
    );

    let r = c.delete(format!("{base}/_fake/requests")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert!(fakes.requests().is_empty());

    // slow_stream with its delay, for every provider.
    let r = c
        .post(format!("{base}/_fake/keys"))
        .json(&json!({"key": "any-slow", "behaviour": "slow_stream", "delay_ms": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for p in Provider::ALL {
        let resp = send(&fakes, p, &build_chat(p, &chat(p, true, 100)), Some("any-slow")).await;
        assert!(decode(p, resp).await.end.is_ok());
    }
    // Unknown routes are recorded and answered 404; so is everything sent to the recorder.
    let r = c.get(format!("{base}/v2/whatever?key=abc")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let last = fakes.requests().pop().unwrap();
    assert_eq!(
        (last.path.as_str(), last.query.as_deref()),
        ("/v2/whatever", Some("key=abc"))
    );

    let r = c.delete(format!("{base}/_fake/keys")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let resp = send(&fakes, Provider::OpenAi, &call, Some("sk-proj-http-control-0001")).await;
    assert_eq!(resp.status(), 401);

    fakes.set_recording(false);
    fakes.clear_requests();
    let _ = send(&fakes, Provider::OpenAi, &call, Some("nobody")).await;
    assert!(fakes.requests().is_empty());
    assert_eq!(
        c.get(format!("{base}/_fake/healthz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "ok"
    );
}

#[tokio::test]
async fn behaviour_names_round_trip() {
    let all = [
        Behaviour::Ok,
        Behaviour::NoCredit,
        Behaviour::MissingPermission,
        Behaviour::RateLimited,
        Behaviour::Unavailable,
        Behaviour::Stall,
        Behaviour::Drop,
        Behaviour::DropMidStream,
        Behaviour::Garbage,
        Behaviour::Truncated,
        Behaviour::Redirect,
        Behaviour::EchoKey,
        Behaviour::SlowStream(Duration::from_millis(7)),
        Behaviour::Leaked,
        Behaviour::Suspended,
        Behaviour::KeyTypeUnsupported,
        Behaviour::LongStream(Duration::from_millis(7)),
    ];
    let names: Vec<&str> = all.iter().map(|b| b.name()).collect();
    assert_eq!(names, Behaviour::NAMES);
    for b in all {
        assert_eq!(Behaviour::parse(b.name(), Some(7)), Some(b));
    }
    assert_eq!(
        Behaviour::parse("slow_stream", None),
        Some(Behaviour::SlowStream(Behaviour::DEFAULT_DELAY))
    );
    assert_eq!(
        Behaviour::parse("long_stream", None),
        Some(Behaviour::LongStream(Behaviour::DEFAULT_LONG_STREAM))
    );
    assert_eq!(Behaviour::parse("nope", None), None);
}

#[tokio::test]
async fn dropping_the_fake_stops_the_server() {
    let fakes = FakeProviders::start().unwrap();
    let addr = fakes.addr();
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    drop(fakes);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "still accepting after drop");
    }
}

#[tokio::test]
async fn the_binary_prints_its_address_and_serves() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keyward-fakes"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let base = line.strip_prefix("keyward-fakes: listening on ").unwrap().to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{line}");
    let c = client();
    assert_eq!(
        c.get(format!("{base}/_fake/healthz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "ok"
    );
    let r = c
        .post(format!("{base}/_fake/keys"))
        .json(&json!({"key": "AQ.Ab8RN6BinaryFake", "behaviour": "ok", "provider": "google"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let call = build_probe(Provider::Google, &model(Provider::Google));
    let resp = c
        .post(format!("{base}{}", call.path_and_query))
        .header("content-type", "application/json")
        .header("x-goog-api-key", "AQ.Ab8RN6BinaryFake")
        .body(call.body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let answer = parse_chat(Provider::Google, status, &resp.bytes().await.unwrap()).unwrap();
    assert_eq!(answer.content, "Hello");
    child.start_kill().unwrap();
    let _ = child.wait().await;
}

/// The native APIs beyond chat answer in their own shapes, and keyward-providers reads them.
#[tokio::test]
async fn native_apis_answer_in_their_own_shapes() {
    let fakes = FakeProviders::start().unwrap();
    for p in Provider::ALL {
        fakes.set_key(p, &key(p, "ok"), Behaviour::Ok);
    }
    let cases = [
        (
            NativeApi::AnthropicCountTokens,
            json!({"model": "claude-haiku-5-5", "messages": [{"role": "user", "content": "one two three"}]}),
            None,
        ),
        (
            NativeApi::OpenAiResponses,
            json!({"model": "gpt-6-luna", "input": "one two three", "max_output_tokens": 16}),
            None,
        ),
        (
            NativeApi::OpenAiEmbeddings,
            json!({"model": "text-embedding-3-small", "input": ["one two", "three"]}),
            None,
        ),
        (
            NativeApi::GoogleGenerate(GoogleVersion::V1),
            json!({"contents": [{"role": "user", "parts": [{"text": "one two three"}]}]}),
            Some(("gemini-3.8-flash", false)),
        ),
    ];
    for (api, body, google) in cases {
        let p = api.provider();
        let req = read_native_request(api, body.to_string().as_bytes(), google).unwrap();
        let call = native_call(&req, |_| None);
        let resp = send(&fakes, p, &call, Some(&key(p, "ok"))).await;
        assert_eq!(resp.status(), 200, "{api:?}");
        let bytes = resp.bytes().await.unwrap();
        let answer = parse_native(api, 200, &bytes).unwrap();
        assert_eq!(
            answer.usage.input_tokens,
            3,
            "{api:?}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    // The Responses API streams its own events, ending with response.completed.
    let req = read_native_request(
        NativeApi::OpenAiResponses,
        json!({"model": "gpt-6-luna", "input": "one two three", "stream": true})
            .to_string()
            .as_bytes(),
        None,
    )
    .unwrap();
    let resp = send(
        &fakes,
        Provider::OpenAi,
        &native_call(&req, |_| None),
        Some(&key(Provider::OpenAi, "ok")),
    )
    .await;
    let mut d = StreamDecoder::for_native(NativeApi::OpenAiResponses);
    let mut text = String::new();
    for e in d.feed(&resp.bytes().await.unwrap()) {
        if let StreamEvent::Delta(t) = e {
            text.push_str(&t);
        }
    }
    assert_eq!(text, "Hello from fake openai.");
    let s = d.finish().unwrap();
    assert_eq!((s.usage.input_tokens, s.usage.output_tokens), (3, 4));
    // Embeddings in base64, as the openai SDK asks for them by default: little-endian f32s.
    let req = read_native_request(
        NativeApi::OpenAiEmbeddings,
        json!({"model": "text-embedding-3-small", "input": "x", "encoding_format": "base64", "dimensions": 4})
            .to_string()
            .as_bytes(),
        None,
    )
    .unwrap();
    let v: Value = send(
        &fakes,
        Provider::OpenAi,
        &native_call(&req, |_| None),
        Some(&key(Provider::OpenAi, "ok")),
    )
    .await
    .json()
    .await
    .unwrap();
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw.len(), 16);
    // The Responses API's own limits.
    let req = read_native_request(
        NativeApi::OpenAiResponses,
        json!({"model": "gpt-6-luna", "input": "x", "max_output_tokens": 1})
            .to_string()
            .as_bytes(),
        None,
    )
    .unwrap();
    let resp = send(
        &fakes,
        Provider::OpenAi,
        &native_call(&req, |_| None),
        Some(&key(Provider::OpenAi, "ok")),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "integer_below_min_value");
    // A retired Google model through v1 names its version.
    let req = read_native_request(
        NativeApi::GoogleGenerate(GoogleVersion::V1),
        json!({"contents": [{"role": "user", "parts": [{"text": "x"}]}]})
            .to_string()
            .as_bytes(),
        Some(("gemini-1.5-flash", false)),
    )
    .unwrap();
    let resp = send(
        &fakes,
        Provider::Google,
        &native_call(&req, |_| None),
        Some(&key(Provider::Google, "ok")),
    )
    .await;
    assert_eq!(resp.status(), 404);
    let f = parse_native(req.api, 404, &resp.bytes().await.unwrap()).unwrap_err();
    assert!(f.message.contains("for API version v1,"), "{}", f.message);
}

#[tokio::test]
async fn any_key_mode_is_steered_by_marker_words() {
    let fakes = FakeProviders::start().unwrap();
    let p = Provider::OpenAi;
    let probe = build_probe(p, &model(p));
    // Off: an unregistered key is unknown.
    assert_eq!(send(&fakes, p, &probe, Some(&key(p, "anything"))).await.status(), 401);
    fakes.accept_any_key(true);
    assert_eq!(send(&fakes, p, &probe, Some(&key(p, "anything"))).await.status(), 200);
    for (word, status) in [
        ("Invalid", 401),
        ("no-credit", 429),
        ("RATE_LIMITED", 429),
        ("unavailable", 503),
    ] {
        let resp = send(&fakes, p, &probe, Some(&key(p, word))).await;
        assert_eq!(resp.status().as_u16(), status, "{word}");
    }
    let g = Provider::Google;
    let resp = send(&fakes, g, &build_probe(g, &model(g)), Some(&key(g, "leaked"))).await;
    let f = diagnose(g, 403, &resp.bytes().await.unwrap());
    assert_eq!(f.diagnosis, Diagnosis::KeyReportedLeaked);
    // A registered key still wins, and Google still refuses standard keys.
    fakes.set_key(p, &key(p, "leaked-but-registered"), Behaviour::Ok);
    assert_eq!(
        send(&fakes, p, &probe, Some(&key(p, "leaked-but-registered")))
            .await
            .status(),
        200
    );
    let standard = "AIzaSyA1234567890abcdefghijklmnopqrstu";
    assert_eq!(
        send(&fakes, g, &build_probe(g, &model(g)), Some(standard))
            .await
            .status(),
        400
    );
    assert_eq!(Behaviour::from_marker("sk-proj-plain"), Some(Behaviour::Ok));
}
