//! A small YAML tree that remembers where every key and value came from.
//!
//! Every pipeline error must say `file:line:col`, so the parser has to keep positions.
//! serde_yaml is deprecated and drops them once a value is deserialised; `marked-yaml`
//! keeps them but refuses anchors and aliases, which real Harness pipelines use. We use
//! `saphyr` (the maintained successor of yaml-rust): its `MarkedYaml` nodes carry spans,
//! it resolves aliases (with a node budget against "billion laughs" inputs), it refuses
//! duplicate keys, and with `early_parse(false)` it hands us each scalar as written
//! together with its quoting style, so that `1.50` stays `1.50` and `"5"` stays a string.
//! The tree below copies that into plain owned data, applies merge keys (`<<`, which
//! saphyr leaves to the application) and turns positions into 1-based line and column.

use saphyr::{MarkedYaml, ScalarStyle, YamlData, YamlLoader};
use saphyr_parser::Parser;

/// 1-based line and column (in characters) of a node in the source text, and which
/// source it is: 0 is the pipeline file, others are template files inlined into it
/// (see `template`), so that an error inside a template names the template's file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
    pub src: u32,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Clone, Debug)]
pub enum Value {
    Null,
    /// A scalar as written. `plain` is false for quoted and block scalars, which are
    /// always strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Entries in source order; keys are scalars (other keys are refused at load).
    Map(Vec<(Node, Node)>),
}

/// A YAML syntax error with its position.
#[derive(Debug)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

const ALIAS_NODE_LIMIT: usize = 100_000;

/// Parse the first document of `text`. An empty file is `Null`.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut parser = Parser::new_from_str(text);
    let mut loader: YamlLoader<'_, MarkedYaml<'_>> = YamlLoader::default();
    loader.early_parse(false);
    loader.alias_limit(ALIAS_NODE_LIMIT);
    // Every document is read, so that a second one is refused rather than ignored.
    let scan = parser.load(&mut loader, true);
    let failure = match scan {
        Err(e) => Some(e),
        Ok(()) => loader.error().cloned(),
    };
    if let Some(e) = failure {
        let pos = pos_of(e.marker());
        let message = match e.info() {
            "duplicated key in mapping" => match key_at(text, pos) {
                Some(key) => format!("duplicate key `{key}` in a mapping"),
                None => "duplicate key in a mapping".to_string(),
            },
            other => other.to_string(),
        };
        return Err(SyntaxError { pos, message });
    }
    let docs = loader.into_documents();
    // A `---` followed by nothing is an empty document; one with content would be lost.
    let empty = |d: &MarkedYaml<'_>| d.span.start.index() == d.span.end.index();
    if let Some(second) = docs.iter().skip(1).find(|d| !empty(d)) {
        return Err(SyntaxError {
            pos: pos_of(&second.span.start),
            message: "a second YAML document (after `---`): a pipeline file holds one document; put each pipeline in its own file".into(),
        });
    }
    match docs.into_iter().next() {
        None => Ok(Node {
            pos: Pos {
                line: 1,
                col: 1,
                src: 0,
            },
            value: Value::Null,
        }),
        Some(doc) => convert(&doc),
    }
}

/// The plain key written at `pos` (saphyr's duplicate-key error does not name it).
fn key_at(text: &str, pos: Pos) -> Option<String> {
    let line = text.lines().nth(pos.line.checked_sub(1)?)?;
    let rest: String = line.chars().skip(pos.col - 1).collect();
    let key = rest.split(':').next()?.trim().trim_matches(['"', '\'']);
    (!key.is_empty()).then(|| key.to_string())
}

fn pos_of(m: &saphyr::Marker) -> Pos {
    Pos {
        line: m.line(),
        col: m.col() + 1,
        src: 0,
    }
}

fn is_null(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

fn convert(node: &MarkedYaml<'_>) -> Result<Node, SyntaxError> {
    let pos = pos_of(&node.span.start);
    let value = match &node.data {
        YamlData::Representation(text, style, _tag) => {
            let plain = *style == ScalarStyle::Plain;
            if plain && is_null(text) {
                Value::Null
            } else {
                Value::Scalar {
                    text: text.to_string(),
                    plain,
                }
            }
        }
        YamlData::Value(s) => Value::Scalar {
            text: format!("{s:?}"),
            plain: true,
        },
        YamlData::Sequence(items) => {
            Value::Seq(items.iter().map(convert).collect::<Result<_, _>>()?)
        }
        YamlData::Mapping(map) => {
            let mut own: Vec<(Node, Node)> = Vec::new();
            let mut merged: Vec<(Node, Node)> = Vec::new();
            for (k, v) in map.iter() {
                let key = convert(k)?;
                let value = convert(v)?;
                match &key.value {
                    Value::Scalar { text, plain: true } if text == "<<" => {
                        merge_into(&mut merged, value)?;
                    }
                    Value::Scalar { .. } => own.push((key, value)),
                    _ => {
                        return Err(SyntaxError {
                            pos: key.pos,
                            message: "mapping keys must be plain strings".into(),
                        })
                    }
                }
            }
            for (k, v) in merged {
                if !own.iter().any(|(o, _)| o.as_str() == k.as_str()) {
                    own.push((k, v));
                }
            }
            Value::Map(own)
        }
        YamlData::Tagged(_tag, inner) => return convert(inner),
        YamlData::Alias(_) | YamlData::BadValue => Value::Null,
    };
    Ok(Node { pos, value })
}

/// `<<: *base` or `<<: [*a, *b]`: earlier sources win over later ones, and the
/// mapping's own keys win over all of them (YAML 1.1 merge key semantics).
fn merge_into(merged: &mut Vec<(Node, Node)>, source: Node) -> Result<(), SyntaxError> {
    let maps = match source.value {
        Value::Map(entries) => vec![entries],
        Value::Seq(items) => {
            let mut maps = Vec::new();
            for item in items {
                match item.value {
                    Value::Map(entries) => maps.push(entries),
                    _ => {
                        return Err(SyntaxError {
                            pos: item.pos,
                            message: "a merge key (`<<`) takes mappings only".into(),
                        })
                    }
                }
            }
            maps
        }
        _ => {
            return Err(SyntaxError {
                pos: source.pos,
                message: "a merge key (`<<`) takes a mapping or a list of mappings".into(),
            })
        }
    };
    for entries in maps {
        for (k, v) in entries {
            if !merged.iter().any(|(o, _)| o.as_str() == k.as_str()) {
                merged.push((k, v));
            }
        }
    }
    Ok(())
}

/// Where byte `offset` of a scalar's text is in the source: any offset of a plain
/// scalar written on one line, else the start of an expression (`<+`).
///
/// A scalar's text is not a slice of the source: block scalars (`|`, `>`, with
/// indentation and chomping indicators) drop their indentation and folded ones join
/// lines, quoted ones fold and unescape, plain ones fold. None of that creates or
/// removes a `<+` (folding only touches line breaks and the spaces around them), so the
/// k-th `<+` of the text is the k-th `<+` of the source from where the scalar starts.
/// saphyr places a block scalar's start at its first content line (after any leading
/// empty lines, past the header and its comment), so counting from the node's position
/// never sees a `<+` outside the value. Falls back to the node's position when the
/// source does not hold that many (a double-quoted `\x3c+` escape).
pub fn expression_pos(source: &Source, node: Pos, text: &str, offset: usize) -> Pos {
    let (index, source) = (source, source.text.as_str());
    let Some(before) = text.get(..offset) else {
        return node;
    };
    let k = before.matches("<+").count();
    let Some(start) = index.byte_index(node) else {
        return node;
    };
    // A plain scalar on one line is its own source: any offset maps directly.
    let at = if source[start..].starts_with(before) && !before.contains('\n') {
        start + offset
    } else if !text[offset..].starts_with("<+") {
        return node;
    } else {
        match source[start..].match_indices("<+").nth(k) {
            Some((found, _)) => start + found,
            None => return node,
        }
    };
    // The last line that starts at or before `at`.
    let line = index.line_starts.partition_point(|&s| s <= at);
    let line_start = index.line_starts[line - 1];
    Pos {
        line,
        col: source[line_start..at].chars().count() + 1,
        src: node.src,
    }
}

/// A source text with where each of its lines starts, so that a position is found
/// without scanning the text from its start (once per expression, that made parsing
/// quadratic in the file's size).
#[derive(Debug, Default)]
pub struct Source {
    text: String,
    /// Byte offset of the start of each line; the first is 0.
    line_starts: Vec<usize>,
}

impl Source {
    pub fn new(text: &str) -> Source {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Source {
            text: text.to_string(),
            line_starts,
        }
    }

    /// The byte index of a 1-based line and character column.
    fn byte_index(&self, pos: Pos) -> Option<usize> {
        let line_start = *self.line_starts.get(pos.line.checked_sub(1)?)?;
        let line = &self.text[line_start..];
        let col = line
            .char_indices()
            .nth(pos.col.checked_sub(1)?)
            .map_or(line.len(), |(i, _)| i);
        Some(line_start + col)
    }
}

impl Node {
    /// The text of a scalar (quoted or not), `None` for null, lists and maps.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Null)
    }

    /// What kind of YAML value this is, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match &self.value {
            Value::Null => "null",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// Mark this node and everything below it as coming from source `src`.
    pub fn set_source(&mut self, src: u32) {
        self.pos.src = src;
        match &mut self.value {
            Value::Seq(items) => items.iter_mut().for_each(|i| i.set_source(src)),
            Value::Map(entries) => entries.iter_mut().for_each(|(k, v)| {
                k.set_source(src);
                v.set_source(src);
            }),
            Value::Null | Value::Scalar { .. } => {}
        }
    }

    /// The entries of a mapping node.
    pub fn entries(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// Look a key up in a mapping node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let n = parse("a:\n  b: 1\n  c: \"x\"\n").unwrap();
        let a = n.get("a").unwrap();
        let Value::Map(entries) = &a.value else {
            panic!("not a map")
        };
        assert_eq!((entries[0].0.pos.line, entries[0].0.pos.col), (2, 3));
        assert_eq!((entries[0].1.pos.line, entries[0].1.pos.col), (2, 6));
        assert!(matches!(&entries[1].1.value, Value::Scalar { text, plain: false } if text == "x"));
    }

    #[test]
    fn aliases_and_merge_keys() {
        let n = parse("base: &b\n  x: 1\n  y: 2\nuse:\n  <<: *b\n  y: 3\nagain: *b\n").unwrap();
        let u = n.get("use").unwrap();
        assert_eq!(u.get("x").unwrap().as_str(), Some("1"));
        assert_eq!(u.get("y").unwrap().as_str(), Some("3"));
        assert_eq!(
            n.get("again").unwrap().get("y").unwrap().as_str(),
            Some("2")
        );
    }

    #[test]
    fn duplicate_keys_are_syntax_errors() {
        let e = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(e.pos.line, 3);
        assert!(e.message.contains("duplicate"), "{}", e.message);
    }

    #[test]
    fn a_second_document_is_refused_where_it_starts() {
        let e = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(e.pos.line, 3, "{}", e.message);
        assert!(e.message.contains("second YAML document"), "{}", e.message);
        // A leading `---`, or a trailing one with nothing after it, loses nothing.
        assert_eq!(
            parse("---\na: 1\n").unwrap().get("a").unwrap().as_str(),
            Some("1")
        );
        assert_eq!(
            parse("a: 1\n---\n").unwrap().get("a").unwrap().as_str(),
            Some("1")
        );
    }

    #[test]
    fn plain_scalars_keep_their_spelling() {
        let n = parse("v: 1.50\nn: ~\ne:\n").unwrap();
        assert_eq!(n.get("v").unwrap().as_str(), Some("1.50"));
        assert!(n.get("n").unwrap().is_null());
        assert!(n.get("e").unwrap().is_null());
    }

    /// The source position of the `<+` at `offset` of the scalar at `key` (in `doc`).
    fn locate(doc: &str, key: &str, offset: usize) -> (usize, usize) {
        let n = parse(doc).unwrap();
        let v = n.get(key).unwrap();
        let p = expression_pos(&Source::new(doc), v.pos, v.as_str().unwrap(), offset);
        (p.line, p.col)
    }

    fn offset_of(doc: &str, key: &str, needle: &str) -> usize {
        let n = parse(doc).unwrap();
        n.get(key).unwrap().as_str().unwrap().find(needle).unwrap()
    }

    #[test]
    fn expressions_inside_block_scalars_keep_their_line_and_column() {
        let cases: &[(&str, &str, (usize, usize))] = &[
            // literal, with leading empty lines
            (
                "c: |\n\n    echo a\n      echo <+b.x> <+c.y>\n",
                "<+c.y>",
                (4, 19),
            ),
            // literal with an explicit indentation indicator and strip chomping
            ("c: |2-\n    echo\n   <+b.x>\n", "<+b.x>", (3, 4)),
            // folded: the lines are joined in the text, not in the source
            (
                "c: >\n  one two\n  three <+b.x>\n\n  <+c.y>\n",
                "<+c.y>",
                (5, 3),
            ),
            ("c: >+\n  one\n  two <+b.x>\n", "<+b.x>", (3, 7)),
            // a header comment holding an expression is not the value
            ("c: | # <+not.this>\n  run <+b.x>\n", "<+b.x>", (2, 7)),
            // plain and quoted scalars spread over lines
            ("c: one\n  two <+b.x>\n", "<+b.x>", (2, 7)),
            ("c: \"a \\\" <+b.x>\n   <+c.y>\"\n", "<+c.y>", (2, 4)),
            ("k: 1\nc: '\u{e9}\u{e9} <+b.x>'\n", "<+b.x>", (2, 8)),
        ];
        for (doc, needle, want) in cases {
            let off = offset_of(doc, "c", needle);
            assert_eq!(locate(doc, "c", off), *want, "{doc:?}");
        }
    }

    #[test]
    fn unmatched_expression_falls_back_to_the_node() {
        let doc = "c: \"\\x3c+b.x>\"\n";
        assert_eq!(locate(doc, "c", 0), (1, 4));
    }
}
