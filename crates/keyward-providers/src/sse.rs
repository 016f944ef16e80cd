//! An incremental server-sent-events parser (the WHATWG event-stream format) that accepts its
//! input cut anywhere: inside a line, between `\r` and `\n`, inside a UTF-8 character.
//!
//! Lines end with `\n`, `\r\n` or `\r`; a leading UTF-8 BOM is dropped; `:` lines are comments;
//! `event` and `data` fields are kept, `id` and `retry` ignored; a blank line dispatches the
//! event if it has data. An event still open when the input ends is not dispatched.
//!
//! This is keyward's only SSE splitter: [`SseParser`] reads events for the stream decoders,
//! and [`SseBlockFilter`] uses it to relay a raw stream less some of its events, byte for
//! byte otherwise.

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
    /// A blank line ending in `\r` closed a block; the `\n` that may follow belongs to it.
    block_open_after_cr: bool,
}

/// Where a block ended: the lines of one event (or comments, or nothing) through the blank
/// line that closes it, terminator included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockEnd {
    /// The offset just past the block, in the bytes of the `feed_blocks` call that saw it.
    pub at: usize,
    /// How many events `out` held when the block ended: its event, if it dispatched one, is
    /// the last of them.
    pub events: usize,
}

impl SseParser {
    /// Parses `bytes`, pushing every completed event to `out`. Returns `false` once the event
    /// being read grew past [`MAX_EVENT_BYTES`]; the parser then ignores all further input.
    pub(crate) fn feed(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) -> bool {
        self.feed_inner(bytes, out, None)
    }

    /// [`feed`](Self::feed), also pushing to `ends` where each block ended. A block closed by
    /// a blank line ending in `\r` is reported once the next byte shows whether a `\n`
    /// belongs to it (at the end of the input: see [`block_open_after_cr`](Self::block_open_after_cr)).
    pub(crate) fn feed_blocks(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>, ends: &mut Vec<BlockEnd>) -> bool {
        self.feed_inner(bytes, out, Some(ends))
    }

    /// Whether the input so far ends with a block closed by a blank line ending in `\r`,
    /// not yet reported.
    pub(crate) fn block_open_after_cr(&self) -> bool {
        self.block_open_after_cr
    }

    fn feed_inner(&mut self, mut bytes: &[u8], out: &mut Vec<SseEvent>, mut ends: Option<&mut Vec<BlockEnd>>) -> bool {
        let total = bytes.len();
        while !bytes.is_empty() && !self.overflowed {
            if self.after_cr {
                self.after_cr = false;
                let lf = bytes.first() == Some(&b'\n');
                if lf {
                    bytes = bytes.get(1..).unwrap_or_default();
                }
                if mem::take(&mut self.block_open_after_cr) {
                    if let Some(ends) = ends.as_deref_mut() {
                        ends.push(BlockEnd {
                            at: total - bytes.len(),
                            events: out.len(),
                        });
                    }
                }
                if lf {
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
                    if !self.overflowed && self.end_line(out) {
                        if self.after_cr {
                            self.block_open_after_cr = true;
                        } else if let Some(ends) = ends.as_deref_mut() {
                            ends.push(BlockEnd {
                                at: total - bytes.len(),
                                events: out.len(),
                            });
                        }
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

    /// Ends the line read so far; `true` when it was blank (the end of a block).
    fn end_line(&mut self, out: &mut Vec<SseEvent>) -> bool {
        let raw = mem::take(&mut self.line);
        let mut bytes: &[u8] = &raw;
        if !self.seen_first_line {
            self.seen_first_line = true;
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        let blank = bytes.is_empty();
        if blank {
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
        blank
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

/// Relays a raw event stream block by block, leaving out each block whose event's data
/// `hide` picks; every other byte passes unchanged, as soon as its block is complete.
///
/// Blocks are split by [`SseParser`], so every line ending counts and a held block is
/// bounded: once one outgrows [`MAX_EVENT_BYTES`] the filter stops filtering and passes
/// everything on as it comes (a block that large is no event keyward hides, and an event
/// that large fails the stream's decoder anyway).
#[derive(Debug)]
pub(crate) struct SseBlockFilter {
    parser: SseParser,
    hide: fn(&str) -> bool,
    /// The bytes of the block being read.
    held: Vec<u8>,
    /// Whether the block being read dispatched an event to hide.
    hiding: bool,
    gave_up: bool,
}

impl SseBlockFilter {
    pub(crate) fn new(hide: fn(&str) -> bool) -> SseBlockFilter {
        SseBlockFilter {
            parser: SseParser::default(),
            hide,
            held: Vec::new(),
            hiding: false,
            gave_up: false,
        }
    }

    /// The bytes to pass on after `chunk`: every block it completed, less the hidden ones.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.gave_up {
            return chunk.to_vec();
        }
        let mut events = Vec::new();
        let mut ends = Vec::new();
        let fits = self.parser.feed_blocks(chunk, &mut events, &mut ends);
        let mut out = Vec::with_capacity(chunk.len() + self.held.len());
        let (mut from, mut seen) = (0, 0);
        for end in ends {
            self.note_events(events.get(seen..end.events).unwrap_or_default());
            seen = end.events;
            self.held.extend_from_slice(chunk.get(from..end.at).unwrap_or_default());
            from = end.at;
            self.close_block(&mut out);
        }
        self.note_events(events.get(seen..).unwrap_or_default());
        self.held.extend_from_slice(chunk.get(from..).unwrap_or_default());
        if !fits || self.held.len() > MAX_EVENT_BYTES {
            self.gave_up = true;
            out.append(&mut self.held);
        }
        out
    }

    /// The bytes left when the stream has ended: a last block closed by a lone `\r` (less if
    /// hidden), or an incomplete one, as it came.
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.gave_up && self.parser.block_open_after_cr() {
            self.close_block(&mut out);
        } else {
            out.append(&mut self.held);
        }
        out
    }

    fn note_events(&mut self, events: &[SseEvent]) {
        let hide = self.hide;
        self.hiding |= events.iter().any(|e| hide(&e.data));
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        if !mem::take(&mut self.hiding) {
            out.extend_from_slice(&self.held);
        }
        self.held.clear();
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
