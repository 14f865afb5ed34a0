//! Server-sent events, split and rewritten one event at a time, so a stream is never held
//! whole: each event passes on as soon as its blank line arrives.

use serde_json::Value;

/// Cuts a byte stream into whole events (each with its terminating blank line).
#[derive(Debug, Default)]
pub struct SseSplitter {
    buf: Vec<u8>,
    max_event: usize,
}

impl SseSplitter {
    pub fn new(max_event: usize) -> Self {
        SseSplitter {
            buf: Vec::new(),
            max_event,
        }
    }

    /// Adds bytes; returns the events they complete. Errs when one event outgrows the limit.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = event_end(&self.buf) {
            events.push(self.buf.drain(..end).collect());
        }
        if self.buf.len() > self.max_event {
            return Err(format!(
                "an SSE event is larger than {} bytes",
                self.max_event
            ));
        }
        Ok(events)
    }

    /// What is left when the stream ends (an unterminated last event).
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// The end (exclusive) of the first event: the line terminator (`\r\n`, `\n` or `\r`) that
/// follows another one. A `\r` at the very end may be the first half of `\r\n`: undecided
/// until more bytes come.
fn event_end(buf: &[u8]) -> Option<usize> {
    // The length of the terminator at `i` (None: none there, or not yet decidable).
    let terminator = |i: usize| -> Option<Option<usize>> {
        match buf.get(i) {
            Some(b'\n') => Some(Some(1)),
            Some(b'\r') => match buf.get(i + 1) {
                Some(b'\n') => Some(Some(2)),
                Some(_) => Some(Some(1)),
                None => None,
            },
            _ => Some(None),
        }
    };
    let mut i = 0;
    while i < buf.len() {
        match terminator(i)? {
            Some(len) => {
                let next = i + len;
                match buf.get(next) {
                    // A blank line: the event ends after its terminator (a lone `\r` at the
                    // end counts as one; a `\n` after it is then an empty line of its own).
                    Some(b'\n') => return Some(next + 1),
                    Some(b'\r') => {
                        return Some(
                            next + if buf.get(next + 1) == Some(&b'\n') {
                                2
                            } else {
                                1
                            },
                        )
                    }
                    _ => i = next,
                }
            }
            None => i += 1,
        }
    }
    None
}

/// The lines of an event, whatever their terminators.
fn event_lines(text: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(['\r', '\n']) {
        lines.push(&rest[..at]);
        let skip = if rest[at..].starts_with("\r\n") { 2 } else { 1 };
        rest = &rest[at + skip..];
    }
    if !rest.is_empty() {
        lines.push(rest);
    }
    lines
}

/// A JSON-RPC message, or a batch of them.
fn is_message(value: &Value) -> bool {
    let one = |v: &Value| v.get("jsonrpc").and_then(Value::as_str) == Some("2.0");
    match value {
        Value::Array(items) => !items.is_empty() && items.iter().all(one),
        other => one(other),
    }
}

/// The event with its data emptied: its `id`, `retry` and `event` lines kept.
fn without_data(lines: &[&str]) -> Vec<u8> {
    let mut out = String::new();
    for line in lines
        .iter()
        .filter(|l| !l.is_empty() && !l.starts_with("data:"))
    {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("data: \n\n");
    out.into_bytes()
}

/// Applies `rewrite` to the event's JSON data. Returns the new event text when `rewrite`
/// changed something (it says so by returning true), or `None` to pass the event unchanged.
/// A rewrite that replaces the message with `null` drops the event (empty text).
/// The JSON message an SSE event carries (its `data:` lines joined), if it is JSON.
pub fn event_json(event: &[u8]) -> Option<serde_json::Value> {
    let text = std::str::from_utf8(event).ok()?;
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:").map(str::trim_start))
        .collect();
    serde_json::from_str(&data.join("\n")).ok()
}

pub fn rewrite_event_data(
    event: &[u8],
    rewrite: impl FnOnce(&mut Value) -> bool,
) -> Option<Vec<u8>> {
    let Ok(text) = std::str::from_utf8(event) else {
        // Not text: not an MCP message anyone may rely on; dropped rather than passed unread.
        return Some(Vec::new());
    };
    let lines = event_lines(text);
    let data: Vec<&str> = lines
        .iter()
        .filter_map(|l| {
            l.strip_prefix("data:")
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
        })
        .collect();
    let joined = data.join("\n");
    // No message: a comment, or a priming event (SEP-1699: an `id` to resume from, empty data),
    // which the client needs to resume a stream the server closes.
    if joined.trim().is_empty() {
        return None;
    }
    // Data that is not JSON cannot be checked: dropped, never passed unfiltered.
    let Ok(mut value) = serde_json::from_str::<Value>(&joined) else {
        return Some(Vec::new());
    };
    if !is_message(&value) {
        // JSON that is no JSON-RPC message (a replayed priming event stored as `{}`, which
        // clients fail to read): kept as the priming event it stands for, its id with it.
        return Some(without_data(&lines));
    }
    if !rewrite(&mut value) {
        return None;
    }
    if value.is_null() {
        // The rewrite removed the message: the event goes with it.
        return Some(Vec::new());
    }
    let mut out = String::with_capacity(text.len());
    let mut wrote_data = false;
    for line in lines.iter().filter(|l| !l.is_empty()) {
        if line.starts_with("data:") {
            if !wrote_data {
                out.push_str("data: ");
                out.push_str(&value.to_string());
                out.push('\n');
                wrote_data = true;
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push('\n');
    Some(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn splits_across_chunks_and_line_endings() {
        let mut s = SseSplitter::new(1024);
        assert!(s.push(b"event: message\ndata: {\"a\"").unwrap().is_empty());
        let events = s.push(b":1}\n\nid: 2\r\ndata: 2\r\n\r\ndata: 3\n").unwrap();
        assert_eq!(
            events,
            vec![
                b"event: message\ndata: {\"a\":1}\n\n".to_vec(),
                b"id: 2\r\ndata: 2\r\n\r\n".to_vec()
            ]
        );
        assert_eq!(s.finish(), b"data: 3\n".to_vec());
    }

    /// The data of each event, in order (events without data dispatch nothing).
    fn data_of(events: &[Vec<u8>]) -> Vec<String> {
        events
            .iter()
            .map(|e| {
                event_lines(std::str::from_utf8(e).unwrap())
                    .iter()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .filter(|d| !d.is_empty())
            .collect()
    }

    proptest::proptest! {
        /// However a stream is cut into chunks, and whichever line terminators (LF, CRLF, CR)
        /// its lines use, the splitter yields the same events with the same data.
        #[test]
        fn chunking_and_terminators_do_not_change_the_events(
            events in proptest::collection::vec(
                (proptest::collection::vec(("[a-z0-9]{1,8}", 0..3usize), 1..4), 0..3usize),
                1..6,
            ),
            cuts in proptest::collection::vec(0..400usize, 0..8),
        ) {
            const ENDS: [&str; 3] = ["\n", "\r\n", "\r"];
            let mut stream = String::new();
            let mut expected = Vec::new();
            // A `\n` right after a `\r` would make one CRLF of two terminators: written as CRLF.
            let push_end = |stream: &mut String, end: usize| {
                let end = if end == 0 && stream.ends_with('\r') { 1 } else { end };
                stream.push_str(ENDS[end]);
            };
            for (lines, blank) in &events {
                let mut data = Vec::new();
                for (text, end) in lines {
                    stream.push_str("data: ");
                    stream.push_str(text);
                    push_end(&mut stream, *end);
                    data.push(text.clone());
                }
                push_end(&mut stream, *blank);
                expected.push(data.join("\n"));
            }
            let bytes = stream.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort();
            let mut splitter = SseSplitter::new(1 << 20);
            let mut got = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                got.extend(splitter.push(&bytes[from..cut]).unwrap());
                from = cut;
            }
            let rest = splitter.finish();
            if !rest.is_empty() {
                got.push(rest);
            }
            proptest::prop_assert_eq!(data_of(&got), expected);
        }

        /// Whatever bytes arrive, the splitter and the rewriter never panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut splitter = SseSplitter::new(256);
            if let Ok(events) = splitter.push(&bytes) {
                for event in events {
                    let _ = rewrite_event_data(&event, |v| { *v = Value::Null; true });
                }
            }
        }
    }

    #[test]
    fn oversized_event_is_an_error() {
        let mut s = SseSplitter::new(8);
        assert!(s.push(b"data: 0123456789").is_err());
    }

    #[test]
    fn rewrites_data_and_keeps_other_fields() {
        let event = b"event: message\nid: 7\ndata: {\"jsonrpc\":\"2.0\",\"x\":\ndata: 1}\n\n";
        let out = rewrite_event_data(event, |v| {
            v["x"] = json!(2);
            true
        })
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "event: message\nid: 7\ndata: {\"jsonrpc\":\"2.0\",\"x\":2}\n\n"
        );
        assert!(rewrite_event_data(event, |_| false).is_none());
        assert!(rewrite_event_data(b": comment\n\n", |_| true).is_none());
    }

    #[test]
    fn priming_events_keep_their_id() {
        // SEP-1699: an id to resume from, and no message.
        let priming = b"id: s1_5_a\nretry: 50\ndata: \n\n";
        assert!(rewrite_event_data(priming, |_| true).is_none());
        // The same event replayed from a store as `{}`: no message either, its id kept.
        let replayed = b"event: message\nid: s1_5_a\ndata: {}\n\n";
        assert_eq!(
            String::from_utf8(rewrite_event_data(replayed, |_| true).unwrap()).unwrap(),
            "event: message\nid: s1_5_a\ndata: \n\n"
        );
        // Data that is not JSON at all is dropped, never passed unchecked.
        assert_eq!(
            rewrite_event_data(b"data: {oops\n\n", |_| true),
            Some(Vec::new())
        );
    }
}
