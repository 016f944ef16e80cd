//! Canary keys, and every form in which a leaked key could show up in bytes.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine as _;

use crate::files::contains;

/// The characters keys are made of: `[A-Za-z0-9_-]`.
pub const KEY_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
/// Letters and digits only.
pub const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A fresh random 64-bit number (std's per-process random hasher keys, plus a counter).
pub fn random_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// `n` random characters of `alphabet`.
pub fn random_string(n: usize, alphabet: &[u8]) -> String {
    (0..n)
        .map(|_| {
            let i = (random_u64() % alphabet.len() as u64) as usize;
            char::from(alphabet.get(i).copied().unwrap_or(b'x'))
        })
        .collect()
}

/// One encoded form of a secret, and what it is called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Form {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// Every form a secret could leak in: raw, hex (lower and upper case), and base64 (standard
/// and URL-safe). Base64 of a secret embedded in a longer buffer depends on its offset
/// modulo 3, so for each of the three alignments the form is the run of characters that
/// encode whole 3-byte groups of the secret alone (padding-free), which appears in any
/// encoding of any buffer holding the secret at that alignment.
pub fn forms(secret: &[u8]) -> Vec<Form> {
    let mut out = vec![
        Form {
            name: "raw".into(),
            bytes: secret.to_vec(),
        },
        Form {
            name: "hex".into(),
            bytes: hex::encode(secret).into_bytes(),
        },
        Form {
            name: "HEX".into(),
            bytes: hex::encode_upper(secret).into_bytes(),
        },
    ];
    for shift in 0..3usize {
        let mut buf = vec![0xA5u8; shift];
        buf.extend_from_slice(secret);
        let first_group = shift.div_ceil(3);
        let end_group = buf.len() / 3;
        if end_group <= first_group {
            continue;
        }
        for (name, enc) in [
            ("base64", STANDARD_NO_PAD.encode(&buf)),
            ("base64url", URL_SAFE_NO_PAD.encode(&buf)),
        ] {
            if let Some(core) = enc.get(4 * first_group..4 * end_group) {
                out.push(Form {
                    name: format!("{name}@{shift}"),
                    bytes: core.as_bytes().to_vec(),
                });
            }
        }
    }
    out.dedup_by(|a, b| a.bytes == b.bytes);
    out
}

/// The names of the forms of `secret` found in `haystack`.
pub fn find_forms(haystack: &[u8], secret: &[u8]) -> Vec<String> {
    forms(secret)
        .into_iter()
        .filter(|f| contains(haystack, &f.bytes))
        .map(|f| f.name)
        .collect()
}

/// One place a form of a secret was found by a [`MultiSearch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Index of the secret in the list the search was built from.
    pub secret: usize,
    /// Which form ([`forms`] names, or `raw piece A..B`).
    pub form: String,
    /// Offset of the match in the haystack.
    pub offset: usize,
}

/// Every [`forms`] of many secrets, and every piece of `piece` characters of each, found in
/// one pass over a haystack: what a search of a whole process's memory (megabytes, thousands
/// of patterns) needs to stay fast. Pieces matter in memory: a freed buffer keeps most of a
/// key even after the allocator wrote its own bookkeeping over the buffer's first bytes.
#[derive(Debug)]
pub struct MultiSearch {
    automaton: aho_corasick::AhoCorasick,
    /// For each pattern: (secret index, form name).
    what: Vec<(usize, String)>,
}

impl MultiSearch {
    /// A search for every form of each of `secrets`, and for each piece of `piece` bytes of
    /// each (at every offset). A secret shorter than `piece` is looked for whole only.
    pub fn new(secrets: &[&[u8]], piece: usize) -> MultiSearch {
        assert!(piece >= 8, "pieces shorter than 8 bytes would match by chance");
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        let mut what = Vec::new();
        for (i, secret) in secrets.iter().enumerate() {
            for f in forms(secret) {
                patterns.push(f.bytes);
                what.push((i, f.name));
            }
            if secret.len() > piece {
                for (at, w) in secret.windows(piece).enumerate() {
                    patterns.push(w.to_vec());
                    what.push((i, format!("raw piece {at}..{}", at + piece)));
                }
            }
        }
        let automaton = aho_corasick::AhoCorasick::new(&patterns).expect("build the canary search");
        MultiSearch { automaton, what }
    }

    /// Every match in `haystack`, overlapping ones included.
    pub fn find(&self, haystack: &[u8]) -> Vec<Found> {
        self.automaton
            .find_overlapping_iter(haystack)
            .filter_map(|m| {
                let (secret, form) = self.what.get(m.pattern().as_usize())?;
                Some(Found {
                    secret: *secret,
                    form: form.clone(),
                    offset: m.start(),
                })
            })
            .collect()
    }
}

/// The first `len`-character window of `input` that occurs in `haystack`, if any. An input
/// shorter than `len` has no such window.
pub fn shared_chunk(haystack: &str, input: &str, len: usize) -> Option<String> {
    let chars: Vec<char> = input.chars().collect();
    if chars.len() < len || len == 0 {
        return None;
    }
    chars
        .windows(len)
        .map(|w| w.iter().collect::<String>())
        .find(|w| haystack.contains(w.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_alignment_of_base64_is_found() {
        let secret = b"sk-ant-api03-CANARYcanary0123456789abcdefXYZ";
        for pad in 0..6 {
            let mut buf = vec![b'x'; pad];
            buf.extend_from_slice(secret);
            buf.extend_from_slice(b"tail");
            for enc in [
                STANDARD_NO_PAD.encode(&buf),
                URL_SAFE_NO_PAD.encode(&buf),
                hex::encode(&buf),
            ] {
                let hay = format!("log line {enc} more");
                assert!(!find_forms(hay.as_bytes(), secret).is_empty(), "pad {pad}: {enc}");
            }
        }
        assert!(find_forms(b"nothing here", secret).is_empty());
    }

    #[test]
    fn the_multi_search_finds_each_secret_in_each_form_and_nothing_else() {
        let a = b"sk-ant-api03-CANARYcanary0123456789abcdefXYZ".as_slice();
        let b = b"AQ.Ab8RN6CaNaRyOTHER0123456789.tail".as_slice();
        let search = MultiSearch::new(&[a, b], 30);
        let mut hay = b"junk ".to_vec();
        hay.extend_from_slice(a);
        hay.extend_from_slice(b" more ");
        hay.extend_from_slice(URL_SAFE_NO_PAD.encode([b"xy".as_slice(), b].concat()).as_bytes());
        hay.extend_from_slice(b" and ");
        // What is left of `b` once an allocator wrote over its first 5 bytes.
        hay.extend_from_slice(b"\0\0\0\0\0");
        hay.extend_from_slice(&b[5..]);
        let found = search.find(&hay);
        let names = |i: usize| -> Vec<&str> {
            let mut n: Vec<&str> = found
                .iter()
                .filter(|f| f.secret == i)
                .map(|f| f.form.as_str())
                .collect();
            n.sort_unstable();
            n.dedup();
            n
        };
        assert!(names(0).contains(&"raw"), "{found:?}");
        assert!(names(0).contains(&"raw piece 14..44"), "{found:?}");
        assert_eq!(found.iter().find(|f| f.form == "raw").map(|f| f.offset), Some(5));
        let b_forms = names(1);
        assert!(b_forms.iter().any(|f| f.starts_with("base64")), "{found:?}");
        let raw_b: Vec<&&str> = b_forms.iter().filter(|f| f.starts_with("raw")).collect();
        assert_eq!(raw_b, [&"raw piece 5..35"], "{found:?}");
        assert!(search.find(b"nothing of either here").is_empty());
    }

    #[test]
    fn chunks() {
        assert_eq!(
            shared_chunk("abc 0123456789AB xyz", "zz0123456789ABzz", 12).as_deref(),
            Some("0123456789AB")
        );
        assert_eq!(shared_chunk("nothing", "zz0123456789ABzz", 12), None);
    }
}
