//! Plain (not streamed) chat answers.

use keyward_core::Provider;
use serde::{Deserialize, Serialize};

use crate::failure::{diagnose, ProviderFailure};
use crate::wire::wire;

/// Tokens a call used, as the provider counted them.
///
/// Input counts everything the provider bills as input (Anthropic: `input_tokens` plus cache
/// creation and cache read tokens; OpenAI: `prompt_tokens`; Google: `promptTokenCount` plus
/// `toolUsePromptTokenCount`). Output counts everything billed as output (Google:
/// `candidatesTokenCount` plus `thoughtsTokenCount`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// A plain chat answer. `stop_reason` is the provider's own word (`end_turn`, `max_tokens`;
/// `stop`, `length`; `STOP`, `MAX_TOKENS`); `id` is the provider's message id (Google:
/// `responseId`); `model` is the model the provider says answered (Google: `modelVersion`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatResponse {
    pub id: String,
    pub model: String,
    pub content: String,
    pub stop_reason: String,
    pub usage: Usage,
}

/// Reads a plain chat answer. A status outside 2xx goes to [`diagnose`]; a 2xx whose body is
/// not the provider's answer (not JSON, cut off, fields missing, no usage) is a
/// `malformed_response` whose message says which; a 2xx carrying the provider's error envelope
/// is read as that error.
pub fn parse_chat(provider: Provider, status: u16, body: &[u8]) -> Result<ChatResponse, ProviderFailure> {
    if !(200..300).contains(&status) {
        return Err(diagnose(provider, status, body));
    }
    let wire = wire(provider);
    wire.parse_answer(body).map_err(|e| {
        wire.read_error(status, body)
            .unwrap_or_else(|| ProviderFailure::malformed(provider, Some(status), json_problem(&e)))
    })
}

/// How a body failed to be an answer, as the end of a sentence. Never quotes the body.
pub(crate) fn json_problem(e: &serde_json::Error) -> &'static str {
    if e.is_eof() {
        "an answer cut off before its end (incomplete JSON)"
    } else if e.is_syntax() {
        "a body that is not JSON"
    } else {
        "JSON that is not a chat answer (fields missing or of the wrong type)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Diagnosis;

    const ANTHROPIC_OK: &str = r#"{
      "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
      "type": "message",
      "role": "assistant",
      "content": [{"type": "text", "text": "Hi! My name is Claude."}, {"type": "text", "text": " Bye."}],
      "model": "claude-3-5-sonnet-20241022",
      "stop_reason": "end_turn",
      "stop_sequence": null,
      "usage": {"input_tokens": 2095, "output_tokens": 503, "cache_creation_input_tokens": 10, "cache_read_input_tokens": 5}
    }"#;

    const OPENAI_OK: &str = r#"{
      "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
      "object": "chat.completion",
      "created": 1741569952,
      "model": "gpt-4o-mini-2024-07-18",
      "choices": [{
        "index": 0,
        "message": {"role": "assistant", "content": "Hello! How can I assist you today?", "refusal": null, "annotations": []},
        "logprobs": null,
        "finish_reason": "stop"
      }],
      "usage": {
        "prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
      },
      "service_tier": "default",
      "system_fingerprint": "fp_06737a9306"
    }"#;

    const GOOGLE_OK: &str = r#"{
      "candidates": [{
        "content": {"parts": [{"text": "Thinking...", "thought": true}, {"text": "AI learns "}, {"text": "patterns."}], "role": "model"},
        "finishReason": "STOP",
        "avgLogprobs": -0.12
      }],
      "usageMetadata": {
        "promptTokenCount": 8, "candidatesTokenCount": 4, "thoughtsTokenCount": 3, "totalTokenCount": 15,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 8}]
      },
      "modelVersion": "gemini-1.5-flash-002",
      "responseId": "Il0taoSYJ5Cez7IPz9GxyA4"
    }"#;

    #[test]
    fn reads_anthropic() {
        let r = parse_chat(Provider::Anthropic, 200, ANTHROPIC_OK.as_bytes()).unwrap();
        assert_eq!(
            r,
            ChatResponse {
                id: "msg_01XFDUDYJgAACzvnptvVoYEL".into(),
                model: "claude-3-5-sonnet-20241022".into(),
                content: "Hi! My name is Claude. Bye.".into(),
                stop_reason: "end_turn".into(),
                usage: Usage {
                    input_tokens: 2110,
                    output_tokens: 503
                },
            }
        );
    }

    #[test]
    fn reads_openai() {
        let r = parse_chat(Provider::OpenAi, 200, OPENAI_OK.as_bytes()).unwrap();
        assert_eq!(r.id, "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT");
        assert_eq!(r.model, "gpt-4o-mini-2024-07-18");
        assert_eq!(r.content, "Hello! How can I assist you today?");
        assert_eq!(r.stop_reason, "stop");
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 19,
                output_tokens: 10
            }
        );
    }

    #[test]
    fn reads_google() {
        let r = parse_chat(Provider::Google, 200, GOOGLE_OK.as_bytes()).unwrap();
        assert_eq!(r.id, "Il0taoSYJ5Cez7IPz9GxyA4");
        assert_eq!(r.model, "gemini-1.5-flash-002");
        assert_eq!(r.content, "AI learns patterns.");
        assert_eq!(r.stop_reason, "STOP");
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 8,
                output_tokens: 7
            }
        );
    }

    #[test]
    fn google_blocked_prompt_is_an_empty_answer_with_the_block_reason() {
        let body = r#"{"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5}, "modelVersion": "gemini-1.5-flash"}"#;
        let r = parse_chat(Provider::Google, 200, body.as_bytes()).unwrap();
        assert_eq!(r.content, "");
        assert_eq!(r.stop_reason, "SAFETY");
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 5,
                output_tokens: 0
            }
        );
    }

    #[test]
    fn openai_refusal_is_the_content() {
        let body = r#"{"id":"c","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":null,"refusal":"I can't help with that."},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":6,"total_tokens":9}}"#;
        let r = parse_chat(Provider::OpenAi, 200, body.as_bytes()).unwrap();
        assert_eq!(r.content, "I can't help with that.");
    }

    #[test]
    fn malformed_success_bodies_say_what_is_wrong() {
        for (p, ok) in [
            (Provider::Anthropic, ANTHROPIC_OK),
            (Provider::OpenAi, OPENAI_OK),
            (Provider::Google, GOOGLE_OK),
        ] {
            let half = ok.get(..ok.len() / 2).unwrap();
            let f = parse_chat(p, 200, half.as_bytes()).unwrap_err();
            assert_eq!(f.diagnosis, Diagnosis::MalformedResponse);
            assert_eq!(f.status, Some(200));
            assert!(f.message.contains("cut off"), "{p}: {}", f.message);

            let f = parse_chat(p, 200, b"<html>hello</html>").unwrap_err();
            assert_eq!(f.diagnosis, Diagnosis::MalformedResponse);
            assert!(f.message.contains("not JSON"), "{p}: {}", f.message);

            let f = parse_chat(p, 200, b"{\"hello\": 1}").unwrap_err();
            assert_eq!(f.diagnosis, Diagnosis::MalformedResponse);
            assert!(f.message.contains("not a chat answer"), "{p}: {}", f.message);

            let f = parse_chat(p, 200, b"").unwrap_err();
            assert_eq!(f.diagnosis, Diagnosis::MalformedResponse);
        }
    }

    #[test]
    fn answers_without_usage_are_malformed() {
        let body = r#"{"id":"msg_1","type":"message","model":"m","content":[],"stop_reason":"end_turn"}"#;
        let f = parse_chat(Provider::Anthropic, 200, body.as_bytes()).unwrap_err();
        assert_eq!(f.diagnosis, Diagnosis::MalformedResponse);
        let body = r#"{"id":"c","model":"m","choices":[]}"#;
        assert!(parse_chat(Provider::OpenAi, 200, body.as_bytes()).is_err());
        let body = r#"{"candidates":[{"content":{"parts":[{"text":"x"}]},"finishReason":"STOP"}]}"#;
        assert!(parse_chat(Provider::Google, 200, body.as_bytes()).is_err());
    }

    #[test]
    fn error_statuses_go_to_diagnose() {
        let body = r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"},"request_id":"req_1"}"#;
        let f = parse_chat(Provider::Anthropic, 401, body.as_bytes()).unwrap_err();
        assert_eq!(f.diagnosis, Diagnosis::InvalidKey);
        assert_eq!(f.message, "invalid x-api-key");
    }

    #[test]
    fn an_error_envelope_with_status_200_is_read_as_the_error() {
        let body = r#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#;
        let f = parse_chat(Provider::Google, 200, body.as_bytes()).unwrap_err();
        assert_eq!(f.diagnosis, Diagnosis::ProviderUnavailable);
        assert_eq!(f.message, "The model is overloaded. Please try again later.");
    }
}
