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

/// The end (exclusive) of the first event: after "\n\n", "\r\n\r\n" or "\r\r".
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 1 < buf.len() {
        match (buf[i], buf[i + 1]) {
            (b'\n', b'\n') | (b'\r', b'\r') => return Some(i + 2),
            (b'\r', b'\n') if buf[i + 2..].starts_with(b"\r\n") => return Some(i + 4),
            _ => i += 1,
        }
    }
    None
}

/// Applies `rewrite` to the event's JSON data. Returns the new event text when `rewrite`
/// changed something (it says so by returning true), or `None` to pass the event unchanged.
/// A rewrite that replaces the message with `null` drops the event (empty text).
pub fn rewrite_event_data(
    event: &[u8],
    rewrite: impl FnOnce(&mut Value) -> bool,
) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(event).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let data: Vec<&str> = lines
        .iter()
        .filter_map(|l| {
            l.strip_prefix("data:")
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
        })
        .collect();
    if data.is_empty() {
        return None;
    }
    let mut value: Value = serde_json::from_str(&data.join("\n")).ok()?;
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

    #[test]
    fn oversized_event_is_an_error() {
        let mut s = SseSplitter::new(8);
        assert!(s.push(b"data: 0123456789").is_err());
    }

    #[test]
    fn rewrites_data_and_keeps_other_fields() {
        let event = b"event: message\nid: 7\ndata: {\"x\":\ndata: 1}\n\n";
        let out = rewrite_event_data(event, |v| {
            v["x"] = json!(2);
            true
        })
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "event: message\nid: 7\ndata: {\"x\":2}\n\n"
        );
        assert!(rewrite_event_data(event, |_| false).is_none());
        assert!(rewrite_event_data(b": comment\n\n", |_| true).is_none());
    }
}
