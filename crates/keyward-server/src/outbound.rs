//! What the gateway's own outbound HTTP (webhook delivery, single sign-on) shares: one way to
//! build a client and one way to read an operator's secret file.
//!
//! Must never: follow a redirect (an endpoint is exactly the configured URL), or read a
//! secret file that other users of the machine can read.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

/// A client with the webpki roots, TLS 1.2+, no redirects, and `timeout` for connecting and
/// for the whole exchange. The error is a sentence (it names no URL or secret).
pub fn http_client(timeout: Duration, user_agent: &'static str) -> Result<reqwest::Client, String> {
    let tls = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(tokio_rustls::rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    })
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout)
        .timeout(timeout)
        .user_agent(user_agent)
        .build()
        .map_err(|e| e.to_string())
}

/// The text of a secret file: a regular file with no group or other permission bits (checked
/// on the open file, so there is no window between the check and the read). The error is a
/// sentence that never holds the file's contents.
pub fn read_private_file(path: &Path) -> Result<Zeroizing<String>, String> {
    use std::io::Read as _;
    use std::os::unix::fs::MetadataExt as _;
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "mode {:o} lets other users read it: chmod 600",
            meta.mode() & 0o777
        ));
    }
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    Ok(text)
}
