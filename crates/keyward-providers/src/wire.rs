//! The one dispatch point from a [`Provider`] to its wire format.
//!
//! Each provider module (`anthropic`, `openai`, `google`) holds a unit struct implementing
//! [`ProviderWire`]: everything keyward knows about that provider's HTTP API. The crate's
//! public functions take a [`Provider`], call [`wire`] and then the trait, so no other
//! module matches on the provider. Adding a provider means a new module implementing the
//! trait, a [`Provider`] variant (keyward-core) and one arm in [`wire`], plus the
//! [`NativeApi`] variants its SDK may call (with their rows in `NativeApi`'s methods).
//!
//! Must never: hold state (the implementations are unit structs; every method is a pure
//! function of its arguments) or see a key.

use keyward_core::{ErrorCode, ModelEntry, Provider};
use serde_json::{Map, Value};

use crate::call::{ChatRequest, HttpCall, HttpMethod, KeyPlacement};
use crate::failure::ProviderFailure;
use crate::limits::RateLimits;
use crate::models::ModelPage;
use crate::native::{NativeAnswer, NativeApi, NativeFields, NativeRequest, NativeRequestError};
use crate::response::ChatResponse;
use crate::sse::SseEvent;
use crate::stream::{StreamEvent, StreamState};

/// One provider's wire format, without its key.
pub(crate) trait ProviderWire: Sync {
    // keyward's own calls: `ai/messages`, "Test key", `keyward catalogue check`.

    /// The call for one chat answer (plain or streamed, as `req.stream` says).
    fn chat_call(&self, req: &ChatRequest) -> HttpCall;

    /// The API [`chat_call`](Self::chat_call) speaks, whose answers and streams it reads.
    fn chat_api(&self) -> NativeApi;

    /// Reads a 2xx chat answer of [`chat_call`](Self::chat_call).
    fn parse_answer(&self, body: &[u8]) -> Result<ChatResponse, serde_json::Error>;

    /// One page of the model listing; `page_token` is already percent-encoded.
    fn list_models_call(&self, page_token: Option<&str>) -> HttpCall;

    /// Reads a 2xx page of the model listing.
    fn parse_model_page(&self, body: &[u8]) -> Result<ModelPage, serde_json::Error>;

    // What a worker may send, and what it passes back.

    /// Whether the worker may send this call (`query` without its `?`).
    fn path_allowed(&self, method: HttpMethod, path: &str, query: Option<&str>) -> bool;

    /// The header the key goes in.
    fn key_placement(&self) -> KeyPlacement;

    /// Request headers of this provider's own a call may carry, besides the common ones
    /// (names in lower case).
    fn own_request_headers(&self) -> &'static [&'static str];

    /// Whether an answer header of this provider's own (name in lower case) is passed back.
    fn keeps_own_answer_header(&self, name: &str) -> bool;

    /// The answer header carrying the provider's request id.
    fn request_id_header(&self) -> Option<&'static str>;

    // Failures and headroom.

    /// Reads the provider's error envelope; `None` when `body` is not one.
    fn read_error(&self, status: u16, body: &[u8]) -> Option<ProviderFailure>;

    /// The rate-limit headers of an answer (names in lower case); empty when there are none.
    fn rate_limits(&self, headers: &[(String, String)]) -> RateLimits;

    /// Why no headroom is shown, for a provider that never sends it.
    fn rate_limits_note(&self) -> Option<&'static str>;

    // Streams.

    /// Reads one event of a streamed answer of `api` (one of this provider's).
    fn on_event(&self, api: NativeApi, state: &mut StreamState, event: &SseEvent, out: &mut Vec<StreamEvent>);

    /// The end marker of a stream of `api`, as a failure names it when it never came.
    fn stream_end_marker(&self, api: NativeApi) -> &'static str;

    /// How to tell, from its data, the usage-only event keyward asks for on a client's
    /// behalf and hides from it ([`NativeRequest::hide_usage_chunk`]); `None` when keyward
    /// never asks for one.
    fn usage_only_event(&self) -> Option<fn(&str) -> bool>;

    // The native pass-through: the provider's own API, as its official SDK calls it.

    /// What the pass-through carries, in words, for refusals of anything else.
    fn native_routes(&self) -> &'static str;

    /// The header the SDK sends its API key in, as a person reads it in a message.
    fn sdk_key_header(&self) -> &'static str;

    /// The API versions whose `GET /{version}/models` the SDK may call (answered from the
    /// catalogue).
    fn model_list_versions(&self) -> &'static [&'static str] {
        &["v1"]
    }

    /// Reads (and where keyward must, rewrites) the body of a native request of `api`;
    /// `path` is the model and streaming where they travel in the path (Google).
    fn read_native(
        &self,
        api: NativeApi,
        body: &mut Map<String, Value>,
        path: Option<(&str, bool)>,
    ) -> Result<NativeFields, NativeRequestError>;

    /// The path and query a native request goes to.
    fn native_path(&self, req: &NativeRequest) -> String;

    /// The client's headers a native request carries on to the provider, with their
    /// defaults.
    fn native_headers(&self, client_header: &dyn Fn(&str) -> Option<String>) -> Vec<(String, String)>;

    /// Reads a plain native answer of `api`.
    fn parse_native(&self, api: NativeApi, status: u16, body: &[u8]) -> Result<NativeAnswer, ProviderFailure>;

    /// keyward's own refusal (`code`, answered with `status`) in the provider's error
    /// envelope, so the SDK raises its own exception.
    fn refusal_body(&self, code: ErrorCode, status: u16, message: &str) -> Value;

    /// The SDK's model listing, answered from the catalogue.
    fn model_list_body(&self, models: &[&ModelEntry]) -> Value;
}

/// The wire format of `provider`: the only `match` on [`Provider`] in this crate.
pub(crate) fn wire(provider: Provider) -> &'static dyn ProviderWire {
    match provider {
        Provider::Anthropic => &crate::anthropic::Anthropic,
        Provider::OpenAi => &crate::openai::OpenAi,
        Provider::Google => &crate::google::Google,
    }
}
