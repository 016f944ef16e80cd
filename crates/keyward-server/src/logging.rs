//! Logging through `tracing`, with a last-line scrubber.
//!
//! Secrets are typed so they cannot be formatted (`ApiKey`, `SecretBytes` redact
//! themselves) and nothing logs bodies or headers. The scrubber is the second line: every
//! formatted log line passes through [`scrub`], which masks anything shaped like a
//! provider key or a keyward token before it reaches the output.

use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber: `filter` in `EnvFilter` syntax, text or JSON, to stderr.
pub fn init(filter: &str, format: LogFormat) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("KEYWARD_LOG: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(ScrubbingStderr)
        .with_target(false);
    let result = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
    result.map_err(|e| e.to_string())
}

/// A stderr writer that scrubs each buffer it is given (one formatted event).
#[derive(Debug, Clone, Copy)]
pub struct ScrubbingStderr;

impl<'a> MakeWriter<'a> for ScrubbingStderr {
    type Writer = ScrubWriter;
    fn make_writer(&'a self) -> ScrubWriter {
        ScrubWriter {
            buf: Vec::with_capacity(256),
        }
    }
}

/// Buffers one event and writes it scrubbed when dropped.
#[derive(Debug)]
pub struct ScrubWriter {
    buf: Vec<u8>,
}

impl Write for ScrubWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ScrubWriter {
    fn drop(&mut self) {
        let line = scrub(&String::from_utf8_lossy(&self.buf));
        let _ = io::stderr().lock().write_all(line.as_bytes());
    }
}

/// Prefixes of provider keys (Anthropic and OpenAI `sk-`, Google auth `AQ.` and standard
/// `AIza`) and keyward tokens (`kw_` for users, `kws_` for services).
const PREFIXES: &[&str] = &["sk-", "AIza", "AQ.", "kw_", "kws_"];
const MIN_TAIL: usize = 12;

/// A byte that may continue a key after its prefix (Google auth keys may hold `.`).
fn key_byte(prefix: &str, b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (prefix == "AQ." && b == b'.')
}

/// Masks every run that starts with a key prefix and continues with at least
/// `MIN_TAIL` key characters: `sk-ant-abc…xyz` becomes `sk-[REDACTED]`.
pub fn scrub(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        let hit = PREFIXES
            .iter()
            .find(|p| bytes.get(i..).is_some_and(|rest| rest.starts_with(p.as_bytes())));
        if let Some(p) = hit {
            let start = i + p.len();
            let tail = bytes
                .get(start..)
                .unwrap_or_default()
                .iter()
                .take_while(|b| key_byte(p, **b))
                .count();
            if tail >= MIN_TAIL {
                out.push_str(text.get(copied..start).unwrap_or_default());
                out.push_str("[REDACTED]");
                i = start + tail;
                copied = i;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(text.get(copied..).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_key_shapes_and_keeps_the_rest() {
        let line = "saved sk-ant-api03-AbCdEfGhIjKlMnOp and AIzaSyA1234567890abcdefgh, kw_abcdefghijklmnop; sk-short";
        let s = scrub(line);
        assert_eq!(s, "saved sk-[REDACTED] and AIza[REDACTED], kw_[REDACTED]; sk-short");
        let line = "key AQ.Ab8RN6abcdefgh.IJK_lm-nop0123 ended. AQ. then AQ.short";
        assert_eq!(scrub(line), "key AQ.[REDACTED] ended. AQ. then AQ.short");
    }

    #[test]
    fn handles_non_ascii_and_edges() {
        assert_eq!(scrub("é sk-"), "é sk-");
        assert_eq!(scrub("sk-AAAAAAAAAAAAAAAA"), "sk-[REDACTED]");
        assert_eq!(scrub("service kws_AbCdEfGhIjKlMnOp0123"), "service kws_[REDACTED]");
        assert_eq!(scrub(""), "");
    }
}
