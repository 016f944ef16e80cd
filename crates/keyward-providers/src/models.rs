//! The providers' free model listings: which models a key can use, and which ones a
//! provider still serves (`keyward catalogue check`, "Test key").

use keyward_core::Provider;
use serde::Deserialize;

use crate::failure::{diagnose, ProviderFailure};
use crate::response::json_problem;
use crate::wire::wire;

/// One page of a model listing: the model ids (Google's `models/` prefix removed) and the
/// token of the next page, if the provider says there is one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelPage {
    pub ids: Vec<String>,
    pub next: Option<String>,
}

#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

/// Anthropic `{"data": [{"id"}], "has_more", "last_id"}`; OpenAI `{"data": [{"id"}]}`.
#[derive(Deserialize)]
struct DataList {
    data: Vec<IdOnly>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

/// Reads one page of a listing. A status outside 2xx goes to [`diagnose`] (the key's
/// own failure, as for any call); a 2xx that is not a listing is `malformed_response`.
pub fn parse_model_page(provider: Provider, status: u16, body: &[u8]) -> Result<ModelPage, ProviderFailure> {
    if !(200..300).contains(&status) {
        return Err(diagnose(provider, status, body));
    }
    wire(provider)
        .parse_model_page(body)
        .map_err(|e| ProviderFailure::malformed(provider, Some(status), json_problem(&e)))
}

/// Reads the `{"data": [{"id"}], "has_more", "last_id"}` listing Anthropic and OpenAI share
/// (OpenAI's has one page: no `has_more`).
pub(crate) fn parse_data_list(body: &[u8]) -> Result<ModelPage, serde_json::Error> {
    let list: DataList = serde_json::from_slice(body)?;
    let next = if list.has_more {
        list.last_id.filter(|s| !s.is_empty())
    } else {
        None
    };
    Ok(ModelPage {
        ids: list.data.into_iter().map(|m| m.id).collect(),
        next,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Diagnosis;

    #[test]
    fn each_listing_is_read() {
        let a = br#"{"data":[{"type":"model","id":"claude-haiku-5-5","display_name":"Claude Haiku 5.5","created_at":"2026-10-07T00:00:00Z"}],"has_more":true,"first_id":"claude-haiku-5-5","last_id":"claude-haiku-5-5"}"#;
        assert_eq!(
            parse_model_page(Provider::Anthropic, 200, a).unwrap(),
            ModelPage {
                ids: vec!["claude-haiku-5-5".into()],
                next: Some("claude-haiku-5-5".into())
            }
        );
        let o = br#"{"object":"list","data":[{"id":"gpt-6-luna","object":"model","created":1,"owned_by":"openai","shutdown_date":null}]}"#;
        assert_eq!(parse_model_page(Provider::OpenAi, 200, o).unwrap().ids, ["gpt-6-luna"]);
        let g = br#"{"models":[{"name":"models/gemini-3.8-flash","displayName":"Gemini 3.8 Flash"}],"nextPageToken":"Cg5nZW1"}"#;
        let page = parse_model_page(Provider::Google, 200, g).unwrap();
        assert_eq!(
            (page.ids, page.next.as_deref()),
            (vec!["gemini-3.8-flash".to_owned()], Some("Cg5nZW1"))
        );
        assert_eq!(
            parse_model_page(Provider::Google, 200, b"{}").unwrap(),
            ModelPage::default()
        );
    }

    #[test]
    fn failures_are_diagnosed() {
        let f = parse_model_page(
            Provider::Anthropic,
            401,
            br#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#,
        )
        .unwrap_err();
        assert_eq!(f.diagnosis, Diagnosis::InvalidKey);
        let f = parse_model_page(Provider::OpenAi, 200, b"<html>").unwrap_err();
        assert_eq!(f.diagnosis, Diagnosis::MalformedResponse);
    }
}
