//! What all three fakes share: responses, bodies that stream, stall or break, the canned
//! answer, and word counting.

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::Value;
use tokio::sync::watch;

use crate::server::STOLEN_PATH;
use crate::state::Shared;
use crate::Behaviour;

/// A finished error answer, returned early by validation (boxed: a `Response` is large).
pub(crate) type Refusal = Box<Response>;

/// A request as a provider handler sees it.
#[derive(Debug)]
pub(crate) struct Incoming<'a> {
    pub shared: &'a Shared,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

impl Incoming<'_> {
    /// A header's value, if present and valid text.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A successful answer before delivery.
#[derive(Debug)]
pub(crate) enum Answer {
    Plain(Vec<u8>),
    Stream {
        content_type: &'static str,
        chunks: Vec<Bytes>,
        /// The index of the first chunk that carries answer text (`long_stream` sends the
        /// chunks before it at once).
        text_from: usize,
    },
}

pub(crate) fn response(status: StatusCode, content_type: &'static str, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub(crate) fn json(status: StatusCode, value: &Value) -> Response {
    response(status, "application/json", Body::from(value.to_string()))
}

/// The value of query parameter `name`, if given.
pub(crate) fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `now + secs` as RFC 3339 (seconds, UTC), the form of Anthropic's rate-limit resets.
pub(crate) fn rfc3339_in(secs: i64) -> String {
    let t = time::OffsetDateTime::now_utc() + time::Duration::seconds(secs);
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Sets a header when its value is valid (ids built by the fake always are).
pub(crate) fn set_header(response: &mut Response, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}

/// Waits `delay`; `false` when the fake shut down first.
async fn pause(delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        _ = shutdown.wait_for(|stopped| *stopped) => false,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    Clean,
    /// Break the connection after the last chunk.
    Abort,
}

struct Chunks {
    chunks: VecDeque<Bytes>,
    delay: Option<Duration>,
    /// How many chunks go out before the first pause.
    lead: usize,
    sent: usize,
    ending: Ending,
    done: bool,
    shutdown: watch::Receiver<bool>,
}

fn broken() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "keyward-fakes: connection dropped on purpose",
    )
}

/// A chunked body sending `chunks` with `delay` between them, then ending cleanly or
/// breaking the connection. Shutting the fake down breaks it at the next pause.
pub(crate) fn chunked(shared: &Shared, chunks: Vec<Bytes>, delay: Option<Duration>, ending: Ending) -> Body {
    paced(shared, chunks, delay, 1, ending)
}

/// [`chunked`], with the first `lead` chunks sent at once and `delay` before each later one.
fn paced(shared: &Shared, chunks: Vec<Bytes>, delay: Option<Duration>, lead: usize, ending: Ending) -> Body {
    let state = Chunks {
        chunks: chunks.into(),
        delay,
        lead,
        sent: 0,
        ending,
        done: false,
        shutdown: shared.shutdown.clone(),
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        if let Some(chunk) = st.chunks.pop_front() {
            if let (true, Some(delay)) = (st.sent >= st.lead, st.delay) {
                if !pause(delay, &mut st.shutdown).await {
                    st.done = true;
                    return Some((Err(broken()), st));
                }
            }
            st.sent += 1;
            return Some((Ok(chunk), st));
        }
        st.done = true;
        match st.ending {
            Ending::Clean => None,
            Ending::Abort => {
                if st.sent > 0 {
                    // Let hyper flush what was sent (it flushes when the body is pending),
                    // so the client really gets part of the answer before the break.
                    tokio::task::yield_now().await;
                }
                Some((Err(broken()), st))
            }
        }
    });
    Body::from_stream(stream)
}

/// A response whose body breaks before a byte is sent: hyper closes the connection without
/// writing the status line.
pub(crate) fn dropped(shared: &Shared) -> Response {
    response(
        StatusCode::OK,
        "application/json",
        chunked(shared, Vec::new(), None, Ending::Abort),
    )
}

const GARBAGE: &str = "<!DOCTYPE html>\n<html><head><title>Welcome</title></head>\
<body><h1>It works!</h1><p>This is not the API you are looking for.</p></body></html>\n";

/// Behaviours that do not depend on the provider: `None` when the request should go on.
pub(crate) async fn transport(shared: &Shared, behaviour: Behaviour) -> Option<Response> {
    match behaviour {
        Behaviour::Stall => {
            let mut shutdown = shared.shutdown.clone();
            let _ = shutdown.wait_for(|stopped| *stopped).await;
            Some(dropped(shared))
        }
        Behaviour::Drop => Some(dropped(shared)),
        Behaviour::Garbage => Some(response(
            StatusCode::OK,
            "text/html; charset=utf-8",
            Body::from(GARBAGE),
        )),
        Behaviour::Redirect => {
            let mut r = response(
                StatusCode::TEMPORARY_REDIRECT,
                "text/plain; charset=utf-8",
                Body::empty(),
            );
            set_header(&mut r, "location", &format!("{}{STOLEN_PATH}", shared.base_url));
            Some(r)
        }
        _ => None,
    }
}

/// Sends a successful answer the way `behaviour` says (whole, slowly, cut short, broken).
pub(crate) async fn deliver(shared: &Shared, answer: Answer, behaviour: Behaviour) -> Response {
    match answer {
        Answer::Plain(bytes) => match behaviour {
            Behaviour::Truncated => {
                let half = bytes.get(..bytes.len() / 2).unwrap_or_default().to_vec();
                response(StatusCode::OK, "application/json", Body::from(half))
            }
            Behaviour::DropMidStream => {
                let half = Bytes::copy_from_slice(bytes.get(..bytes.len() / 2).unwrap_or_default());
                response(
                    StatusCode::OK,
                    "application/json",
                    chunked(shared, vec![half], None, Ending::Abort),
                )
            }
            Behaviour::SlowStream(delay) | Behaviour::LongStream(delay) => {
                let mut shutdown = shared.shutdown.clone();
                if !pause(delay, &mut shutdown).await {
                    return dropped(shared);
                }
                response(StatusCode::OK, "application/json", Body::from(bytes))
            }
            _ => response(StatusCode::OK, "application/json", Body::from(bytes)),
        },
        Answer::Stream {
            content_type,
            chunks,
            text_from,
        } => {
            let half = (chunks.len() / 2).max(1);
            let body = match behaviour {
                Behaviour::Truncated => chunked(shared, chunks.into_iter().take(half).collect(), None, Ending::Clean),
                Behaviour::DropMidStream => {
                    chunked(shared, chunks.into_iter().take(half).collect(), None, Ending::Abort)
                }
                Behaviour::SlowStream(delay) => chunked(shared, chunks, Some(delay), Ending::Clean),
                Behaviour::LongStream(total) => {
                    // The pauses after the first text share `total` evenly.
                    let lead = (text_from + 1).min(chunks.len());
                    let pauses = u32::try_from(chunks.len().saturating_sub(lead).max(1)).unwrap_or(u32::MAX);
                    paced(shared, chunks, Some(total / pauses), lead, Ending::Clean)
                }
                _ => chunked(shared, chunks, None, Ending::Clean),
            };
            let mut r = response(StatusCode::OK, content_type, body);
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
    }
}

/// The canned answer, cut to `max_tokens` words: the words (each after the first with its
/// leading space, so they concatenate to the text) and whether it was cut.
pub(crate) fn reply(provider_word: &str, max_tokens: u64) -> (Vec<String>, bool) {
    let text = format!("Hello from fake {provider_word}.");
    let all: Vec<&str> = text.split(' ').collect();
    let keep = usize::try_from(max_tokens).unwrap_or(usize::MAX).min(all.len());
    let words = all
        .iter()
        .take(keep)
        .enumerate()
        .map(|(i, w)| if i == 0 { (*w).to_owned() } else { format!(" {w}") })
        .collect();
    (words, keep < all.len())
}

/// Whitespace-separated words in `text`.
pub(crate) fn count_words(text: &str) -> u64 {
    u64::try_from(text.split_whitespace().count()).unwrap_or(u64::MAX)
}

/// Words in a message content: a string, or an array of blocks/parts with `text`.
pub(crate) fn content_words(content: &Value) -> u64 {
    match content {
        Value::String(s) => count_words(s),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .map(count_words)
            .sum(),
        _ => 0,
    }
}

/// One `event:`/`data:` SSE event (Anthropic framing).
pub(crate) fn sse_event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// One `data:` SSE event ending in `\n\n` (OpenAI framing).
pub(crate) fn sse_data(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// One `data:` SSE event ending in `\r\n\r\n` (Google framing).
pub(crate) fn sse_data_crlf(data: &Value) -> Bytes {
    Bytes::from(format!("data: {data}\r\n\r\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_is_cut_to_max_tokens() {
        assert_eq!(reply("google", 1), (vec!["Hello".to_owned()], true));
        let (words, cut) = reply("openai", 100);
        assert_eq!(words.concat(), "Hello from fake openai.");
        assert!(!cut);
        assert!(!reply("x", 4).1);
        assert_eq!(reply("x", 0), (vec![], true));
    }

    #[test]
    fn words_are_counted_in_strings_and_blocks() {
        assert_eq!(count_words("  one two\tthree\n"), 3);
        assert_eq!(
            content_words(&serde_json::json!([{"type": "text", "text": "a b"}, {"text": "c"}])),
            3
        );
        assert_eq!(content_words(&serde_json::json!(7)), 0);
    }
}
