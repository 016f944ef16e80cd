//! The model catalogue: which models each provider offers through keyward, where each is in
//! its provider's lifecycle, which one "Test key" probes with, and the shared-pool price of
//! each. Data, not code: the built-in table is `catalogue.toml`, and an operator may load
//! another (`KEYWARD_CATALOGUE`).
//!
//! Lifecycle: an `active` model is served; a `deprecated` one is served until its
//! `retires_on` date and shown with it; a `retired` one is refused with `model_retired`,
//! naming its `replaced_by`. keyward never substitutes one model for another silently.

use serde::{Deserialize, Serialize};

use crate::Provider;

/// What a model does: answer chats (every chat route and "Test key"), or turn text into
/// embeddings (the embeddings routes only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    #[default]
    Chat,
    Embedding,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Chat => "chat",
            ModelKind::Embedding => "embedding",
        }
    }

    fn is_chat(&self) -> bool {
        *self == ModelKind::Chat
    }
}

/// Where a model is in its provider's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelStatus {
    #[default]
    Active,
    Deprecated,
    Retired,
}

impl ModelStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelStatus::Active => "active",
            ModelStatus::Deprecated => "deprecated",
            ModelStatus::Retired => "retired",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The provider's API id, e.g. `gpt-6-luna`.
    pub id: String,
    /// The name a person reads, e.g. `GPT-6 Luna`.
    pub name: String,
    /// `chat` when omitted.
    #[serde(default, skip_serializing_if = "ModelKind::is_chat")]
    pub kind: ModelKind,
    /// `active` when omitted.
    #[serde(default)]
    pub status: ModelStatus,
    /// `YYYY-MM-DD`: when a deprecated model retires, or when a retired one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retires_on: Option<String>,
    /// The catalogued model to use instead (required for a retired model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
    /// Credits per million input tokens.
    pub input_per_mtok: u64,
    /// Credits per million output tokens.
    pub output_per_mtok: u64,
    #[serde(default)]
    pub probe: bool,
    /// The provider page this entry was checked against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl ModelEntry {
    /// Credits for a call, rounded up so the pool is never under-charged.
    pub fn credits_for(&self, input_tokens: u64, output_tokens: u64) -> u64 {
        let micro = u128::from(input_tokens) * u128::from(self.input_per_mtok)
            + u128::from(output_tokens) * u128::from(self.output_per_mtok);
        u64::try_from(micro.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }

    /// Whether calls may name it (active or deprecated).
    pub fn is_served(&self) -> bool {
        self.status != ModelStatus::Retired
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
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
    #[error("model catalogue, {provider}: {problem}")]
    Invalid { provider: Provider, problem: String },
}

/// Why a call cannot use the model it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRefusal<'a> {
    /// Not in the catalogue at all.
    Unknown,
    /// In the catalogue, retired by its provider.
    Retired(&'a ModelEntry),
}

/// `YYYY-MM-DD` with a month 01–12 and a day 01–31.
fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    match b {
        [y0, y1, y2, y3, b'-', m0, m1, b'-', d0, d1] => {
            [y0, y1, y2, y3, m0, m1, d0, d1].iter().all(|c| c.is_ascii_digit())
                && matches!((*m0, *m1), (b'0', b'1'..=b'9') | (b'1', b'0'..=b'2'))
                && matches!(
                    (*d0, *d1),
                    (b'0', b'1'..=b'9') | (b'1' | b'2', b'0'..=b'9') | (b'3', b'0' | b'1')
                )
        }
        _ => false,
    }
}

/// A model id keyward can put on a wire: 1–256 of `[A-Za-z0-9._-]`, no `..`.
fn id_is_safe(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && !id.contains("..")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
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

    /// Parses and checks a catalogue: unknown fields, duplicate or unsafe ids, a lifecycle
    /// entry without its date or replacement, a replacement that is not a served model of
    /// the same provider, and anything but exactly one active probe model per provider are
    /// refused, naming the provider and the model.
    pub fn from_toml(text: &str) -> Result<Catalogue, CatalogueError> {
        let cat: Catalogue = toml::from_str(text).map_err(|e| CatalogueError::Toml(e.to_string().trim().to_owned()))?;
        for p in Provider::ALL {
            cat.check(p)
                .map_err(|problem| CatalogueError::Invalid { provider: p, problem })?;
        }
        Ok(cat)
    }

    fn check(&self, p: Provider) -> Result<(), String> {
        let models = self.models(p);
        for (i, m) in models.iter().enumerate() {
            let id = &m.id;
            if !id_is_safe(id) {
                return Err(format!(
                    "model id {id:?} must be 1 to 256 of letters, digits, '.', '_' and '-'"
                ));
            }
            if models.iter().take(i).any(|o| &o.id == id) {
                return Err(format!("model \"{id}\" is listed twice"));
            }
            if let Some(d) = &m.retires_on {
                if !is_date(d) {
                    return Err(format!(
                        "model \"{id}\": retires_on {d:?} is not a date like 2027-01-31"
                    ));
                }
            }
            match m.status {
                ModelStatus::Deprecated if m.retires_on.is_none() => {
                    return Err(format!("model \"{id}\" is deprecated but has no retires_on date"))
                }
                ModelStatus::Retired if m.replaced_by.is_none() => {
                    return Err(format!("model \"{id}\" is retired but names no replaced_by model"))
                }
                _ => {}
            }
            if m.probe && m.kind != ModelKind::Chat {
                return Err(format!(
                    "the probe model \"{id}\" is an {} model: the probe must be a chat model",
                    m.kind.as_str()
                ));
            }
            if let Some(r) = &m.replaced_by {
                match models.iter().find(|o| &o.id == r) {
                    Some(o) if o.kind != m.kind => {
                        return Err(format!(
                            "model \"{id}\" is replaced_by \"{r}\", which is of another kind"
                        ))
                    }
                    Some(o) if o.is_served() => {}
                    Some(_) => {
                        return Err(format!(
                            "model \"{id}\" is replaced_by \"{r}\", which is retired itself"
                        ))
                    }
                    None => {
                        return Err(format!(
                            "model \"{id}\" is replaced_by \"{r}\", which this provider does not list"
                        ))
                    }
                }
            }
        }
        let probes: Vec<&ModelEntry> = models.iter().filter(|m| m.probe).collect();
        match probes.as_slice() {
            [one] if one.status == ModelStatus::Active => Ok(()),
            [one] => Err(format!(
                "the probe model \"{}\" is {}: the probe must be an active model",
                one.id,
                one.status.as_str()
            )),
            [] => {
                Err("no model has probe = true: mark exactly one active model (the cheapest) as the probe".to_owned())
            }
            many => Err(format!(
                "{} models have probe = true ({}): mark exactly one",
                many.len(),
                many.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(", ")
            )),
        }
    }

    /// Every entry of `provider`, retired ones included, in file order.
    pub fn models(&self, provider: Provider) -> &[ModelEntry] {
        match provider {
            Provider::Anthropic => &self.anthropic,
            Provider::OpenAi => &self.openai,
            Provider::Google => &self.google,
        }
    }

    /// The entry for `id`, whatever its status.
    pub fn model(&self, provider: Provider, id: &str) -> Option<&ModelEntry> {
        self.models(provider).iter().find(|m| m.id == id)
    }

    /// The entry a call naming `id` may use: served (active or deprecated), else why not.
    pub fn resolve(&self, provider: Provider, id: &str) -> Result<&ModelEntry, ModelRefusal<'_>> {
        match self.model(provider, id) {
            Some(m) if m.is_served() => Ok(m),
            Some(m) => Err(ModelRefusal::Retired(m)),
            None => Err(ModelRefusal::Unknown),
        }
    }

    /// The models calls may name (active and deprecated), in file order.
    pub fn served(&self, provider: Provider) -> impl Iterator<Item = &ModelEntry> {
        self.models(provider).iter().filter(|m| m.is_served())
    }

    /// The model a chat that names none uses: the provider's first active chat model.
    pub fn default_model(&self, provider: Provider) -> Option<&ModelEntry> {
        self.models(provider)
            .iter()
            .find(|m| m.status == ModelStatus::Active && m.kind == ModelKind::Chat)
    }

    /// The model "Test key" uses: the provider's cheapest active one.
    pub fn probe_model(&self, provider: Provider) -> Option<&ModelEntry> {
        self.models(provider).iter().find(|m| m.probe)
    }

    /// The chat models calls may name (active and deprecated), in file order.
    pub fn served_chat(&self, provider: Provider) -> impl Iterator<Item = &ModelEntry> {
        self.served(provider).filter(|m| m.kind == ModelKind::Chat)
    }

    /// The ids of the chat models calls may name (active and deprecated).
    pub fn model_ids(&self, provider: Provider) -> Vec<String> {
        self.served_chat(provider).map(|m| m.id.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_MODELS: [(Provider, &str); 8] = [
        (Provider::Anthropic, "claude-3-5-sonnet-20241022"),
        (Provider::Anthropic, "claude-3-haiku-20240307"),
        (Provider::Anthropic, "claude-3-opus-20240229"),
        (Provider::OpenAi, "gpt-4o"),
        (Provider::OpenAi, "gpt-4o-mini"),
        (Provider::OpenAi, "gpt-4-turbo"),
        (Provider::Google, "gemini-1.5-pro"),
        (Provider::Google, "gemini-1.5-flash"),
    ];

    #[test]
    fn builtin_catalogue_parses_and_keeps_every_seed_model() {
        let cat = Catalogue::from_toml(include_str!("../catalogue.toml")).unwrap();
        assert_eq!(cat, Catalogue::builtin());
        for (p, id) in SEED_MODELS {
            let m = cat.model(p, id).unwrap_or_else(|| panic!("{id} is gone"));
            assert_ne!(
                m.status,
                ModelStatus::Active,
                "{id} is no longer active at its provider"
            );
            assert!(m.source.is_some(), "{id} cites no page");
        }
        // What the providers retired is refused, naming a served replacement.
        for id in [
            "claude-3-5-sonnet-20241022",
            "claude-3-haiku-20240307",
            "claude-3-opus-20240229",
        ] {
            let Err(ModelRefusal::Retired(m)) = cat.resolve(Provider::Anthropic, id) else {
                panic!("{id} must be retired")
            };
            let r = m.replaced_by.as_deref().unwrap();
            assert!(cat.resolve(Provider::Anthropic, r).is_ok(), "{id} -> {r}");
        }
        for p in Provider::ALL {
            assert!(cat.probe_model(p).is_some_and(|m| m.status == ModelStatus::Active));
            assert!(cat.served(p).all(|m| m.source.is_some()));
        }
    }

    #[test]
    fn probe_is_the_cheapest_served_model() {
        let cat = Catalogue::builtin();
        for p in Provider::ALL {
            let probe = cat.probe_model(p).unwrap();
            for m in cat.served_chat(p) {
                assert!(
                    probe.output_per_mtok <= m.output_per_mtok && probe.input_per_mtok <= m.input_per_mtok,
                    "{p}: {} cheaper than probe",
                    m.id
                );
            }
        }
    }

    #[test]
    fn credits_round_up() {
        let m = ModelEntry {
            id: "m".into(),
            name: "M".into(),
            kind: ModelKind::Chat,
            status: ModelStatus::Active,
            retires_on: None,
            replaced_by: None,
            input_per_mtok: 150,
            output_per_mtok: 600,
            probe: false,
            source: None,
        };
        assert_eq!(m.credits_for(0, 0), 0);
        assert_eq!(m.credits_for(1, 0), 1);
        assert_eq!(m.credits_for(1_000_000, 1_000_000), 750);
        // No overflow for absurd token counts: the u128 sum cannot wrap.
        assert_eq!(
            m.credits_for(u64::MAX, 0),
            (u128::from(u64::MAX) * 150).div_ceil(1_000_000) as u64
        );
    }

    fn one_provider(entries: &str) -> String {
        let ok = "[[openai]]\nid = \"o\"\nname = \"O\"\ninput_per_mtok = 1\noutput_per_mtok = 1\nprobe = true\n\
                  [[google]]\nid = \"g\"\nname = \"G\"\ninput_per_mtok = 1\noutput_per_mtok = 1\nprobe = true\n";
        format!("{entries}\n{ok}")
    }

    fn problem(text: &str) -> String {
        Catalogue::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn bad_catalogues_are_refused_naming_the_problem() {
        assert!(problem("anthropic = []\nopenai = []\ngoogle = []\n").contains("anthropic: no model has probe = true"));
        let m = |extra: &str| {
            format!("[[anthropic]]\nid = \"a\"\nname = \"A\"\ninput_per_mtok = 1\noutput_per_mtok = 1\nprobe = true\n{extra}")
        };
        let text = one_provider(&m("colour = \"red\""));
        let p = problem(&text);
        assert!(p.contains("colour") && p.contains("line"), "{p}");
        assert!(problem(&one_provider(&m(
            "status = \"deprecated\"\nretires_on = \"2027-01-01\""
        )))
        .contains("the probe model \"a\" is deprecated"));
        assert!(problem(&one_provider(&m("status = \"sunset\""))).contains("sunset"));
        let second = "[[anthropic]]\nid = \"b\"\nname = \"B\"\ninput_per_mtok = 1\noutput_per_mtok = 1\n";
        assert!(
            problem(&one_provider(&format!("{}\n{second}status = \"deprecated\"", m("")))).contains("no retires_on")
        );
        assert!(problem(&one_provider(&format!(
            "{}\n{second}status = \"deprecated\"\nretires_on = \"2027-13-01\"",
            m("")
        )))
        .contains("not a date"));
        assert!(problem(&one_provider(&format!("{}\n{second}status = \"retired\"", m("")))).contains("no replaced_by"));
        assert!(problem(&one_provider(&format!(
            "{}\n{second}status = \"retired\"\nreplaced_by = \"zzz\"",
            m("")
        )))
        .contains("does not list"));
        assert!(problem(&one_provider(&format!("{}\n{second}probe = true", m("")))).contains("2 models have probe"));
        assert!(problem(&one_provider(&m("kind = \"embedding\""))).contains("must be a chat model"));
        assert!(problem(&one_provider(&format!(
            "{}\n{second}kind = \"embedding\"\nstatus = \"retired\"\nreplaced_by = \"a\"",
            m("")
        )))
        .contains("of another kind"));
        assert!(problem(&one_provider(&format!(
            "{}\n{}",
            m(""),
            second.replace("\"b\"", "\"a\"")
        )))
        .contains("listed twice"));
        assert!(problem(&one_provider(&m("").replace("id = \"a\"", "id = \"../x\""))).contains("must be 1 to 256"));
        // A retired model replaced by another retired one.
        let chain = format!(
            "{}\n{second}status = \"retired\"\nreplaced_by = \"a\"\n[[anthropic]]\nid = \"c\"\nname = \"C\"\ninput_per_mtok = 1\noutput_per_mtok = 1\nstatus = \"retired\"\nreplaced_by = \"b\"",
            m("")
        );
        assert!(problem(&one_provider(&chain)).contains("retired itself"));
        // And the good shape parses, served models in order, the default the first active.
        let good = one_provider(&format!(
            "{}\n{second}status = \"retired\"\nretires_on = \"2026-04-20\"\nreplaced_by = \"a\"",
            m("")
        ));
        let cat = Catalogue::from_toml(&good).unwrap();
        assert_eq!(cat.model_ids(Provider::Anthropic), ["a"]);
        assert_eq!(cat.default_model(Provider::Anthropic).unwrap().id, "a");
        assert!(matches!(
            cat.resolve(Provider::Anthropic, "b"),
            Err(ModelRefusal::Retired(_))
        ));
        assert_eq!(cat.resolve(Provider::Anthropic, "x"), Err(ModelRefusal::Unknown));
    }

    #[test]
    fn dates_are_checked() {
        for ok in ["2026-04-20", "2027-01-31", "2026-12-01"] {
            assert!(is_date(ok), "{ok}");
        }
        for bad in [
            "2026-4-20",
            "2026-00-10",
            "2026-01-32",
            "20260420",
            "2026-01-00",
            "2026-01-01T00",
        ] {
            assert!(!is_date(bad), "{bad}");
        }
    }
}
