//! Where each node of a YAML document starts, so a problem found after parsing (a route's
//! tool undeclared, a secret file missing) is reported at its line, not at `line 1`.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Lines by dotted path: `upstreams.0.routes.1` → the line that route starts on.
#[derive(Debug, Clone, Default)]
pub struct YamlLines(HashMap<String, usize>);

impl YamlLines {
    /// The lines of `text`'s first document; none when it does not parse (serde says why).
    pub fn of(text: &str) -> YamlLines {
        let mut walk = Walk::default();
        match Parser::new_from_str(text).load(&mut walk, false) {
            Ok(()) => YamlLines(walk.lines),
            Err(_) => YamlLines::default(),
        }
    }

    /// The line of `path`, else of its nearest ancestor that has one.
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut path = path;
        loop {
            if let Some(&line) = self.0.get(path) {
                return Some(line);
            }
            path = &path[..path.rfind('.')?];
        }
    }
}

enum Frame {
    /// A mapping, with the key whose value is being read.
    Map(Option<String>),
    /// A sequence, with the index of the item being read.
    Seq(usize),
}

#[derive(Default)]
struct Walk {
    stack: Vec<Frame>,
    lines: HashMap<String, usize>,
}

impl Walk {
    fn path(&self) -> String {
        let parts: Vec<String> = self
            .stack
            .iter()
            .filter_map(|frame| match frame {
                Frame::Map(key) => key.clone(),
                Frame::Seq(index) => Some(index.to_string()),
            })
            .collect();
        parts.join(".")
    }

    /// A value is read whole: the next one is the map's next key or the sequence's next item.
    fn value_done(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map(key)) => *key = None,
            Some(Frame::Seq(index)) => *index += 1,
            None => {}
        }
    }

    fn expects_key(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map(None)))
    }
}

impl MarkedEventReceiver for Walk {
    fn on_event(&mut self, event: Event, mark: Marker) {
        match event {
            Event::Scalar(text, ..) if self.expects_key() => {
                self.stack.pop();
                self.stack.push(Frame::Map(Some(text)));
                self.lines.entry(self.path()).or_insert(mark.line());
            }
            Event::Scalar(..) | Event::Alias(_) => {
                self.lines.entry(self.path()).or_insert(mark.line());
                self.value_done();
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                if self.expects_key() {
                    // A key that is itself a collection: nothing under it is named.
                    self.stack.pop();
                    self.stack.push(Frame::Map(Some("?".into())));
                }
                self.lines.entry(self.path()).or_insert(mark.line());
                self.stack.push(match event {
                    Event::MappingStart(..) => Frame::Map(None),
                    _ => Frame::Seq(0),
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.value_done();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_found_in_block_and_flow_styles() {
        let text = "listen: x\nupstreams:\n  - name: a\n    routes:\n      - { tool: t, path: /p }\n      - tool: u\n        path: /q\n  - name: b\nlimits:\n  max_in_flight: 0\n";
        let lines = YamlLines::of(text);
        assert_eq!(lines.line("listen"), Some(1));
        assert_eq!(lines.line("upstreams.0"), Some(3));
        assert_eq!(lines.line("upstreams.0.routes.0"), Some(5));
        assert_eq!(lines.line("upstreams.0.routes.1.path"), Some(7));
        assert_eq!(lines.line("upstreams.1.name"), Some(8));
        assert_eq!(lines.line("limits.max_in_flight"), Some(10));
        // Not in the document: the nearest ancestor.
        assert_eq!(lines.line("upstreams.1.credential"), Some(8));
        assert_eq!(lines.line("tasks.store"), None);
        assert_eq!(YamlLines::of("a: [").line("a"), None);
    }
}
