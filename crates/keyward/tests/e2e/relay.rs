//! Streams are relayed chunk by chunk as the provider sends them (issue 5): with a fake
//! that pauses between chunks, the first piece of text reaches the client long before the
//! provider has finished, through `ai/messages` and through each native route.
//!
//! The check compares times within one answer (first text, end of the stream), not across
//! two requests: a relayed stream leaves the provider's pauses between its first text and
//! its end, a buffered one would deliver both at once. A busy machine delays both ends of
//! one answer alike, so the check does not depend on how fast the machine is.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use keyward_core::Provider;
use keyward_fakes::{Behaviour, FakeProviders};
use serde_json::{json, Value};

use crate::ai_support::*;
use crate::common::*;

const PAUSE: Duration = Duration::from_millis(300);

/// Sends `body` to `url` and returns (time of the first body bytes holding `marker`, time
/// the body ended), both from the start of the request.
async fn first_and_end(url: &str, headers: &[(&str, &str)], body: &Value, marker: &str) -> (Duration, Duration) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut req = client.post(url).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let started = Instant::now();
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200, "stream answer status");
    let mut stream = resp.bytes_stream();
    let mut seen = Vec::new();
    let mut first = None;
    while let Some(chunk) = stream.next().await {
        seen.extend_from_slice(&chunk.unwrap());
        if first.is_none() && String::from_utf8_lossy(&seen).contains(marker) {
            first = Some(started.elapsed());
        }
    }
    let end = started.elapsed();
    (
        first.unwrap_or_else(|| panic!("{marker:?} never arrived: {}", String::from_utf8_lossy(&seen))),
        end,
    )
}

/// Each provider's native streaming request: path, key header, body, and the marker of
/// the first text chunk.
fn native_case(p: Provider) -> (&'static str, &'static str, Value, &'static str) {
    match p {
        Provider::OpenAi => (
            "/v1/chat/completions",
            "authorization",
            json!({"model": "gpt-6-luna", "messages": [{"role": "user", "content": PROMPT}], "max_completion_tokens": 8, "stream": true}),
            "\"content\":\"Hello",
        ),
        Provider::Anthropic => (
            "/v1/messages",
            "x-api-key",
            json!({"model": "claude-haiku-5-5", "max_tokens": 8, "stream": true, "messages": [{"role": "user", "content": PROMPT}]}),
            "text_delta",
        ),
        Provider::Google => (
            "/v1beta/models/gemini-3.1-flash-lite:streamGenerateContent?alt=sse",
            "x-goog-api-key",
            json!({"contents": [{"role": "user", "parts": [{"text": PROMPT}]}], "generationConfig": {"maxOutputTokens": 8}}),
            "Hello",
        ),
    }
}

/// Relayed as it arrives: through keyward, the first text came at least one of the
/// provider's pauses before the end of the stream, as it does straight from the provider.
fn assert_relayed(what: &str, (first, end): (Duration, Duration), direct: (Duration, Duration)) {
    let msg = format!(
        "{what}: first text after {first:?}, end after {end:?} through keyward; {:?} and {:?} straight from the provider",
        direct.0, direct.1
    );
    eprintln!("{msg}");
    assert!(direct.1 - direct.0 >= PAUSE, "the fake did not pause: {msg}");
    assert!(end - first >= PAUSE, "the stream was held back: {msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_reach_the_client_as_the_provider_sends_them() {
    let fake = FakeProviders::start().unwrap();
    let kw = start_on_fake(&fake, &[]);
    let (token, account) = (kw.owner_token().to_owned(), kw.owner_account().to_owned());
    let base = kw.base_url().to_owned();
    let bearer = format!("Bearer {token}");
    for p in PROVIDERS {
        let key = key_for(p);
        fake.set_key(Some(provider(p)), &key, Behaviour::SlowStream(PAUSE));
        save_key(&kw, &token, &account, p, &key).await;
        set_source(&kw, &token, &account, p, "own").await;

        let (path, header, body, marker) = native_case(provider(p));
        let key_value = if header == "authorization" {
            format!("Bearer {key}")
        } else {
            key.clone()
        };
        let mut direct_headers = vec![(header, key_value.as_str())];
        if p == "anthropic" {
            direct_headers.push(("anthropic-version", "2023-06-01"));
        }
        let direct = first_and_end(&format!("{}{path}", fake.base_url()), &direct_headers, &body, marker).await;

        let url = format!("{base}{}", ai_path(&account));
        let through = first_and_end(
            &url,
            &[("authorization", &bearer)],
            &chat_body(p, true, 8),
            "event: delta",
        )
        .await;
        assert_relayed(&format!("ai/messages {p}"), through, direct);

        let token_value = if header == "authorization" {
            bearer.clone()
        } else {
            token.clone()
        };
        let mut native_headers = vec![(header, token_value.as_str())];
        if p == "anthropic" {
            native_headers.push(("anthropic-version", "2023-06-01"));
        }
        let url = format!("{base}/v1/accounts/{account}/providers/{p}{path}");
        let through = first_and_end(&url, &native_headers, &body, marker).await;
        assert_relayed(&format!("native {p}"), through, direct);
    }
}
