//! An incremental server-sent-events parser (the WHATWG event-stream format) that accepts its
//! input cut anywhere: inside a line, between `\r` and `\n`, inside a UTF-8 character.
//!
//! Lines end with `\n`, `\r\n` or `\r`; a leading UTF-8 BOM is dropped; `:` lines are comments;
//! `event` and `data` fields are kept, `id` and `retry` ignored; a blank line dispatches the
//! event if it has data. An event still open when the input ends is not dispatched.

use std::mem;

/// Largest event (all its lines together) the parser holds before giving up.
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` field, or `message` when there was none.
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

#[derive(Debug, Default)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    after_cr: bool,
    seen_first_line: bool,
    event: String,
    data: String,
    has_data: bool,
    overflowed: bool,
}

impl SseParser {
    /// Parses `bytes`, pushing every completed event to `out`. Returns `false` once the event
    /// being read grew past [`MAX_EVENT_BYTES`]; the parser then ignores all further input.
    pub(crate) fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<SseEvent>) -> bool {
        while !bytes.is_empty() && !self.overflowed {
            if self.after_cr {
                self.after_cr = false;
                if let Some(rest) = bytes.strip_prefix(b"\n") {
                    bytes = rest;
                    continue;
                }
            }
            match bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(end) => {
                    let (head, tail) = (
                        bytes.get(..end).unwrap_or_default(),
                        bytes.get(end..).unwrap_or_default(),
                    );
                    self.push_line_bytes(head);
                    self.after_cr = tail.first() == Some(&b'\r');
                    bytes = tail.get(1..).unwrap_or_default();
                    if !self.overflowed {
                        self.end_line(out);
                    }
                }
                None => {
                    self.push_line_bytes(bytes);
                    bytes = &[];
                }
            }
        }
        !self.overflowed
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) {
        if self.line.len() + self.data.len() + bytes.len() > MAX_EVENT_BYTES {
            self.overflowed = true;
            self.line = Vec::new();
            self.data = String::new();
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let raw = mem::take(&mut self.line);
        let mut bytes: &[u8] = &raw;
        if !self.seen_first_line {
            self.seen_first_line = true;
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        if bytes.is_empty() {
            self.dispatch(out);
        } else if !bytes.starts_with(b":") {
            let line = String::from_utf8_lossy(bytes);
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (&*line, ""),
            };
            match field {
                "event" => value.clone_into(&mut self.event),
                "data" => {
                    self.data.push_str(value);
                    self.data.push('\n');
                    self.has_data = true;
                }
                _ => {}
            }
        }
        // Keep the allocation for the next line.
        self.line = raw;
        self.line.clear();
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = mem::take(&mut self.event);
        if !mem::take(&mut self.has_data) {
            return;
        }
        let mut data = mem::take(&mut self.data);
        if data.ends_with('\n') {
            data.pop();
        }
        out.push(SseEvent {
            event: if event.is_empty() { "message".to_owned() } else { event },
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        assert!(p.feed(input, &mut out));
        out
    }

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
        }
    }

    #[test]
    fn all_line_endings_and_fields() {
        let input = b"\xEF\xBB\xBF: comment\nevent: a\ndata: 1\ndata:2\n\r\nid: 7\r\ndata: x\r\rretry: 5\ndata\n\n";
        assert_eq!(
            parse_all(input),
            [ev("a", "1\n2"), ev("message", "x"), ev("message", "")]
        );
    }

    #[test]
    fn events_without_data_are_not_dispatched_and_reset_the_type() {
        assert_eq!(parse_all(b"event: ping\n\ndata: d\n\n"), [ev("message", "d")]);
    }

    #[test]
    fn an_unfinished_event_is_not_dispatched() {
        assert_eq!(parse_all(b"data: a\n\ndata: b\n"), [ev("message", "a")]);
    }

    #[test]
    fn split_anywhere_gives_the_same_events() {
        let input = "event: e\r\ndata: héllo wörld €\r\n\r\ndata: two\rdata: lines\r\r: c\n\ndata: last\n\n".as_bytes();
        let whole = parse_all(input);
        assert_eq!(whole.len(), 3);
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let mut p = SseParser::default();
                let mut out = Vec::new();
                for part in [&input[..i], &input[i..j], &input[j..]] {
                    p.feed(part, &mut out);
                }
                assert_eq!(out, whole, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn oversized_events_stop_the_parser() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        let chunk = vec![b'a'; 1024 * 1024];
        assert!(p.feed(b"data: ", &mut out));
        let mut ok = true;
        for _ in 0..5 {
            ok &= p.feed(&chunk, &mut out);
        }
        assert!(!ok);
        assert!(!p.feed(b"\n\ndata: x\n\n", &mut out));
        assert!(out.is_empty());
    }
}
