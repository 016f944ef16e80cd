//! Everything keyward knows about Anthropic, OpenAI and Google that does not need a key.
//!
//! Owns: building each provider's chat, probe and model-list calls ([`HttpCall`]: method, path,
//! non-secret headers, body), the exact allowlist of paths a worker may send
//! ([`path_allowed`]), where the key goes ([`key_placement`]), reading plain answers
//! ([`parse_chat`]), streamed answers ([`StreamDecoder`]), model listings
//! ([`parse_model_page`]), rate-limit headers ([`rate_limits`]) and errors ([`diagnose`] →
//! [`Diagnosis`], with advice where the provider's answer says what to do).
//!
//! Must never: see a key (no function here takes one, so none can leak one into a body, a path
//! or a message), do I/O, or panic on anything a provider sends.
//!
//! This crate runs in the gateway. The worker only adds the key header, checks
//! [`path_allowed`], sends the call to the provider's configured base URL and relays the raw
//! answer (status, headers, body chunks) back.
//!
//! One module per provider holds that provider's wire format; the public functions here
//! dispatch on [`Provider`](keyward_core::Provider).

mod anthropic;
mod call;
mod failure;
mod google;
mod limits;
mod models;
mod native;
mod openai;
mod response;
mod sse;
mod stream;

pub use call::{
    build_chat, build_list_models, build_probe, key_placement, model_id_is_safe, path_allowed, request_id_header,
    ChatMessage, ChatRequest, ChatRole, HttpCall, HttpMethod, KeyPlacement, ANTHROPIC_VERSION, MODELS_PAGE_SIZE,
    PROBE_PROMPT,
};
pub use failure::{diagnose, Diagnosis, ProviderFailure, MAX_MESSAGE_CHARS};
pub use limits::{rate_limits, rate_limits_note, Limit, RateLimits};
pub use models::{parse_model_page, ModelPage};
pub use native::{
    google_action, native_call, native_routes, parse_native, read_native_request, GoogleActionError, GoogleVersion,
    NativeAnswer, NativeApi, NativeRequest, NativeRequestError, DEFAULT_MAX_OUTPUT,
};
pub use response::{parse_chat, ChatResponse, Usage};
pub use stream::{openai_is_usage_only_chunk, StreamDecoder, StreamEvent, StreamSummary, MAX_EVENT_BYTES};
