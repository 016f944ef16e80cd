//! Streamed chat answers: an incremental decoder for each provider's event stream.

use keyward_core::Provider;
use serde_json::Value;

use crate::failure::{Diagnosis, ProviderFailure};
use crate::native::NativeApi;
use crate::response::Usage;
use crate::sse::{SseEvent, SseParser};
use crate::wire::wire;

pub use crate::sse::MAX_EVENT_BYTES;

/// What a stream chunk carried: text to pass on, or the provider's in-stream error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    Delta(String),
    Error(ProviderFailure),
}

/// The end of a complete stream: the same fields as a plain answer without its content.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamSummary {
    pub id: String,
    pub model: String,
    pub stop_reason: String,
    pub usage: Usage,
}

/// Decodes a streamed chat answer (a 2xx `text/event-stream`; error statuses go to
/// [`diagnose`](crate::diagnose)) fed in chunks cut anywhere.
///
/// `feed` returns the text deltas and in-stream errors of every event completed by the new
/// bytes. After the first error (or an event larger than [`MAX_EVENT_BYTES`]) the decoder
/// ignores the rest. `finish` says whether the stream was complete:
/// - Anthropic ends with `message_stop`; usage comes from `message_start` and `message_delta`.
/// - OpenAI ends with `data: [DONE]`; usage comes from the final chunk with empty `choices`
///   (asked for with `stream_options.include_usage`, which [`build_chat`](crate::build_chat)
///   always sends).
/// - Google (`alt=sse`) ends with a candidate carrying `finishReason` (or a prompt
///   `blockReason`); usage is the latest `usageMetadata`.
#[derive(Debug)]
pub struct StreamDecoder {
    provider: Provider,
    /// The API answering: OpenAI's Responses API streams other events than its chat
    /// completions.
    api: NativeApi,
    sse: SseParser,
    state: StreamState,
    events: Vec<SseEvent>,
}

/// What the provider modules read out of the events so far.
#[derive(Debug, Default)]
pub(crate) struct StreamState {
    pub summary: StreamSummary,
    pub usage_seen: bool,
    pub ended: bool,
    pub failure: Option<ProviderFailure>,
    events: u64,
    /// The first few non-blank bytes of the body, to tell a cut-short stream from a body
    /// that never was one.
    head: Vec<u8>,
}

impl StreamState {
    /// Records the stream's first failure and reports it.
    pub(crate) fn fail(&mut self, failure: ProviderFailure, out: &mut Vec<StreamEvent>) {
        if self.failure.is_none() {
            out.push(StreamEvent::Error(failure.clone()));
            self.failure = Some(failure);
        }
    }

    /// Parses an event's data as JSON, failing the stream when it is not.
    pub(crate) fn json(&mut self, provider: Provider, data: &str, out: &mut Vec<StreamEvent>) -> Option<Value> {
        match serde_json::from_str(data) {
            Ok(v) => Some(v),
            Err(_) => {
                self.fail(
                    ProviderFailure::malformed(provider, None, "a stream event that is not JSON"),
                    out,
                );
                None
            }
        }
    }

    pub(crate) fn delta(text: &str, out: &mut Vec<StreamEvent>) {
        if !text.is_empty() {
            out.push(StreamEvent::Delta(text.to_owned()));
        }
    }
}

impl StreamDecoder {
    /// The decoder for a streamed native answer of `api` (OpenAI's Responses API ends with
    /// `response.completed`, which carries the usage; the others as their chats do).
    pub fn for_native(api: NativeApi) -> StreamDecoder {
        let provider = api.provider();
        StreamDecoder {
            provider,
            api,
            sse: SseParser::default(),
            state: StreamState::default(),
            events: Vec::new(),
        }
    }

    /// The decoder for a streamed answer of [`build_chat`](crate::build_chat).
    pub fn new(provider: Provider) -> StreamDecoder {
        StreamDecoder::for_native(wire(provider).chat_api())
    }

    pub fn feed(&mut self, bytes: &[u8]) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        if self.state.failure.is_some() {
            return out;
        }
        if self.state.head.len() < HEAD_BYTES {
            let start = if self.state.head.is_empty() {
                bytes
                    .iter()
                    .position(|b| !b.is_ascii_whitespace())
                    .unwrap_or(bytes.len())
            } else {
                0
            };
            let rest = bytes.get(start..).unwrap_or_default();
            let take = rest.len().min(HEAD_BYTES - self.state.head.len());
            self.state.head.extend_from_slice(rest.get(..take).unwrap_or_default());
        }
        let mut events = std::mem::take(&mut self.events);
        let fits = self.sse.feed(bytes, &mut events);
        for event in events.drain(..) {
            if self.state.failure.is_some() {
                break;
            }
            self.state.events += 1;
            wire(self.provider).on_event(self.api, &mut self.state, &event, &mut out);
        }
        self.events = events;
        if !fits {
            let what = format!("a stream event larger than {} MiB", MAX_EVENT_BYTES / (1024 * 1024));
            self.state
                .fail(ProviderFailure::malformed(self.provider, None, &what), &mut out);
        }
        out
    }

    /// Whether the provider's end marker has arrived.
    pub fn is_complete(&self) -> bool {
        self.state.ended && self.state.failure.is_none()
    }

    /// Call when the body has ended (or broken off). `Ok` only for a stream that reached the
    /// provider's end marker, carried usage and had no error; else the in-stream error, or a
    /// failure saying the stream was cut short (`provider_unavailable`) or was not the
    /// provider's event stream at all (`malformed_response`). Idempotent.
    pub fn finish(&mut self) -> Result<StreamSummary, ProviderFailure> {
        let p = self.provider;
        if let Some(failure) = &self.state.failure {
            return Err(failure.clone());
        }
        if !self.state.ended {
            let failure = if self.state.events == 0 && !looks_like_event_stream(&self.state.head) {
                ProviderFailure::malformed(p, None, "a body that is not an event stream")
            } else if self.state.events == 0 && self.state.head.is_empty() {
                let message = format!("{}'s stream ended before it sent anything", p.display_name());
                ProviderFailure::new(None, Diagnosis::ProviderUnavailable, &message)
            } else {
                let marker = wire(p).stream_end_marker(self.api);
                let message = format!(
                    "{}'s stream ended before {marker}: the answer is incomplete",
                    p.display_name()
                );
                ProviderFailure::new(None, Diagnosis::ProviderUnavailable, &message)
            };
            return Err(failure);
        }
        if !self.state.usage_seen {
            return Err(ProviderFailure::malformed(
                p,
                None,
                "a stream that reported no token usage",
            ));
        }
        Ok(self.state.summary.clone())
    }
}

const HEAD_BYTES: usize = 8;

/// Whether the start of a body can be the start of an event stream (after an optional BOM,
/// a field name or a comment).
fn looks_like_event_stream(head: &[u8]) -> bool {
    let head = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head);
    if head.is_empty() {
        return true;
    }
    let fields: [&[u8]; 5] = [b"data", b"event", b"id", b"retry", b":"];
    fields.iter().any(|f| head.starts_with(f) || f.starts_with(head))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANTHROPIC_STREAM: &str = "event: message_start\n\
data: {\"type\": \"message_start\", \"message\": {\"id\": \"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY\", \"type\": \"message\", \"role\": \"assistant\", \"content\": [], \"model\": \"claude-3-5-sonnet-20241022\", \"stop_reason\": null, \"stop_sequence\": null, \"usage\": {\"input_tokens\": 25, \"output_tokens\": 1}}}\n\
\n\
event: content_block_start\n\
data: {\"type\": \"content_block_start\", \"index\": 0, \"content_block\": {\"type\": \"text\", \"text\": \"\"}}\n\
\n\
event: ping\n\
data: {\"type\": \"ping\"}\n\
\n\
event: content_block_delta\n\
data: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \"Héllo\"}}\n\
\n\
event: content_block_delta\n\
data: {\"type\": \"content_block_delta\", \"index\": 0, \"delta\": {\"type\": \"text_delta\", \"text\": \" wörld €\"}}\n\
\n\
event: content_block_stop\n\
data: {\"type\": \"content_block_stop\", \"index\": 0}\n\
\n\
event: message_delta\n\
data: {\"type\": \"message_delta\", \"delta\": {\"stop_reason\": \"end_turn\", \"stop_sequence\":null}, \"usage\": {\"output_tokens\": 15}}\n\
\n\
event: message_stop\n\
data: {\"type\": \"message_stop\"}\n\
\n";

    const OPENAI_STREAM: &str = "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\
\n\
data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Héllo\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\
\n\
data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" wörld €\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\
\n\
data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null}\n\
\n\
data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4,\"total_tokens\":13,\"prompt_tokens_details\":{\"cached_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0}}}\n\
\n\
data: [DONE]\n\
\n";

    const GOOGLE_STREAM: &str = "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Héllo\"}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 8,\"totalTokenCount\": 8},\"modelVersion\": \"gemini-1.5-flash-002\",\"responseId\": \"resp-abc\"}\r\n\
\r\n\
data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \" wörld €\"}],\"role\": \"model\"},\"finishReason\": \"STOP\",\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 8,\"candidatesTokenCount\": 3,\"totalTokenCount\": 11,\"promptTokensDetails\": [{\"modality\": \"TEXT\",\"tokenCount\": 8}]},\"modelVersion\": \"gemini-1.5-flash-002\",\"responseId\": \"resp-abc\"}\r\n\
\r\n";

    fn decode_in(
        provider: Provider,
        parts: &[&[u8]],
    ) -> (String, Vec<ProviderFailure>, Result<StreamSummary, ProviderFailure>) {
        let mut d = StreamDecoder::new(provider);
        let mut text = String::new();
        let mut errors = Vec::new();
        for part in parts {
            for ev in d.feed(part) {
                match ev {
                    StreamEvent::Delta(t) => text.push_str(&t),
                    StreamEvent::Error(e) => errors.push(e),
                }
            }
        }
        (text, errors, d.finish())
    }

    fn samples() -> [(Provider, &'static str, StreamSummary); 3] {
        [
            (
                Provider::Anthropic,
                ANTHROPIC_STREAM,
                StreamSummary {
                    id: "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY".into(),
                    model: "claude-3-5-sonnet-20241022".into(),
                    stop_reason: "end_turn".into(),
                    usage: Usage {
                        input_tokens: 25,
                        output_tokens: 15,
                    },
                },
            ),
            (
                Provider::OpenAi,
                OPENAI_STREAM,
                StreamSummary {
                    id: "chatcmpl-123".into(),
                    model: "gpt-4o-mini".into(),
                    stop_reason: "stop".into(),
                    usage: Usage {
                        input_tokens: 9,
                        output_tokens: 4,
                    },
                },
            ),
            (
                Provider::Google,
                GOOGLE_STREAM,
                StreamSummary {
                    id: "resp-abc".into(),
                    model: "gemini-1.5-flash-002".into(),
                    stop_reason: "STOP".into(),
                    usage: Usage {
                        input_tokens: 8,
                        output_tokens: 3,
                    },
                },
            ),
        ]
    }

    #[test]
    fn sample_streams_decode() {
        for (p, stream, summary) in samples() {
            let (text, errors, end) = decode_in(p, &[stream.as_bytes()]);
            assert_eq!(text, "Héllo wörld €", "{p}");
            assert!(errors.is_empty(), "{p}: {errors:?}");
            assert_eq!(end, Ok(summary), "{p}");
        }
    }

    #[test]
    fn a_split_at_every_byte_gives_the_same_result() {
        for (p, stream, _) in samples() {
            let bytes = stream.as_bytes();
            let whole = decode_in(p, &[bytes]);
            for i in 0..=bytes.len() {
                assert_eq!(decode_in(p, &[&bytes[..i], &bytes[i..]]), whole, "{p} split at {i}");
            }
            let singles: Vec<&[u8]> = bytes.chunks(1).collect();
            assert_eq!(decode_in(p, &singles), whole, "{p} byte by byte");
        }
    }

    #[test]
    fn deltas_come_out_as_soon_as_their_event_is_complete() {
        let mut d = StreamDecoder::new(Provider::OpenAi);
        let end_of_second = OPENAI_STREAM.match_indices("\n\n").nth(1).unwrap().0 + 2;
        let events = d.feed(&OPENAI_STREAM.as_bytes()[..end_of_second]);
        assert_eq!(events, [StreamEvent::Delta("Héllo".into())]);
        assert!(!d.is_complete());
    }

    #[test]
    fn truncated_streams_fail_at_every_cut() {
        for (p, stream, _) in samples() {
            let bytes = stream.as_bytes();
            // Cut before the end marker's event is complete: never a success.
            let marker_start = match p {
                Provider::Anthropic => stream.find("event: message_stop").unwrap(),
                Provider::OpenAi => stream.find("data: [DONE]").unwrap(),
                Provider::Google => stream.rfind("data: ").unwrap(),
            };
            let marker_end = marker_start
                + stream[marker_start..]
                    .find("\n\n")
                    .or_else(|| stream[marker_start..].find("\r\n\r\n"))
                    .unwrap();
            for cut in 0..=marker_end {
                let (_, errors, end) = decode_in(p, &[&bytes[..cut]]);
                assert!(errors.is_empty(), "{p} cut at {cut}");
                let failure = end.unwrap_err();
                assert_eq!(failure.status, None);
                assert!(
                    matches!(failure.diagnosis, Diagnosis::ProviderUnavailable),
                    "{p} cut at {cut}: {failure:?}"
                );
            }
        }
    }

    #[test]
    fn truncated_stream_messages_name_the_missing_marker() {
        let (_, _, end) = decode_in(Provider::Anthropic, &[&ANTHROPIC_STREAM.as_bytes()[..300]]);
        let f = end.unwrap_err();
        assert_eq!(
            f.message,
            "Anthropic's stream ended before message_stop: the answer is incomplete"
        );
        let (_, _, end) = decode_in(Provider::OpenAi, &[b""]);
        assert_eq!(
            end.unwrap_err().message,
            "OpenAI's stream ended before it sent anything"
        );
    }

    #[test]
    fn a_body_that_is_not_a_stream_is_malformed() {
        for p in Provider::ALL {
            let (_, _, end) = decode_in(p, &[b"<html><body>hello</body></html>"]);
            let f = end.unwrap_err();
            assert_eq!(f.diagnosis, Diagnosis::MalformedResponse, "{p}");
            assert!(f.message.contains("not an event stream"), "{}", f.message);
        }
    }

    #[test]
    fn anthropic_in_stream_error() {
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"m\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n\
event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"ignored\"}}\n\n";
        let (text, errors, end) = decode_in(Provider::Anthropic, &[stream.as_bytes()]);
        assert_eq!(text, "");
        let expected = ProviderFailure::new(None, Diagnosis::ProviderUnavailable, "Overloaded");
        assert_eq!(errors, std::slice::from_ref(&expected));
        assert_eq!(end, Err(expected));
    }

    #[test]
    fn openai_in_stream_error() {
        let stream = "data: {\"error\": {\"message\": \"The server had an error while processing your request. Sorry about that!\", \"type\": \"server_error\", \"param\": null, \"code\": null}}\n\n";
        let (_, errors, end) = decode_in(Provider::OpenAi, &[stream.as_bytes()]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].diagnosis, Diagnosis::ProviderUnavailable);
        assert_eq!(
            end.unwrap_err().message,
            "The server had an error while processing your request. Sorry about that!"
        );
    }

    #[test]
    fn google_in_stream_error() {
        let stream = "data: {\"error\": {\"code\": 429, \"message\": \"Resource has been exhausted (e.g. check quota).\", \"status\": \"RESOURCE_EXHAUSTED\"}}\r\n\r\n";
        let (_, errors, end) = decode_in(Provider::Google, &[stream.as_bytes()]);
        assert_eq!(errors.len(), 1);
        let f = end.unwrap_err();
        assert_eq!(f.diagnosis, Diagnosis::RateLimited);
        assert_eq!(f.status, None);
    }

    #[test]
    fn garbage_data_lines_fail_the_stream() {
        let (_, errors, end) = decode_in(Provider::OpenAi, &[b"data: {not json\n\ndata: [DONE]\n\n"]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].diagnosis, Diagnosis::MalformedResponse);
        assert!(end.is_err());
    }

    #[test]
    fn openai_stream_without_usage_is_reported() {
        let without_usage: String = OPENAI_STREAM
            .split("\n\n")
            .filter(|e| !e.contains("\"choices\":[]"))
            .map(|e| format!("{e}\n\n"))
            .collect();
        let (text, _, end) = decode_in(Provider::OpenAi, &[without_usage.as_bytes()]);
        assert_eq!(text, "Héllo wörld €");
        let f = end.unwrap_err();
        assert_eq!(f.diagnosis, Diagnosis::MalformedResponse);
        assert!(f.message.contains("no token usage"));
    }

    #[test]
    fn google_blocked_prompt_ends_the_stream() {
        let stream = "data: {\"promptFeedback\": {\"blockReason\": \"SAFETY\"}, \"usageMetadata\": {\"promptTokenCount\": 4, \"totalTokenCount\": 4}, \"modelVersion\": \"gemini-1.5-flash\"}\r\n\r\n";
        let (text, _, end) = decode_in(Provider::Google, &[stream.as_bytes()]);
        assert_eq!(text, "");
        let s = end.unwrap();
        assert_eq!(s.stop_reason, "SAFETY");
        assert_eq!(
            s.usage,
            Usage {
                input_tokens: 4,
                output_tokens: 0
            }
        );
    }

    #[test]
    fn oversized_event_is_an_error() {
        let mut d = StreamDecoder::new(Provider::Anthropic);
        let mut events = d.feed(b"data: ");
        let big = vec![b'x'; MAX_EVENT_BYTES];
        events.extend(d.feed(&big));
        assert_eq!(events.len(), 1);
        assert!(matches!(&events[0], StreamEvent::Error(f) if f.diagnosis == Diagnosis::MalformedResponse));
        assert!(d.feed(b"\n\n").is_empty());
        assert!(d.finish().is_err());
    }

    #[test]
    fn responses_streams_end_with_response_completed() {
        let stream = "event: response.created\n\
data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"gpt-6-luna\",\"output\":[],\"usage\":null}}\n\n\
event: response.output_text.delta\n\
data: {\"type\":\"response.output_text.delta\",\"sequence_number\":3,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hé\"}\n\n\
event: response.output_text.delta\n\
data: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"llo\"}\n\n\
event: response.completed\n\
data: {\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"gpt-6-luna\",\"usage\":{\"input_tokens\":12,\"output_tokens\":2,\"total_tokens\":14}}}\n\n";
        for cut in 0..stream.len() {
            if !stream.is_char_boundary(cut) {
                continue;
            }
            let mut d = StreamDecoder::for_native(crate::NativeApi::OpenAiResponses);
            let mut text = String::new();
            for part in [&stream[..cut], &stream[cut..]] {
                for e in d.feed(part.as_bytes()) {
                    if let StreamEvent::Delta(t) = e {
                        text.push_str(&t);
                    }
                }
            }
            assert_eq!(text, "Héllo");
            assert!(d.is_complete());
            let s = d.finish().unwrap();
            assert_eq!(
                (s.id.as_str(), s.usage.input_tokens, s.usage.output_tokens),
                ("resp_1", 12, 2)
            );
        }
        // Cut before response.completed: incomplete, naming the marker.
        let mut d = StreamDecoder::for_native(crate::NativeApi::OpenAiResponses);
        let half = stream.find("event: response.completed").unwrap();
        d.feed(&stream.as_bytes()[..half]);
        assert!(d.finish().unwrap_err().message.contains("response.completed"));
        // A failed response is a failure.
        let mut d = StreamDecoder::for_native(crate::NativeApi::OpenAiResponses);
        let failed = "data: {\"type\":\"response.failed\",\"response\":{\"id\":\"resp_2\",\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"boom\"}}}\n\n";
        let events = d.feed(failed.as_bytes());
        assert!(matches!(&events[..], [StreamEvent::Error(f)] if f.message == "boom"));
    }

    #[test]
    fn finish_is_idempotent() {
        let mut d = StreamDecoder::new(Provider::OpenAi);
        d.feed(OPENAI_STREAM.as_bytes());
        assert!(d.is_complete());
        let first = d.finish();
        assert!(first.is_ok());
        assert_eq!(d.finish(), first);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(
                p in 0usize..3,
                chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16),
            ) {
                let provider = Provider::ALL[p];
                let mut d = StreamDecoder::new(provider);
                for c in &chunks {
                    let _ = d.feed(c);
                }
                let _ = d.finish();
            }

            #[test]
            fn sse_shaped_noise_never_panics(
                p in 0usize..3,
                lines in proptest::collection::vec(
                    prop_oneof![
                        Just("data: [DONE]".to_owned()),
                        Just(String::new()),
                        Just("event: error".to_owned()),
                        Just("data: {\"type\":\"message_stop\"}".to_owned()),
                        Just("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":-1}}".to_owned()),
                        Just("data: {\"candidates\":[{\"finishReason\":7,\"content\":{\"parts\":[{\"text\":null}]}}]}".to_owned()),
                        Just("data: {\"error\":{\"code\":\"x\",\"details\":[1,{\"reason\":2}]}}".to_owned()),
                        "data: \\PC{0,40}",
                        "\\PC{0,40}",
                    ],
                    0..20,
                ),
                cut in 0usize..512,
            ) {
                let provider = Provider::ALL[p];
                let text = lines.join("\n");
                let bytes = text.as_bytes();
                let cut = cut.min(bytes.len());
                let mut d = StreamDecoder::new(provider);
                let _ = d.feed(&bytes[..cut]);
                let _ = d.feed(&bytes[cut..]);
                let _ = d.finish();
            }

            #[test]
            fn any_split_of_a_sample_stream_decodes_the_same(p in 0usize..3, a in 0usize..4096, b in 0usize..4096) {
                let (provider, stream, summary) = samples()[p].clone();
                let bytes = stream.as_bytes();
                let (a, b) = (a.min(bytes.len()), b.min(bytes.len()));
                let (lo, hi) = (a.min(b), a.max(b));
                let (text, errors, end) = decode_in(provider, &[&bytes[..lo], &bytes[lo..hi], &bytes[hi..]]);
                prop_assert_eq!(text, "Héllo wörld €");
                prop_assert!(errors.is_empty());
                prop_assert_eq!(end, Ok(summary));
            }
        }
    }
}
