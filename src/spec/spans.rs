//! Positions for `load`: maps a JSON pointer into a YAML file back to the line and column of
//! its key and value. Built lazily, only when a diagnostic needs a position, so valid states
//! never pay for it.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct Span {
    /// Where the mapping key starts; `None` for sequence items and the root.
    pub key: Option<Position>,
    pub value: Position,
}

#[derive(Debug, Default)]
pub struct SpanIndex {
    spans: HashMap<String, Span>,
    /// Keys written twice in one mapping, at their second occurrence.
    pub duplicates: Vec<(String, Position)>,
}

impl SpanIndex {
    pub fn build(text: &str) -> SpanIndex {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        // A syntax error stops the walk; whatever was indexed before it stays usable.
        let _ = parser.load(&mut builder, false);
        SpanIndex {
            spans: builder.spans,
            duplicates: builder.duplicates,
        }
    }

    /// The span of `pointer`, or of its nearest ancestor that exists in the file.
    pub fn find(&self, pointer: &str) -> Option<(Span, bool)> {
        let mut current = pointer;
        let mut exact = true;
        loop {
            if let Some(span) = self.spans.get(current) {
                return Some((*span, exact));
            }
            exact = false;
            match current.rfind('/') {
                Some(idx) => current = &current[..idx],
                None => return None,
            }
        }
    }
}

enum Frame {
    Mapping {
        pointer: String,
        pending_key: Option<(String, Position)>,
        seen: std::collections::HashSet<String>,
    },
    Sequence {
        pointer: String,
        next_index: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    spans: HashMap<String, Span>,
    duplicates: Vec<(String, Position)>,
    done: bool,
}

fn position(mark: Marker) -> Position {
    Position {
        line: mark.line(),
        column: mark.col() + 1,
    }
}

pub fn escape_pointer_token(token: &str) -> std::borrow::Cow<'_, str> {
    if token.contains(['~', '/']) {
        token.replace('~', "~0").replace('/', "~1").into()
    } else {
        token.into()
    }
}

impl Builder {
    /// Called for each node start: returns the pointer of the new node, or `None` when the
    /// node is a mapping key (recorded as pending until its value arrives).
    fn place(&mut self, ev: &Event, pos: Position) -> Option<(String, Option<Position>)> {
        match self.stack.last_mut() {
            None => Some((String::new(), None)),
            Some(Frame::Sequence {
                pointer,
                next_index,
            }) => {
                let p = format!("{pointer}/{next_index}");
                *next_index += 1;
                Some((p, None))
            }
            Some(Frame::Mapping {
                pointer,
                pending_key,
                seen,
            }) => match pending_key.take() {
                Some((key, key_pos)) => Some((
                    format!("{pointer}/{}", escape_pointer_token(&key)),
                    Some(key_pos),
                )),
                None => {
                    let key = match ev {
                        Event::Scalar(value, ..) => value.clone(),
                        // Complex keys cannot be addressed by a JSON pointer.
                        _ => "\u{0}complex".to_string(),
                    };
                    if !seen.insert(key.clone()) {
                        self.duplicates.push((key.clone(), pos));
                    }
                    *pending_key = Some((key, pos));
                    None
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.done {
            return;
        }
        let pos = position(mark);
        match ev {
            Event::Scalar(..) | Event::Alias(..) => {
                if let Some((pointer, key)) = self.place(&ev, pos) {
                    self.spans.insert(pointer, Span { key, value: pos });
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let placed = self.place(&ev, pos);
                let Some((pointer, key)) = placed else {
                    // A mapping used as a key: index nothing under it.
                    self.stack.push(Frame::Sequence {
                        pointer: "\u{0}ignored".into(),
                        next_index: 0,
                    });
                    return;
                };
                self.spans.insert(pointer.clone(), Span { key, value: pos });
                self.stack.push(match ev {
                    Event::MappingStart(..) => Frame::Mapping {
                        pointer,
                        pending_key: None,
                        seen: Default::default(),
                    },
                    _ => Frame::Sequence {
                        pointer,
                        next_index: 0,
                    },
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::DocumentEnd => self.done = true,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_and_values() {
        let text =
            "version: 1\ndomains:\n  shop.example.com:\n    backend: shop\nlist:\n  - a\n  - b\n";
        let index = SpanIndex::build(text);
        let (span, exact) = index.find("/domains/shop.example.com/backend").unwrap();
        assert!(exact);
        assert_eq!(span.key, Some(Position { line: 4, column: 5 }));
        assert_eq!(
            span.value,
            Position {
                line: 4,
                column: 14
            }
        );
        let (span, _) = index.find("/list/1").unwrap();
        assert_eq!(span.value, Position { line: 7, column: 5 });
        let (span, exact) = index.find("/domains/shop.example.com/missing").unwrap();
        assert!(!exact);
        assert_eq!(span.key, Some(Position { line: 3, column: 3 }));
    }

    #[test]
    fn flow_style_and_escaped_keys() {
        let text = "agents:\n  a/b: { address: 10.0.0.1 }\n";
        let index = SpanIndex::build(text);
        let (span, exact) = index.find("/agents/a~1b/address").unwrap();
        assert!(exact);
        assert_eq!(span.value.line, 2);
    }
}
