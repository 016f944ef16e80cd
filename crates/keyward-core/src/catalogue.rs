//! The model catalogue: which models each provider offers through keyward, which one
//! "Test key" probes with, and the shared-pool price of each. Data, not code: the
//! built-in table is `catalogue.toml`, and an operator may load another.

use serde::Deserialize;

use crate::Provider;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The provider's API id, e.g. `gpt-4o-mini`.
    pub id: String,
    /// The name a person reads, e.g. `GPT-4o mini`.
    pub name: String,
    /// Credits per million input tokens.
    pub input_per_mtok: u64,
    /// Credits per million output tokens.
    pub output_per_mtok: u64,
    #[serde(default)]
    pub probe: bool,
}

impl ModelEntry {
    /// Credits for a call, rounded up so the pool is never under-charged.
    pub fn credits_for(&self, input_tokens: u64, output_tokens: u64) -> u64 {
        let micro = u128::from(input_tokens) * u128::from(self.input_per_mtok)
            + u128::from(output_tokens) * u128::from(self.output_per_mtok);
        u64::try_from(micro.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    anthropic: Vec<ModelEntry>,
    openai: Vec<ModelEntry>,
    google: Vec<ModelEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogueError {
    #[error("model catalogue is not valid TOML: {0}")]
    Toml(String),
    #[error("model catalogue: provider {0} must list at least one model and exactly one with probe = true")]
    Probe(Provider),
}

impl Catalogue {
    /// The catalogue compiled into the binary.
    pub fn builtin() -> Catalogue {
        // The built-in file is checked by a test; fall back to an empty catalogue only
        // so that this function cannot panic.
        Catalogue::from_toml(include_str!("../catalogue.toml")).unwrap_or(Catalogue {
            anthropic: Vec::new(),
            openai: Vec::new(),
            google: Vec::new(),
        })
    }

    pub fn from_toml(text: &str) -> Result<Catalogue, CatalogueError> {
        let cat: Catalogue = toml::from_str(text).map_err(|e| CatalogueError::Toml(e.message().to_owned()))?;
        for p in Provider::ALL {
            if cat.models(p).iter().filter(|m| m.probe).count() != 1 {
                return Err(CatalogueError::Probe(p));
            }
        }
        Ok(cat)
    }

    pub fn models(&self, provider: Provider) -> &[ModelEntry] {
        match provider {
            Provider::Anthropic => &self.anthropic,
            Provider::OpenAi => &self.openai,
            Provider::Google => &self.google,
        }
    }

    pub fn model(&self, provider: Provider, id: &str) -> Option<&ModelEntry> {
        self.models(provider).iter().find(|m| m.id == id)
    }

    /// The model "Test key" uses: the provider's cheapest.
    pub fn probe_model(&self, provider: Provider) -> Option<&ModelEntry> {
        self.models(provider).iter().find(|m| m.probe)
    }

    pub fn model_ids(&self, provider: Provider) -> Vec<String> {
        self.models(provider).iter().map(|m| m.id.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalogue_lists_the_seed_models() {
        let cat = Catalogue::from_toml(include_str!("../catalogue.toml")).unwrap();
        assert_eq!(cat.model_ids(Provider::Anthropic).len(), 3);
        assert_eq!(
            cat.model_ids(Provider::OpenAi),
            ["gpt-4o", "gpt-4o-mini", "gpt-4-turbo"]
        );
        assert_eq!(cat.model_ids(Provider::Google), ["gemini-1.5-pro", "gemini-1.5-flash"]);
        assert_eq!(cat.probe_model(Provider::OpenAi).unwrap().id, "gpt-4o-mini");
        assert_eq!(cat, Catalogue::builtin());
    }

    #[test]
    fn probe_is_the_cheapest_model() {
        let cat = Catalogue::builtin();
        for p in Provider::ALL {
            let probe = cat.probe_model(p).unwrap();
            for m in cat.models(p) {
                assert!(
                    probe.output_per_mtok <= m.output_per_mtok,
                    "{p}: {} cheaper than probe",
                    m.id
                );
            }
        }
    }

    #[test]
    fn credits_round_up() {
        let cat = Catalogue::builtin();
        let mini = cat.model(Provider::OpenAi, "gpt-4o-mini").unwrap();
        assert_eq!(mini.credits_for(0, 0), 0);
        assert_eq!(mini.credits_for(1, 0), 1);
        assert_eq!(mini.credits_for(1_000_000, 1_000_000), 750);
        // No overflow for absurd token counts: the u128 sum cannot wrap.
        assert_eq!(
            mini.credits_for(u64::MAX, 0),
            (u128::from(u64::MAX) * 150).div_ceil(1_000_000) as u64
        );
    }

    #[test]
    fn a_catalogue_without_one_probe_is_refused() {
        let text = "anthropic = []\nopenai = []\ngoogle = []\n";
        assert_eq!(
            Catalogue::from_toml(text),
            Err(CatalogueError::Probe(Provider::Anthropic))
        );
    }
}
