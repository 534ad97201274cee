//! A YAML document as a tree of nodes that remember where they came from.
//!
//! serde's derive stops at the first error and forgets positions; ficus must report every
//! problem at once as `FILE:LINE:COLUMN`, so the config is first read into this tree (built from
//! saphyr-parser's events) and then decoded by hand in [`super::raw`].

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// Where a node starts: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    pub line: usize,
    pub col: usize,
}

impl Mark {
    fn from_span(span: &Span) -> Self {
        Mark {
            line: span.start.line(),
            col: span.start.col() + 1,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Value {
    Null,
    Scalar(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

#[derive(Debug, Clone)]
pub struct Key {
    pub name: String,
    pub mark: Mark,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub value: Value,
    pub mark: Mark,
    /// A plain (unquoted) scalar: `42` may be a number, `"42"` is a string.
    pub plain: bool,
}

impl Node {
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Null => "null",
            Value::Scalar(_) => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// Where the value of this mapping's `key` is, for an error about that value found after
    /// decoding (a duplicate name, a clash between fields); the mapping's own mark when it
    /// has no such key.
    pub fn value_mark(&self, key: &str) -> Mark {
        self.child(key).map_or(self.mark, |n| n.mark)
    }

    /// The scalar text of this mapping's `key`, as written.
    pub fn scalar(&self, key: &str) -> Option<&str> {
        match &self.child(key)?.value {
            Value::Scalar(s) => Some(s),
            _ => None,
        }
    }

    fn child(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.name == key).map(|(_, n)| n),
            _ => None,
        }
    }
}

/// A YAML syntax error, or a structural one (duplicate key, alias bomb) found while building.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub mark: Mark,
    pub message: String,
}

/// Aliases are expanded by copying; this bounds the copies so that a "billion laughs" file
/// fails instead of exhausting memory.
const MAX_NODES: usize = 100_000;

enum Frame {
    Seq(Vec<Node>, Mark, usize),
    /// The entries, and the key waiting for its value (`false`: a duplicate, dropped).
    Map(Vec<(Key, Node)>, Option<(Key, bool)>, Mark, usize),
}

/// A key given twice in one mapping: its key path and where the second one is. Only the
/// first value is kept.
#[derive(Debug, Clone)]
pub struct Duplicate {
    pub mark: Mark,
    pub path: String,
    pub name: String,
}

/// Parses one YAML document. An empty document is `Null`. A duplicate key is an error.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let (node, duplicates) = parse_collecting(text)?;
    match duplicates.into_iter().next() {
        None => Ok(node),
        Some(d) => Err(SyntaxError {
            mark: d.mark,
            message: format!("duplicate key `{}`", d.name),
        }),
    }
}

/// [`parse`], with duplicate keys returned beside the tree (which keeps each first value)
/// rather than stopping it: a config reports them with every other error.
pub fn parse_collecting(text: &str) -> Result<(Node, Vec<Duplicate>), SyntaxError> {
    let mut duplicates: Vec<Duplicate> = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    let mut root: Option<Node> = None;
    let mut nodes = 0usize;

    for item in Parser::new_from_str(text) {
        let (event, span) = item.map_err(|e| SyntaxError {
            mark: Mark {
                line: e.marker().line(),
                col: e.marker().col() + 1,
            },
            message: e.info().to_string(),
        })?;
        let mark = Mark::from_span(&span);
        let finished: Option<(Node, usize)> = match event {
            Event::Scalar(text, style, anchor, _tag) => {
                let plain = matches!(style, ScalarStyle::Plain);
                let value = if plain && matches!(&*text, "" | "~" | "null" | "Null" | "NULL") {
                    Value::Null
                } else {
                    Value::Scalar(text.into_owned())
                };
                Some((Node { value, mark, plain }, anchor))
            }
            Event::Alias(id) => {
                let node = anchors.get(&id).cloned().ok_or_else(|| SyntaxError {
                    mark,
                    message: "alias to an unknown anchor".into(),
                })?;
                nodes += count(&node);
                Some((node, 0))
            }
            Event::SequenceStart(anchor, _) => {
                stack.push(Frame::Seq(Vec::new(), mark, anchor));
                None
            }
            Event::MappingStart(anchor, _) => {
                stack.push(Frame::Map(Vec::new(), None, mark, anchor));
                None
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq(items, m, anchor)) => Some((
                    Node {
                        value: Value::Seq(items),
                        mark: m,
                        plain: false,
                    },
                    anchor,
                )),
                _ => return Err(internal(mark)),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map(entries, _, m, anchor)) => Some((
                    Node {
                        value: Value::Map(entries),
                        mark: m,
                        plain: false,
                    },
                    anchor,
                )),
                _ => return Err(internal(mark)),
            },
            Event::DocumentStart(_) if root.is_some() => {
                return Err(SyntaxError {
                    mark,
                    message: "expected one YAML document, found several".into(),
                })
            }
            _ => None,
        };
        let Some((node, anchor)) = finished else {
            continue;
        };
        nodes += 1;
        if nodes > MAX_NODES {
            return Err(SyntaxError {
                mark,
                message: format!(
                    "document too large (more than {MAX_NODES} nodes after expanding aliases)"
                ),
            });
        }
        if anchor != 0 {
            anchors.insert(anchor, node.clone());
        }
        match stack.split_last_mut() {
            None => root = Some(node),
            Some((Frame::Seq(items, _, _), _)) => items.push(node),
            Some((Frame::Map(entries, pending, _, _), above)) => match pending.take() {
                None => {
                    let name = match node.value {
                        Value::Scalar(text) => text,
                        Value::Null => String::new(),
                        _ => {
                            return Err(SyntaxError {
                                mark: node.mark,
                                message: "mapping keys must be plain strings".into(),
                            })
                        }
                    };
                    let keep = !entries.iter().any(|(k, _)| k.name == name);
                    let key = Key {
                        name,
                        mark: node.mark,
                    };
                    if !keep {
                        duplicates.push(Duplicate {
                            mark: node.mark,
                            path: path_of(above, &key.name),
                            name: key.name.clone(),
                        });
                    }
                    *pending = Some((key, keep));
                }
                Some((key, true)) => entries.push((key, node)),
                Some((_, false)) => {}
            },
        }
    }
    let root = root.unwrap_or(Node {
        value: Value::Null,
        mark: Mark { line: 1, col: 1 },
        plain: true,
    });
    Ok((root, duplicates))
}

/// `a.b[2].name` from the frames enclosing a mapping and a key of it.
fn path_of(frames: &[Frame], key: &str) -> String {
    let mut path = String::new();
    for frame in frames {
        match frame {
            Frame::Seq(items, _, _) => path.push_str(&format!("[{}]", items.len())),
            Frame::Map(_, pending, _, _) => {
                if let Some((k, _)) = pending {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(&k.name);
                }
            }
        }
    }
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
    path
}

fn count(node: &Node) -> usize {
    match &node.value {
        Value::Seq(items) => 1 + items.iter().map(count).sum::<usize>(),
        Value::Map(entries) => 1 + entries.iter().map(|(_, n)| count(n)).sum::<usize>(),
        _ => 1,
    }
}

fn internal(mark: Mark) -> SyntaxError {
    SyntaxError {
        mark,
        message: "unbalanced YAML structure".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_one_based_and_point_at_values() {
        let node = parse("a:\n  b: 12\n").expect("valid yaml");
        let Value::Map(entries) = &node.value else {
            panic!("expected a map")
        };
        let Value::Map(inner) = &entries[0].1.value else {
            panic!("expected a map")
        };
        assert_eq!(inner[0].0.mark, Mark { line: 2, col: 3 });
        assert_eq!(inner[0].1.mark, Mark { line: 2, col: 6 });
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let err = parse("a: 1\na: 2\n").expect_err("duplicate");
        assert_eq!(err.mark.line, 2);
        assert!(err.message.contains("duplicate key `a`"));
    }

    #[test]
    fn alias_bombs_are_bounded() {
        let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let p = i - 1;
            doc.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let err = parse(&doc).expect_err("too large");
        assert!(err.message.contains("too large"), "{}", err.message);
    }

    #[test]
    fn only_plain_null_words_are_null() {
        let node = parse("a: \"~\"\nb: ~\nc: null\n").expect("valid");
        let Value::Map(e) = node.value else {
            panic!("map")
        };
        assert!(matches!(&e[0].1.value, Value::Scalar(s) if s == "~"));
        assert!(matches!(&e[1].1.value, Value::Null));
        assert!(matches!(&e[2].1.value, Value::Null));
    }
}
