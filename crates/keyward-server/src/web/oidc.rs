//! Single sign-on with OpenID Connect: the Authorization Code flow with PKCE (S256), state
//! and nonce, on the `openidconnect` crate (which checks the ID token's issuer, audience,
//! expiry, nonce and signature against the provider's JWKS).
//!
//! - [`Oidc::begin`] (`GET /login/oidc`): a fresh state, nonce and PKCE verifier, kept for
//!   the callback in a *pending-login* cookie, encrypted and authenticated (ChaCha20-Poly1305
//!   under a key derived from the client secret, which every node has), `HttpOnly`,
//!   `SameSite=Lax` (the provider's redirect back is a cross-site navigation), expiring after
//!   [`PENDING_TTL_MS`]; so any node finishes a login any node began. The callback clears it,
//!   the node remembers it as spent until it would expire, and the provider takes its code once.
//! - [`Oidc::finish`] (`GET /login/oidc/callback`): the cookie must open and be fresh, the
//!   returned state must equal its state, the code is exchanged with its PKCE verifier, and
//!   the ID token must verify with its nonce. A token signed with a key the cached JWKS does
//!   not hold makes one refetch of discovery and JWKS (at most one per
//!   [`REFETCH_EVERY`]), so a provider's key rotation is followed.
//! - Discovery and JWKS are cached for [`METADATA_TTL`].
//!
//! The client secret is read once from its file (mode 0600, refused otherwise) and kept as a
//! [`SecretString`]; it and the tokens are never logged or put in an error.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce as AeadNonce};
use keyward_core::UnixMillis;
use openidconnect::core::{CoreAuthenticationFlow, CoreClient};
use openidconnect::{
    AuthorizationCode, ClaimsVerificationError, ClientId, ClientSecret, CsrfToken, IssuerUrl, LogoutRequest, Nonce,
    PkceCodeChallenge, PkceCodeVerifier, PostLogoutRedirectUrl, ProviderMetadataWithLogout, RedirectUrl, Scope,
    SignatureVerificationError, TokenResponse as _,
};
use rand::RngCore as _;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::config::OidcConfig;

/// A pending login expires this long after `/login/oidc`.
pub const PENDING_TTL_MS: i64 = 10 * 60 * 1000;
/// Discovery and JWKS are fetched again after this long.
pub const METADATA_TTL: Duration = Duration::from_secs(60 * 60);
/// At most one forced refetch (an unknown signing key) per this long.
pub const REFETCH_EVERY: Duration = Duration::from_secs(10);
/// The path the provider sends the browser back to.
pub const CALLBACK_PATH: &str = "/login/oidc/callback";

const AAD: &[u8] = b"keyward-oidc-pending-v1";

/// Why single sign-on could not be set up (at start-up).
#[derive(Debug, thiserror::Error)]
pub enum OidcSetupError {
    #[error("KEYWARD_OIDC_CLIENT_SECRET_FILE {path}: {reason}")]
    Secret { path: String, reason: String },
    #[error("KEYWARD_OIDC_{var}: {reason}")]
    Invalid { var: &'static str, reason: String },
}

/// Why a sign-in failed: what the page says (no token or secret is ever in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No or an unreadable/expired pending-login cookie, or a state that does not match.
    State,
    /// The provider said no (`error=…` on the callback), or sent no code.
    Provider(String),
    /// The provider could not be reached, or its answer was not usable.
    Unavailable(String),
    /// The ID token failed a check (signature, issuer, audience, expiry, nonce).
    Token(String),
}

impl Failure {
    /// What the log says (short, no token).
    pub fn log_reason(&self) -> String {
        match self {
            Failure::State => "state missing, expired or not matching".into(),
            Failure::Provider(e) => format!("provider refused: {e}"),
            Failure::Unavailable(e) => format!("provider unavailable: {e}"),
            Failure::Token(e) => format!("ID token rejected: {e}"),
        }
    }
}

/// The person the provider vouched for, from a verified ID token.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The configured claim's value (`sub` by default).
    pub claim: String,
    pub email: Option<String>,
    pub email_verified: bool,
}

#[derive(Serialize, Deserialize)]
struct Pending {
    state: String,
    nonce: String,
    verifier: String,
    expires: i64,
}

struct Cached {
    metadata: ProviderMetadataWithLogout,
    fetched: Instant,
}

/// Single sign-on's configuration and caches, in the web state.
pub struct Oidc {
    issuer: IssuerUrl,
    client_id: ClientId,
    secret: SecretString,
    redirect: RedirectUrl,
    post_logout: PostLogoutRedirectUrl,
    pub user_claim: String,
    pub match_email: bool,
    pub jit: bool,
    /// What "Sign in with …" names: the issuer's host.
    pub label: String,
    http: reqwest::Client,
    cache: tokio::sync::Mutex<Option<Cached>>,
    last_forced: std::sync::Mutex<Option<Instant>>,
    /// The SHA-256 of each state this node finished, until its pending login would have
    /// expired: a second use of one pending login is refused here before the provider is
    /// asked (which refuses a spent code on any node anyway).
    spent: std::sync::Mutex<std::collections::HashMap<[u8; 32], i64>>,
    cookie_key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.issuer.as_str())
            .field("client_id", &self.client_id.as_str())
            .field("user_claim", &self.user_claim)
            .finish_non_exhaustive()
    }
}

fn read_secret(path: &Path) -> Result<SecretString, OidcSetupError> {
    let bad = |reason: String| OidcSetupError::Secret {
        path: path.display().to_string(),
        reason,
    };
    let text = crate::outbound::read_private_file(path).map_err(bad)?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(bad("empty".into()));
    }
    Ok(SecretString::from(secret.to_owned()))
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

impl Oidc {
    /// Single sign-on as configured; `None` while `KEYWARD_OIDC_ISSUER` is unset.
    pub fn from_config(config: &OidcConfig) -> Result<Option<Arc<Oidc>>, OidcSetupError> {
        let Some(issuer) = &config.issuer else {
            return Ok(None);
        };
        let invalid = |var, reason: String| OidcSetupError::Invalid { var, reason };
        let missing = |var| invalid(var, "single sign-on needs it".into());
        let client_id = config.client_id.clone().ok_or_else(|| missing("CLIENT_ID"))?;
        let secret_file = config
            .client_secret_file
            .as_deref()
            .ok_or_else(|| missing("CLIENT_SECRET_FILE"))?;
        let public = config.public_url.as_deref().ok_or_else(|| missing("PUBLIC_URL"))?;
        let secret = read_secret(secret_file)?;
        let issuer_url = IssuerUrl::new(issuer.clone()).map_err(|e| invalid("ISSUER", e.to_string()))?;
        let redirect =
            RedirectUrl::new(format!("{public}{CALLBACK_PATH}")).map_err(|e| invalid("PUBLIC_URL", e.to_string()))?;
        let post_logout = PostLogoutRedirectUrl::new(format!("{public}/login?signed_out=1"))
            .map_err(|e| invalid("PUBLIC_URL", e.to_string()))?;
        let label = issuer_url.url().host_str().unwrap_or("your provider").to_owned();
        let timeout = Duration::from_millis(u64::from(config.timeout_ms));
        // No redirects: the openidconnect crate's advice (no SSRF through a provider's 30x).
        let http = crate::outbound::http_client(timeout, concat!("keyward-oidc/", env!("CARGO_PKG_VERSION")))
            .map_err(|e| invalid("ISSUER", e))?;
        let mut cookie_key = Zeroizing::new([0u8; 32]);
        hkdf::Hkdf::<sha2::Sha256>::new(Some(b"keyward-oidc"), secret.expose_secret().as_bytes())
            .expand(AAD, cookie_key.as_mut())
            .map_err(|_| invalid("CLIENT_SECRET_FILE", "cannot derive a key".into()))?;
        Ok(Some(Arc::new(Oidc {
            issuer: issuer_url,
            client_id: ClientId::new(client_id),
            secret,
            redirect,
            post_logout,
            user_claim: config.user_claim.clone(),
            match_email: config.match_email,
            jit: config.jit,
            label,
            http,
            cache: tokio::sync::Mutex::new(None),
            last_forced: std::sync::Mutex::new(None),
            spent: std::sync::Mutex::new(std::collections::HashMap::new()),
            cookie_key,
        })))
    }

    /// The provider's discovery document and JWKS: cached, fetched when older than
    /// [`METADATA_TTL`], or (`force`) when a token names a key not in them, at most once per
    /// [`REFETCH_EVERY`].
    async fn metadata(&self, force: bool) -> Result<ProviderMetadataWithLogout, Failure> {
        let mut cache = self.cache.lock().await;
        let stale = match cache.as_ref() {
            None => true,
            Some(c) if c.fetched.elapsed() >= METADATA_TTL => true,
            Some(_) if force => {
                let mut last = self.last_forced.lock().unwrap_or_else(|p| p.into_inner());
                let due = last.is_none_or(|t| t.elapsed() >= REFETCH_EVERY);
                if due {
                    *last = Some(Instant::now());
                }
                due
            }
            Some(_) => false,
        };
        if stale {
            let metadata = ProviderMetadataWithLogout::discover_async(self.issuer.clone(), &self.http)
                .await
                .map_err(|e| Failure::Unavailable(format!("discovery: {}", error_chain(&e))))?;
            *cache = Some(Cached {
                metadata,
                fetched: Instant::now(),
            });
        }
        cache
            .as_ref()
            .map(|c| c.metadata.clone())
            .ok_or_else(|| Failure::Unavailable("no discovery document".into()))
    }

    fn client(
        &self,
        metadata: ProviderMetadataWithLogout,
    ) -> openidconnect::core::CoreClient<
        openidconnect::EndpointSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointMaybeSet,
        openidconnect::EndpointMaybeSet,
    > {
        CoreClient::from_provider_metadata(
            metadata,
            self.client_id.clone(),
            Some(ClientSecret::new(self.secret.expose_secret().to_owned())),
        )
        .set_redirect_uri(self.redirect.clone())
    }

    /// Starts a sign-in: the provider's authorization URL, and the pending-login cookie's value.
    pub async fn begin(&self, now: UnixMillis) -> Result<(String, String), Failure> {
        let client = self.client(self.metadata(false).await?);
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state, nonce) = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .add_scope(Scope::new("email".into()))
            .set_pkce_challenge(challenge)
            .url();
        let pending = Pending {
            state: state.secret().clone(),
            nonce: nonce.secret().clone(),
            verifier: verifier.secret().clone(),
            expires: now.0.saturating_add(PENDING_TTL_MS),
        };
        Ok((url.to_string(), self.seal(&pending)?))
    }

    fn seal(&self, pending: &Pending) -> Result<String, Failure> {
        let plain = Zeroizing::new(serde_json::to_vec(pending).map_err(|e| Failure::Unavailable(e.to_string()))?);
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aead = ChaCha20Poly1305::new(Key::from_slice(self.cookie_key.as_ref()));
        let sealed = aead
            .encrypt(AeadNonce::from_slice(&nonce), Payload { msg: &plain, aad: AAD })
            .map_err(|_| Failure::Unavailable("cannot seal the pending login".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(b64().encode(out))
    }

    fn open(&self, cookie: &str, now: UnixMillis) -> Option<Pending> {
        let raw = b64().decode(cookie).ok()?;
        if raw.len() < 12 + 16 {
            return None;
        }
        let (nonce, sealed) = raw.split_at(12);
        let aead = ChaCha20Poly1305::new(Key::from_slice(self.cookie_key.as_ref()));
        let plain = Zeroizing::new(
            aead.decrypt(AeadNonce::from_slice(nonce), Payload { msg: sealed, aad: AAD })
                .ok()?,
        );
        let pending: Pending = serde_json::from_slice(&plain).ok()?;
        (now.0 < pending.expires).then_some(pending)
    }

    /// Marks the pending login as used; false when it already was (on this node).
    fn spend(&self, pending: &Pending, now: UnixMillis) -> bool {
        use sha2::Digest as _;
        let key: [u8; 32] = sha2::Sha256::digest(pending.state.as_bytes()).into();
        let mut spent = self.spent.lock().unwrap_or_else(|p| p.into_inner());
        spent.retain(|_, expires| *expires > now.0);
        if spent.len() >= 100_000 {
            return false;
        }
        spent.insert(key, pending.expires).is_none()
    }

    /// Finishes a sign-in: checks the state against the pending login, exchanges the code,
    /// verifies the ID token (signature, issuer, audience, expiry, nonce).
    pub async fn finish(
        &self,
        cookie: Option<&str>,
        state: Option<&str>,
        code: Option<&str>,
        now: UnixMillis,
    ) -> Result<Identity, Failure> {
        let pending = cookie.and_then(|c| self.open(c, now)).ok_or(Failure::State)?;
        let state = state.ok_or(Failure::State)?;
        if !crate::web::csrf::token_matches(&pending.state, state) {
            return Err(Failure::State);
        }
        if !self.spend(&pending, now) {
            return Err(Failure::State);
        }
        let code = code.ok_or_else(|| Failure::Provider("no authorization code".into()))?;
        let client = self.client(self.metadata(false).await?);
        let response = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| Failure::Unavailable(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(pending.verifier.clone()))
            .request_async(&self.http)
            .await
            .map_err(|e| match e {
                // The provider refused the code (spent, expired, not for this verifier).
                openidconnect::RequestTokenError::ServerResponse(r) => Failure::Provider(r.error().to_string()),
                e => Failure::Unavailable(format!("token request: {}", token_error(&e))),
            })?;
        let id_token = response
            .id_token()
            .ok_or_else(|| Failure::Token("the provider sent no ID token".into()))?;
        let nonce = Nonce::new(pending.nonce.clone());
        let verified = match id_token.claims(&client.id_token_verifier(), &nonce) {
            Ok(c) => Ok(c.clone()),
            // A key we do not know: the provider may have rotated; refetch its JWKS once.
            Err(ClaimsVerificationError::SignatureVerification(SignatureVerificationError::NoMatchingKey)) => {
                let client = self.client(self.metadata(true).await?);
                let retried = id_token.claims(&client.id_token_verifier(), &nonce).cloned();
                retried
            }
            Err(e) => Err(e),
        };
        let claims = verified.map_err(|e| Failure::Token(e.to_string()))?;
        let claim = if self.user_claim == "sub" {
            Some(claims.subject().as_str().to_owned())
        } else {
            // The token verified: read the configured claim off its payload.
            raw_claim(&id_token.to_string(), &self.user_claim)
        };
        let claim = claim
            .filter(|c| !c.is_empty())
            .ok_or_else(|| Failure::Token(format!("the ID token has no {:?} claim", self.user_claim)))?;
        Ok(Identity {
            claim,
            email: claims.email().map(|e| e.as_str().to_owned()),
            email_verified: claims.email_verified() == Some(true),
        })
    }

    /// Where to send the browser after keyward's own sign-out: the provider's
    /// `end_session_endpoint` (RP-initiated logout, with `client_id` and
    /// `post_logout_redirect_uri`), when its discovery document has one.
    pub async fn logout_url(&self) -> Option<String> {
        let metadata = self.metadata(false).await.ok()?;
        let end = metadata.additional_metadata().end_session_endpoint.clone()?;
        Some(
            LogoutRequest::from(end)
                .set_client_id(self.client_id.clone())
                .set_post_logout_redirect_uri(self.post_logout.clone())
                .http_get_url()
                .to_string(),
        )
    }
}

/// A string (or number) claim from a JWS's payload (already verified by the caller).
fn raw_claim(jwt: &str, name: &str) -> Option<String> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = b64().decode(payload.trim_end_matches('=')).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match value.get(name)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A token-request error without the response body (which could carry a token).
fn token_error<RE: std::error::Error + 'static, T: openidconnect::ErrorResponse + 'static>(
    e: &openidconnect::RequestTokenError<RE, T>,
) -> String {
    match e {
        openidconnect::RequestTokenError::ServerResponse(r) => r.to_string(),
        openidconnect::RequestTokenError::Request(r) => error_chain(r),
        openidconnect::RequestTokenError::Parse(_, _) => "the provider's answer could not be read".into(),
        openidconnect::RequestTokenError::Other(o) => o.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn config(dir: &Path, mode: u32) -> OidcConfig {
        let file = dir.join("secret");
        std::fs::write(&file, "s3cret-value\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        OidcConfig {
            issuer: Some("http://127.0.0.1:9/".into()),
            client_id: Some("keyward".into()),
            client_secret_file: Some(file),
            public_url: Some("http://127.0.0.1:8080".into()),
            ..OidcConfig::default()
        }
    }

    #[test]
    fn the_secret_file_must_be_0600_and_is_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let err = Oidc::from_config(&config(dir.path(), 0o644)).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        let oidc = Oidc::from_config(&config(dir.path(), 0o600)).unwrap().unwrap();
        assert!(!format!("{oidc:?}").contains("s3cret"));
        assert!(Oidc::from_config(&OidcConfig::default()).unwrap().is_none());
    }

    #[test]
    fn a_pending_login_opens_only_untampered_and_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let oidc = Oidc::from_config(&config(dir.path(), 0o600)).unwrap().unwrap();
        let p = Pending {
            state: "st".into(),
            nonce: "n".into(),
            verifier: "v".into(),
            expires: 1_000,
        };
        let sealed = oidc.seal(&p).unwrap();
        assert_eq!(oidc.open(&sealed, UnixMillis(999)).unwrap().state, "st");
        assert!(oidc.open(&sealed, UnixMillis(1_000)).is_none(), "expired");
        let mut raw = b64().decode(&sealed).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert!(oidc.open(&b64().encode(raw), UnixMillis(0)).is_none(), "tampered");
        assert!(oidc.open("garbage", UnixMillis(0)).is_none());
        // Single use (on a node): the second spend of one pending login is refused.
        assert!(oidc.spend(&p, UnixMillis(0)));
        assert!(!oidc.spend(&p, UnixMillis(0)));
    }

    #[test]
    fn a_claim_is_read_off_the_payload() {
        let payload = b64().encode(br#"{"sub":"s","uid":"u-1","n":7}"#);
        let jwt = format!("h.{payload}.sig");
        assert_eq!(raw_claim(&jwt, "uid").as_deref(), Some("u-1"));
        assert_eq!(raw_claim(&jwt, "n").as_deref(), Some("7"));
        assert_eq!(raw_claim(&jwt, "none"), None);
    }
}
