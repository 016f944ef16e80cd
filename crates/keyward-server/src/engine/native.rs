//! A native pass-through call: the provider's own request, as its SDK sent it, with the
//! account's real key put in place of the keyward token by a worker. Metered, capped and
//! audited like every call ([`super::calls`]); the provider's answer goes back as it came,
//! whole or streamed as it arrives.

use keyward_core::{Outcome, Provider};
use keyward_providers::{
    native_call, parse_native, read_native_request, NativeApi, NativeRequestError, NativeStream, Usage,
};
use keyward_store::CallKey;
use tokio::sync::mpsc;

use super::calls::{CallContext, CallFailure, CallSpec, Upstream, MAX_ANSWER};
use super::{Actor, Engine};
use crate::error::{ApiError, ApiResult};
use keyward_core::ErrorCode;

/// The provider's answer to a native call.
#[derive(Debug)]
pub struct NativeAnswer {
    pub status: u16,
    /// The provider's response headers, as the worker kept them.
    pub headers: Vec<(String, String)>,
    pub body: NativeBody,
}

#[derive(Debug)]
pub enum NativeBody {
    /// A plain answer (or a provider's error), read whole: the call is on record already.
    Whole(Vec<u8>),
    /// A stream, chunk by chunk as the provider sends it; the chunk with the provider's end
    /// marker comes only once the call is on record. An `Err` ends it without that marker.
    Stream(mpsc::Receiver<Result<Vec<u8>, StreamBroken>>),
}

/// A native stream that ended without the provider's end marker (the provider or worker
/// went away mid-answer, or the call could not be put on record). The HTTP body is then
/// aborted rather than ended: a clean end would look to an SDK like a complete, shorter
/// answer, while an aborted one is an error it reports ("incomplete chunked read").
#[derive(Debug, thiserror::Error)]
#[error("the answer broke off before its end ({0})")]
pub struct StreamBroken(pub &'static str);

/// Which native call: the carried API, Google's model and whether to stream (from its
/// path), and the product feature the call names (checked by the caller).
#[derive(Debug, Clone)]
pub struct NativeRoute<'a> {
    pub api: NativeApi,
    pub google: Option<(&'a str, bool)>,
    pub feature: Option<String>,
}

impl Engine {
    /// Runs `route` (the carried API, Google's model and stream flag, the feature) for the
    /// actor with `raw`, the SDK's request body. `header` reads the SDK's request headers
    /// (the provider-specific ones that are passed on). `key`: the account's key for the
    /// provider, read with the actor (a member's membership, or a service's account).
    pub async fn native(
        &self,
        actor: &Actor,
        key: CallKey,
        route: NativeRoute<'_>,
        raw: &[u8],
        header: impl Fn(&str) -> Option<String>,
    ) -> ApiResult<NativeAnswer> {
        let NativeRoute { api, google, feature } = route;
        let provider: Provider = api.provider();
        let req = read_native_request(api, raw, google).map_err(|e| match e {
            NativeRequestError::NotJson => ApiError::new(ErrorCode::InvalidJson, e.to_string()),
            NativeRequestError::Invalid(m) => ApiError::validation(m),
        })?;
        let spec = CallSpec {
            provider,
            model: Some(&req.model),
            input_bytes: raw.len(),
            max_tokens: req.max_output,
            kind: api.model_kind(),
            billed: api.costs_money(),
            feature,
            prefetched_key: Some(key),
        };
        let ctx = self.prepare(actor, spec).await?;
        let call = native_call(&req, header);
        let mut upstream = match self.open_and_call(provider, &ctx.choice, call).await {
            Ok(u) => u,
            Err(f) => return Err(self.fail_call(&ctx, f, None).await),
        };
        let req_id = upstream.request_id();
        let (status, headers) = (upstream.status, upstream.headers.clone());

        if !req.stream || !(200..300).contains(&status) {
            // Plain answers (and provider errors) are read whole: the usage is in the body,
            // and the audit event must be durable before the answer is released.
            let body = match upstream.collect(MAX_ANSWER).await {
                Ok(b) => b,
                Err(f) => return Err(self.fail_call(&ctx, f, req_id).await),
            };
            let (outcome, usage, detail, answer_id) = match parse_native(api, status, &body) {
                Ok(answer) => (
                    Outcome::Ok,
                    answer.usage,
                    None,
                    Some(answer.id).filter(|id| !id.is_empty()),
                ),
                Err(f) => {
                    ctx.learn_from(self, &f).await;
                    (
                        Outcome::Error(f.diagnosis.as_str()),
                        Usage::default(),
                        Some(f.message),
                        None,
                    )
                }
            };
            ctx.settle(self, outcome, usage, req_id.or(answer_id), detail).await?;
            return Ok(NativeAnswer {
                status,
                headers,
                body: NativeBody::Whole(body),
            });
        }

        let (tx, rx) = mpsc::channel::<Result<Vec<u8>, StreamBroken>>(64);
        tokio::spawn(relay_stream(
            self.clone(),
            ctx,
            upstream,
            tx,
            req_id,
            NativeStream::new(&req),
        ));
        Ok(NativeAnswer {
            status,
            headers,
            body: NativeBody::Stream(rx),
        })
    }
}

/// Relays a provider's event stream chunk by chunk as it arrives, reading the usage on
/// the way. The chunk holding the provider's end marker is held back until the call is
/// settled and audited, so a client never sees the end of a call that is not on record.
async fn relay_stream(
    engine: Engine,
    ctx: CallContext,
    mut upstream: Upstream,
    tx: mpsc::Sender<Result<Vec<u8>, StreamBroken>>,
    req_id: Option<String>,
    mut relay: NativeStream,
) {
    let mut held: Vec<u8> = Vec::new();
    let failure = loop {
        match upstream.next_chunk().await {
            Ok(Some(chunk)) => {
                let visible = relay.feed(&chunk).unwrap_or(chunk);
                if relay.is_complete() {
                    held.extend_from_slice(&visible);
                } else if !visible.is_empty() {
                    let _ = tx.send(Ok(visible)).await;
                }
            }
            Ok(None) => break None,
            Err(f) => break Some(f),
        }
    };
    held.extend(relay.rest());
    let result = match failure {
        Some(f) => Err(f),
        None => relay.finish().map_err(CallFailure::Provider),
    };
    match result {
        Ok(summary) => {
            let req_id = req_id.or_else(|| Some(summary.id.clone()));
            if ctx
                .settle(&engine, Outcome::Ok, summary.usage, req_id, None)
                .await
                .is_ok()
            {
                if !held.is_empty() {
                    let _ = tx.send(Ok(held)).await;
                }
            } else {
                let _ = tx.send(Err(StreamBroken("the call could not be put on record"))).await;
            }
        }
        Err(f) => {
            // The provider's own bytes (including its error event) went through as they
            // came; what is left is the record, and telling the client the answer is cut.
            let _ = engine.fail_call(&ctx, f, req_id).await;
            if !held.is_empty() {
                let _ = tx.send(Ok(held)).await;
            }
            let _ = tx
                .send(Err(StreamBroken("the provider's stream did not reach its end")))
                .await;
        }
    }
}
