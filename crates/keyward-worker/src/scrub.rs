//! Removing a key a provider echoed back. Some providers repeat the key in an error
//! message; the worker masks every occurrence of the exact key (with `*`, so buffers are
//! rewritten in place, never reallocated with the key inside) before a byte leaves it,
//! including occurrences split across two chunks of a stream.

use zeroize::Zeroizing;

/// Masks every occurrence of `key` in `data` in place.
pub fn mask_in_place(data: &mut [u8], key: &[u8]) -> usize {
    if key.is_empty() || data.len() < key.len() {
        return 0;
    }
    let mut hits = 0;
    let mut i = 0;
    while i + key.len() <= data.len() {
        if data.get(i..i + key.len()) == Some(key) {
            if let Some(span) = data.get_mut(i..i + key.len()) {
                span.fill(b'*');
            }
            hits += 1;
            i += key.len();
        } else {
            i += 1;
        }
    }
    hits
}

/// Masks a key across a stream of chunks. Only bytes that could be the start of an
/// occurrence split by a chunk boundary are held back: the longest end of what has been
/// read that is also a beginning of the key (almost always nothing, so chunks are relayed
/// as they arrive).
pub struct StreamScrubber<'k> {
    key: &'k [u8],
    pending: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for StreamScrubber<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamScrubber([REDACTED])")
    }
}

impl<'k> StreamScrubber<'k> {
    pub fn new(key: &'k [u8]) -> StreamScrubber<'k> {
        StreamScrubber {
            key,
            pending: Zeroizing::new(Vec::new()),
        }
    }

    /// The masked bytes that are safe to send now.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(chunk);
        mask_in_place(&mut self.pending, self.key);
        let keep = held_back(&self.pending, self.key);
        let cut = self.pending.len() - keep;
        let out = self.pending.get(..cut).unwrap_or_default().to_vec();
        self.pending.drain(..cut);
        out
    }

    /// Whatever is held back, at the end of the stream.
    pub fn finish(&mut self) -> Vec<u8> {
        mask_in_place(&mut self.pending, self.key);
        let out = self.pending.to_vec();
        self.pending.clear();
        out
    }
}

/// What a worker runs a provider's answer through: every echo of the key masked, and in an
/// error answer also every occurrence of the key's first 8 characters. (Providers that
/// mask a rejected key themselves show its first 8 and last 4 characters, e.g. OpenAI's
/// "sk-abcde****wxyz": for a legacy `sk-` key those 8 hold 5 secret characters. Only
/// last4 may ever be shown.)
pub struct EchoMasker<'k> {
    whole: StreamScrubber<'k>,
    prefix: Option<StreamScrubber<'k>>,
}

impl std::fmt::Debug for EchoMasker<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EchoMasker([REDACTED])")
    }
}

/// How many leading characters of a key an error answer may not show.
const PREFIX_LEN: usize = 8;

impl<'k> EchoMasker<'k> {
    pub fn new(key: &'k [u8], error_answer: bool) -> EchoMasker<'k> {
        let prefix = if error_answer && key.len() > PREFIX_LEN + 4 {
            key.get(..PREFIX_LEN)
        } else {
            None
        };
        EchoMasker {
            whole: StreamScrubber::new(key),
            prefix: prefix.map(StreamScrubber::new),
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        let once = self.whole.feed(chunk);
        match &mut self.prefix {
            Some(p) => p.feed(&once),
            None => once,
        }
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let once = self.whole.finish();
        match &mut self.prefix {
            Some(p) => {
                let mut out = p.feed(&once);
                out.extend(p.finish());
                out
            }
            None => once,
        }
    }
}

/// The length of the longest proper prefix of `key` that `data` ends with.
fn held_back(data: &[u8], key: &[u8]) -> usize {
    let longest = key.len().saturating_sub(1).min(data.len());
    (1..=longest)
        .rev()
        .find(|&k| key.get(..k).is_some_and(|prefix| data.ends_with(prefix)))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_answers_lose_the_key_prefix_too() {
        let key = b"sk-abcdefghijklmnopqrstuvwxyz012345";
        let echo = b"{\"message\":\"Incorrect API key provided: sk-abcde**********************2345.\"}";
        let mut m = EchoMasker::new(key, true);
        let mut out = m.feed(&echo[..30]);
        out.extend(m.feed(&echo[30..]));
        out.extend(m.finish());
        assert!(
            !out.windows(8).any(|w| w == &key[..8]),
            "{}",
            String::from_utf8_lossy(&out)
        );
        assert!(out.ends_with(b"2345.\"}"));
        // A successful answer keeps its text as it is, but for the whole key.
        let mut ok = EchoMasker::new(key, false);
        assert_eq!(ok.feed(b"sk-abcde is fine"), b"sk-abcde is fine");
    }

    #[test]
    fn masks_whole_occurrences() {
        let mut d = b"bad key sk-abc123 and sk-abc123!".to_vec();
        assert_eq!(mask_in_place(&mut d, b"sk-abc123"), 2);
        assert_eq!(d, b"bad key ********* and *********!");
    }

    #[test]
    fn holds_back_only_a_possible_beginning_of_the_key() {
        let key = b"sk-ant-SECRET";
        let mut s = StreamScrubber::new(key);
        assert_eq!(
            s.feed(b"data: {}\n\n"),
            b"data: {}\n\n",
            "a complete event goes through at once"
        );
        assert_eq!(s.feed(b"x sk-an"), b"x ", "a possible beginning waits");
        assert_eq!(s.feed(b"swer\n\n"), b"sk-answer\n\n");
        assert!(s.finish().is_empty());
    }

    #[test]
    fn masks_across_every_split_point() {
        let key = b"sk-ant-SECRETSECRET";
        let text = b"{\"error\":\"invalid key sk-ant-SECRETSECRET given\"}".to_vec();
        for a in 0..text.len() {
            for b in a..text.len() {
                let mut s = StreamScrubber::new(key);
                let mut out = s.feed(&text[..a]);
                out.extend(s.feed(&text[a..b]));
                out.extend(s.feed(&text[b..]));
                out.extend(s.finish());
                assert_eq!(out.len(), text.len());
                assert!(!out.windows(key.len()).any(|w| w == key), "split {a}/{b}");
                assert!(out.starts_with(b"{\"error\":\"invalid key ****"));
            }
        }
    }
}
