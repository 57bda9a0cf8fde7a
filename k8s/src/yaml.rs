//! YAML files of Kubernetes objects, read with the line and column of every node, so
//! that `check --objects` can point a problem at `FILE:LINE:COL` in the YAML.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use portier_config::{Diagnostic, Pos};
use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// One YAML document: its value as JSON and where each node starts, by JSON pointer.
#[derive(Clone, Debug)]
pub struct Document {
    pub file: String,
    pub value: Value,
    pub positions: HashMap<String, Pos>,
    pub start: Pos,
}

impl Document {
    /// Where `pointer` (or the nearest node above it that exists) starts.
    pub fn pos(&self, pointer: &str) -> Pos {
        let mut p = pointer;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return *pos;
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => return self.start,
            }
        }
    }
}

/// The YAML files named: files as given, directories' `*.yaml`, `*.yml` and `*.json`
/// (not recursively), in name order.
pub fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Diagnostic> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| {
                    Diagnostic::error(
                        &p.display().to_string(),
                        Pos { line: 1, col: 1 },
                        format!("cannot read the directory: {e}"),
                    )
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.extension()
                        .and_then(|x| x.to_str())
                        .is_some_and(|x| matches!(x, "yaml" | "yml" | "json"))
                })
                .collect();
            entries.sort();
            out.extend(entries);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Reads every document of a file.
pub fn read_file(path: &Path) -> Result<Vec<Document>, Diagnostic> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        Diagnostic::error(
            &file,
            Pos { line: 1, col: 1 },
            format!("cannot read the file: {e}"),
        )
    })?;
    read_str(&file, &text)
}

/// Reads every document of `text` (named `file` in diagnostics).
pub fn read_str(file: &str, text: &str) -> Result<Vec<Document>, Diagnostic> {
    let mut b = Builder {
        file: file.to_string(),
        docs: Vec::new(),
        stack: Vec::new(),
        anchors: HashMap::new(),
        positions: HashMap::new(),
        start: Pos::default(),
    };
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut b, true).map_err(|e| {
        let m = e.marker();
        Diagnostic::error(file, pos(m), e.to_string())
    })?;
    Ok(b.docs)
}

fn pos(m: &Marker) -> Pos {
    Pos {
        line: m.line(),
        col: m.col() + 1,
    }
}

enum Frame {
    Seq {
        items: Vec<Value>,
        pointer: String,
        anchor: usize,
    },
    Map {
        map: Map<String, Value>,
        pointer: String,
        anchor: usize,
        key: Option<String>,
    },
}

struct Builder {
    file: String,
    docs: Vec<Document>,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Value>,
    positions: HashMap<String, Pos>,
    start: Pos,
}

fn escape(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

impl Builder {
    /// The pointer of the node starting now, or `None` when it is a mapping's key.
    fn next_pointer(&self) -> Option<String> {
        match self.stack.last() {
            None => Some(String::new()),
            Some(Frame::Seq { items, pointer, .. }) => Some(format!("{pointer}/{}", items.len())),
            Some(Frame::Map { key: None, .. }) => None,
            Some(Frame::Map {
                key: Some(k),
                pointer,
                ..
            }) => Some(format!("{pointer}/{}", escape(k))),
        }
    }

    fn finish(&mut self, v: Value, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, v.clone());
        }
        match self.stack.last_mut() {
            None => self.docs.push(Document {
                file: self.file.clone(),
                value: v,
                positions: std::mem::take(&mut self.positions),
                start: self.start,
            }),
            Some(Frame::Seq { items, .. }) => items.push(v),
            Some(Frame::Map { map, key, .. }) => {
                if let Some(k) = key.take() {
                    map.insert(k, v);
                }
            }
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::DocumentStart => self.start = pos(&mark),
            Event::Scalar(s, style, anchor, tag) => match self.next_pointer() {
                None => {
                    if let Some(Frame::Map {
                        key, pointer, map, ..
                    }) = self.stack.last_mut()
                    {
                        // A block mapping's start is reported at its first `:`; it
                        // starts at its first key.
                        if map.is_empty() {
                            self.positions.insert(pointer.clone(), pos(&mark));
                        }
                        let p = format!("{pointer}/{}", escape(&s));
                        self.positions.entry(p).or_insert(pos(&mark));
                        *key = Some(s);
                    }
                }
                Some(p) => {
                    self.positions.entry(p).or_insert(pos(&mark));
                    let v = scalar(s, style, tag.as_ref());
                    self.finish(v, anchor);
                }
            },
            Event::Alias(id) => {
                let v = self.anchors.get(&id).cloned().unwrap_or(Value::Null);
                if let Some(Frame::Map {
                    key: key @ None, ..
                }) = self.stack.last_mut()
                {
                    *key = Some(v.as_str().unwrap_or_default().to_string());
                } else {
                    self.finish(v, 0);
                }
            }
            Event::SequenceStart(anchor, _) => {
                let pointer = self.next_pointer().unwrap_or_default();
                self.positions.entry(pointer.clone()).or_insert(pos(&mark));
                self.stack.push(Frame::Seq {
                    items: Vec::new(),
                    pointer,
                    anchor,
                });
            }
            Event::MappingStart(anchor, _) => {
                let pointer = self.next_pointer().unwrap_or_default();
                self.positions.entry(pointer.clone()).or_insert(pos(&mark));
                self.stack.push(Frame::Map {
                    map: Map::new(),
                    pointer,
                    anchor,
                    key: None,
                });
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq { items, anchor, .. }) = self.stack.pop() {
                    self.finish(Value::Array(items), anchor);
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map { map, anchor, .. }) = self.stack.pop() {
                    self.finish(Value::Object(map), anchor);
                }
            }
            _ => {}
        }
    }
}

/// A scalar's value: quoted and block scalars are strings; plain ones are resolved as
/// YAML 1.2's core schema says (null, booleans, integers, floats, else a string).
fn scalar(s: String, style: TScalarStyle, tag: Option<&Tag>) -> Value {
    if style != TScalarStyle::Plain || tag.is_some_and(|t| t.suffix == "str") {
        return Value::String(s);
    }
    match s.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = s.parse::<i64>() {
        return Value::Number(i.into());
    }
    if s.bytes().any(|b| b.is_ascii_digit()) {
        if let Some(n) = s.parse::<f64>().ok().and_then(Number::from_f64) {
            return Value::Number(n);
        }
    }
    Value::String(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_nodes_and_keys() {
        let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: odoo\n  annotations:\n    portier.dev/workers: \"4\"\nspec:\n  ports:\n  - port: 8069\n    name: http\n---\nkind: x\n";
        let docs = read_str("f.yaml", text).unwrap();
        assert_eq!(docs.len(), 2);
        let d = &docs[0];
        assert_eq!(d.value["spec"]["ports"][0]["port"], 8069);
        assert_eq!(
            d.value["metadata"]["annotations"]["portier.dev/workers"],
            "4"
        );
        assert_eq!(d.pos("/metadata/name"), Pos { line: 4, col: 3 });
        assert_eq!(
            d.pos("/metadata/annotations/portier.dev~1workers"),
            Pos { line: 6, col: 5 }
        );
        assert_eq!(d.pos("/spec/ports/0/name"), Pos { line: 10, col: 5 });
        // A pointer below a missing node: the nearest one above it.
        assert_eq!(d.pos("/spec/ports/0/name/x/y"), Pos { line: 10, col: 5 });
        assert_eq!(docs[1].pos("/kind"), Pos { line: 12, col: 1 });
    }

    #[test]
    fn plain_scalars_resolve_quoted_stay_strings() {
        let docs = read_str("f", "a: 1\nb: '1'\nc: true\nd: ~\ne: 1.5\nf: v1\n").unwrap();
        let v = &docs[0].value;
        assert_eq!(v["a"], 1);
        assert_eq!(v["b"], "1");
        assert_eq!(v["c"], true);
        assert!(v["d"].is_null());
        assert_eq!(v["e"], 1.5);
        assert_eq!(v["f"], "v1");
    }

    #[test]
    fn a_syntax_error_has_its_position() {
        let e = read_str("f.yaml", "a: [1, 2\nb: c\n").unwrap_err();
        assert_eq!(e.file, "f.yaml");
        assert!(e.pos.line >= 1, "{e}");
    }
}
