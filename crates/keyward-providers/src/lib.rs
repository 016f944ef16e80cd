//! Everything keyward knows about Anthropic, OpenAI and Google that does not need a key: each
//! provider's wire format.
//!
//! Owns:
//! - keyward's own calls: building chat, probe and model-list calls ([`HttpCall`]: method,
//!   path, non-secret headers, body) and reading their answers ([`parse_chat`], streamed
//!   with [`StreamDecoder`], [`parse_model_page`]), rate-limit headers ([`rate_limits`]) and
//!   errors ([`diagnose`] → [`Diagnosis`], with advice where the provider's answer says what
//!   to do);
//! - what a worker may send and pass back: the exact allowlist of paths ([`path_allowed`]),
//!   where the key goes ([`key_placement`]), which request headers a call may carry
//!   ([`request_header_allowed`]) and which answer headers come back
//!   ([`answer_header_kept`]);
//! - the native pass-through ([`NativeApi`]): reading and rewriting the SDKs' request bodies
//!   ([`read_native_request`]: default output bound, stream usage options), their calls with
//!   the headers that travel on ([`native_call`]), their answers ([`parse_native`]) and
//!   streams ([`NativeStream`], which hides the usage chunk keyward asked for), where an SDK
//!   sends its key ([`sdk_key`]), and what keyward answers an SDK itself: its refusals in the
//!   provider's error envelope ([`native_refusal`]) and the model listing
//!   ([`native_model_list`]);
//! - the one server-sent-events splitter (WHATWG), with its size bound.
//!
//! Must never: see a key (no function here takes one, so none can leak one into a body, a path
//! or a message), do I/O, or panic on anything a provider or a client sends.
//!
//! This crate runs in the gateway; the worker takes its allowlists from here too. The worker
//! only adds the key header, checks the allowlists, sends the call to the provider's
//! configured base URL and relays the raw answer (status, headers, body chunks) back.
//!
//! One module per provider (`anthropic`, `openai`, `google`) holds that provider's wire
//! format, as an implementation of one trait; the public functions here reach it through one
//! dispatch point (`wire::wire`), so adding a provider touches its module, the [`NativeApi`]
//! it carries and that one `match`.

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
mod wire;

pub use anthropic::ANTHROPIC_VERSION;
pub use call::{
    answer_header_kept, build_chat, build_list_models, build_probe, key_placement, model_id_is_safe, path_allowed,
    request_header_allowed, request_id_header, ChatMessage, ChatRequest, ChatRole, HttpCall, HttpMethod, KeyPlacement,
    MODELS_PAGE_SIZE, PROBE_PROMPT,
};
pub use failure::{diagnose, Diagnosis, ProviderFailure, MAX_MESSAGE_CHARS};
pub use google::{google_action, GoogleActionError, GoogleVersion};
pub use limits::{rate_limits, rate_limits_note, Limit, RateLimits};
pub use models::{parse_model_page, ModelPage};
pub use native::{
    model_list_routes, native_call, native_model_list, native_refusal, native_routes, not_carried_message,
    parse_native, read_native_request, sdk_key, unknown_provider_message, NativeAnswer, NativeApi, NativeReply,
    NativeRequest, NativeRequestError, NativeStream, DEFAULT_MAX_OUTPUT,
};
pub use openai::is_usage_only_chunk as openai_is_usage_only_chunk;
pub use response::{parse_chat, ChatResponse, Usage};
pub use stream::{StreamDecoder, StreamEvent, StreamSummary, MAX_EVENT_BYTES};
