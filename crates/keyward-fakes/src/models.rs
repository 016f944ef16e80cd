//! The models each fake provider serves: what the real providers list today (December
//! 2026), independent of keyward's catalogue, so a test can tell keyward's view of a model
//! from the provider's. A test may take a model away (or add one) to play a retirement.
//!
//! Sources: Anthropic <https://platform.claude.com/docs/en/about-claude/models/overview>,
//! OpenAI <https://developers.openai.com/api/docs/models>, Google
//! <https://ai.google.dev/gemini-api/docs/models>. Retired models (Claude 3.x, GPT-4 Turbo,
//! Gemini 1.5 and 2.0) are absent: the fakes answer them with each provider's not-found error.

use keyward_core::Provider;

/// One served model: its API id and the name the listing shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedModel {
    pub id: String,
    pub name: String,
}

/// (provider, id, display name) as the providers list them today.
const SERVED: &[(Provider, &str, &str)] = &[
    (Provider::Anthropic, "claude-fable-5-1", "Claude Fable 5.1"),
    (Provider::Anthropic, "claude-opus-5-5", "Claude Opus 5.5"),
    (Provider::Anthropic, "claude-sonnet-5-5", "Claude Sonnet 5.5"),
    (Provider::Anthropic, "claude-haiku-5-5", "Claude Haiku 5.5"),
    (Provider::Anthropic, "claude-opus-5", "Claude Opus 5"),
    (Provider::Anthropic, "claude-sonnet-5", "Claude Sonnet 5"),
    (Provider::Anthropic, "claude-opus-4-8", "Claude Opus 4.8"),
    (Provider::Anthropic, "claude-sonnet-4-6", "Claude Sonnet 4.6"),
    (Provider::Anthropic, "claude-opus-4-5-20251101", "Claude Opus 4.5"),
    (Provider::Anthropic, "claude-haiku-4-5-20251001", "Claude Haiku 4.5"),
    (Provider::OpenAi, "gpt-6.2-astra", "GPT-6.2 Astra"),
    (Provider::OpenAi, "gpt-6.2-sol", "GPT-6.2 Sol"),
    (Provider::OpenAi, "gpt-6.1-terra", "GPT-6.1 Terra"),
    (Provider::OpenAi, "gpt-6.1-sol", "GPT-6.1 Sol"),
    (Provider::OpenAi, "gpt-6-sol", "GPT-6 Sol"),
    (Provider::OpenAi, "gpt-6-luna", "GPT-6 Luna"),
    (Provider::OpenAi, "gpt-5.6-luna", "GPT-5.6 Luna"),
    (Provider::OpenAi, "gpt-5", "GPT-5"),
    (Provider::OpenAi, "gpt-4.1", "GPT-4.1"),
    (Provider::OpenAi, "gpt-4o", "GPT-4o"),
    (Provider::OpenAi, "gpt-4o-mini", "GPT-4o mini"),
    (Provider::OpenAi, "text-embedding-3-small", "text-embedding-3-small"),
    (Provider::OpenAi, "text-embedding-3-large", "text-embedding-3-large"),
    (Provider::Google, "gemini-3.8-flash", "Gemini 3.8 Flash"),
    (Provider::Google, "gemini-3.7-flash", "Gemini 3.7 Flash"),
    (Provider::Google, "gemini-3.6-flash", "Gemini 3.6 Flash"),
    (Provider::Google, "gemini-3.5-flash", "Gemini 3.5 Flash"),
    (Provider::Google, "gemini-3.5-flash-lite", "Gemini 3.5 Flash-Lite"),
    (Provider::Google, "gemini-3.1-flash-lite", "Gemini 3.1 Flash-Lite"),
    (Provider::Google, "gemini-3.1-pro-preview", "Gemini 3.1 Pro Preview"),
    (Provider::Google, "gemini-embedding-2", "Gemini Embedding 2"),
];

/// The models `provider` serves when a fake starts (before any test takes one away).
pub fn served(provider: Provider) -> Vec<ServedModel> {
    Served::default().list(provider)
}

/// Anthropic also answers these aliases of dated models.
const ANTHROPIC_ALIASES: &[(&str, &str)] = &[
    ("claude-haiku-4-5", "claude-haiku-4-5-20251001"),
    ("claude-opus-4-5", "claude-opus-4-5-20251101"),
];

/// The served models of every provider, in listing order.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    models: Vec<(Provider, ServedModel)>,
}

impl Default for Served {
    fn default() -> Self {
        Served {
            models: SERVED
                .iter()
                .map(|(p, id, name)| {
                    (
                        *p,
                        ServedModel {
                            id: (*id).to_owned(),
                            name: (*name).to_owned(),
                        },
                    )
                })
                .collect(),
        }
    }
}

impl Served {
    pub(crate) fn list(&self, provider: Provider) -> Vec<ServedModel> {
        self.models
            .iter()
            .filter(|(p, _)| *p == provider)
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// Whether `id` (or, for Anthropic, an alias of a served model) is served.
    pub(crate) fn serves(&self, provider: Provider, id: &str) -> bool {
        let id = match provider {
            Provider::Anthropic => ANTHROPIC_ALIASES
                .iter()
                .find(|(alias, _)| *alias == id)
                .map_or(id, |(_, dated)| *dated),
            _ => id,
        };
        self.models.iter().any(|(p, m)| *p == provider && m.id == id)
    }

    /// Takes a model away (a retirement) or serves it (again, or for the first time).
    pub(crate) fn set(&mut self, provider: Provider, id: &str, available: bool) {
        self.models.retain(|(p, m)| !(*p == provider && m.id == id));
        if available {
            let name = SERVED
                .iter()
                .find(|(p, served, _)| *p == provider && *served == id)
                .map_or(id, |(_, _, name)| *name);
            self.models.push((
                provider,
                ServedModel {
                    id: id.to_owned(),
                    name: name.to_owned(),
                },
            ));
        }
    }
}
