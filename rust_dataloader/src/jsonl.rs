//! Streaming jsonl records (contracts.md §1). One line at a time, never a whole file in memory.
//!
//! A line is read as bytes, checked for UTF-8, parsed by serde into a typed record and
//! normalised: pretrain text loses one leading `<s>` and one trailing `</s>`; a conversation
//! must be non-empty, use known roles and contain an assistant turn. Blank lines are passed
//! over (they are not records). Every rejection carries a [`BadReason`].

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::de::value::MapAccessDeserializer;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::error::{BadReason, DataError, Result};

/// What records a file is expected to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `{"text": ...}` pretraining documents.
    Text,
    /// `{"conversations": [...]}` chat data.
    Chat,
    /// Either, decided per line (tokenizer training reads both).
    Auto,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Kind> {
        match s {
            "text" => Ok(Kind::Text),
            "chat" => Ok(Kind::Chat),
            "auto" => Ok(Kind::Auto),
            _ => Err(DataError::Config(format!(
                "unknown data kind {s:?} (expected \"text\" or \"chat\")"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Text(String),
    Chat(Vec<Message>),
}

/// `T` read from a JSON object only. serde's derived structs also accept a JSON array
/// (fields by position); a record or message written as an array is a schema error here.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Object)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct RawMessage {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct TextLine {
    text: String,
}

#[derive(Deserialize)]
struct ChatLine {
    conversations: Vec<Object<RawMessage>>,
}

#[derive(Deserialize)]
struct AnyLine {
    text: Option<String>,
    conversations: Option<Vec<Object<RawMessage>>>,
}

/// Strip one leading `<s>` and one trailing `</s>` (MiniMind's pretrain files carry them).
pub fn strip_document_markers(text: &str) -> &str {
    let t = text.strip_prefix("<s>").unwrap_or(text);
    t.strip_suffix("</s>").unwrap_or(t)
}

/// Syntax errors are invalid JSON; a type error is a schema error only if the line is valid
/// JSON as a whole (serde stops at the first wrong type, e.g. `[1, 2` fails as "a sequence").
fn json_error(line: &str, e: serde_json::Error) -> BadReason {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => match serde_json::from_str::<serde::de::IgnoredAny>(line) {
            Ok(_) => BadReason::BadSchema(e.to_string()),
            Err(syntax) => BadReason::InvalidJson(syntax.to_string()),
        },
        _ => BadReason::InvalidJson(e.to_string()),
    }
}

/// Turn parsed messages into a checked conversation. Training data must hold an assistant
/// turn; a prompt (`require_assistant = false`) need not.
pub fn check_conversation(
    raw: Vec<(String, String)>,
    require_assistant: bool,
) -> std::result::Result<Vec<Message>, BadReason> {
    if raw.is_empty() {
        return Err(BadReason::EmptyConversation);
    }
    let mut out = Vec::with_capacity(raw.len());
    for (role, content) in raw {
        let role = match role.as_str() {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            _ => return Err(BadReason::UnknownRole(role)),
        };
        out.push(Message { role, content });
    }
    if require_assistant && !out.iter().any(|m| m.role == Role::Assistant) {
        return Err(BadReason::NoAssistant);
    }
    Ok(out)
}

fn chat_record(raw: Vec<Object<RawMessage>>) -> std::result::Result<Record, BadReason> {
    check_conversation(
        raw.into_iter()
            .map(|Object(m)| (m.role, m.content))
            .collect(),
        true,
    )
    .map(Record::Chat)
}

/// Parse one line (without its newline). `Ok(None)` for a blank line. Text is returned as
/// written; the encoder strips the document markers (so they are stripped exactly once).
pub fn parse_line(bytes: &[u8], kind: Kind) -> std::result::Result<Option<Record>, BadReason> {
    let line = std::str::from_utf8(bytes).map_err(|_| BadReason::InvalidUtf8)?;
    if line.trim().is_empty() {
        return Ok(None);
    }
    let record = match kind {
        Kind::Text => {
            let Object(t): Object<TextLine> =
                serde_json::from_str(line).map_err(|e| json_error(line, e))?;
            Record::Text(t.text)
        }
        Kind::Chat => {
            let Object(c): Object<ChatLine> =
                serde_json::from_str(line).map_err(|e| json_error(line, e))?;
            chat_record(c.conversations)?
        }
        Kind::Auto => {
            let Object(a): Object<AnyLine> =
                serde_json::from_str(line).map_err(|e| json_error(line, e))?;
            match (a.text, a.conversations) {
                (Some(t), _) => Record::Text(t),
                (None, Some(c)) => chat_record(c)?,
                (None, None) => {
                    return Err(BadReason::BadSchema(
                        "missing field `text` or `conversations`".into(),
                    ))
                }
            }
        }
    };
    Ok(Some(record))
}

/// A line's outcome, with its 1-based line number.
pub type LineResult = (u64, std::result::Result<Record, BadReason>);

/// Streams the records of one file. I/O errors end the stream with `Err`; bad lines are
/// yielded as `Ok((line, Err(reason)))` so the caller applies its policy. An empty file
/// (no record and no bad line) yields one `(0, Err(EmptyFile))`.
pub struct JsonlReader {
    path: PathBuf,
    reader: BufReader<File>,
    kind: Kind,
    line_no: u64,
    buf: Vec<u8>,
    seen_any: bool,
    done: bool,
}

impl JsonlReader {
    pub fn open(path: &Path, kind: Kind) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        Ok(JsonlReader {
            path: path.to_owned(),
            reader: BufReader::with_capacity(1 << 20, file),
            kind,
            line_no: 0,
            buf: Vec::with_capacity(4096),
            seen_any: false,
            done: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read the next raw line (without `\n` / `\r\n`); `None` at end of file.
    fn next_raw(&mut self) -> Result<Option<u64>> {
        self.buf.clear();
        let n = self
            .reader
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| DataError::io(&self.path, e))?;
        if n == 0 {
            return Ok(None);
        }
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
        }
        self.line_no += 1;
        Ok(Some(self.line_no))
    }
}

impl Iterator for JsonlReader {
    type Item = Result<LineResult>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            match self.next_raw() {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok(None) => {
                    self.done = true;
                    if !self.seen_any {
                        return Some(Ok((0, Err(BadReason::EmptyFile))));
                    }
                    return None;
                }
                Ok(Some(line)) => match parse_line(&self.buf, self.kind) {
                    Ok(None) => continue,
                    Ok(Some(rec)) => {
                        self.seen_any = true;
                        return Some(Ok((line, Ok(rec))));
                    }
                    Err(reason) => {
                        self.seen_any = true;
                        return Some(Ok((line, Err(reason))));
                    }
                },
            }
        }
    }
}

/// Raw lines with their numbers, for callers that parse in parallel (the cache builder).
pub struct RawLines {
    inner: JsonlReader,
}

impl RawLines {
    pub fn open(path: &Path) -> Result<Self> {
        Ok(RawLines {
            inner: JsonlReader::open(path, Kind::Auto)?,
        })
    }

    /// Fill `out` with up to `max` (line number, bytes) pairs; returns false at end of file.
    pub fn fill(&mut self, out: &mut Vec<(u64, Vec<u8>)>, max: usize) -> Result<bool> {
        while out.len() < max {
            match self.inner.next_raw()? {
                None => return Ok(false),
                Some(line) => out.push((line, self.inner.buf.clone())),
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_one_marker_pair_only() {
        assert_eq!(strip_document_markers("<s>abc</s>"), "abc");
        assert_eq!(strip_document_markers("<s><s>abc</s></s>"), "<s>abc</s>");
        assert_eq!(strip_document_markers("abc"), "abc");
        assert_eq!(strip_document_markers("<s>abc"), "abc");
    }

    #[test]
    fn classifies_bad_lines() {
        let p = |s: &str, k| parse_line(s.as_bytes(), k);
        assert_eq!(p("  ", Kind::Text), Ok(None));
        assert_eq!(
            p("{\"text\": 3}", Kind::Text).unwrap_err().code(),
            "bad_schema"
        );
        assert_eq!(
            p("{\"txt\": \"a\"}", Kind::Text).unwrap_err().code(),
            "bad_schema"
        );
        assert_eq!(
            p("{\"text\": \"a\"", Kind::Text).unwrap_err().code(),
            "invalid_json"
        );
        assert_eq!(
            p("{\"text\": \"\\ud800\"}", Kind::Text).unwrap_err().code(),
            "invalid_json"
        );
        assert_eq!(
            parse_line(b"{\"text\": \"\xff\"}", Kind::Text)
                .unwrap_err()
                .code(),
            "invalid_utf8"
        );
        assert_eq!(
            p("{\"conversations\": []}", Kind::Chat).unwrap_err().code(),
            "empty_conversation"
        );
        assert_eq!(
            p(
                "{\"conversations\": [{\"role\": \"bot\", \"content\": \"x\"}]}",
                Kind::Chat
            )
            .unwrap_err()
            .code(),
            "unknown_role"
        );
        assert_eq!(
            p(
                "{\"conversations\": [{\"role\": \"user\", \"content\": \"x\"}]}",
                Kind::Chat
            )
            .unwrap_err()
            .code(),
            "no_assistant"
        );
    }

    #[test]
    fn arrays_are_schema_errors_not_records() {
        let p = |s: &str, k| parse_line(s.as_bytes(), k).unwrap_err().code();
        assert_eq!(p("[\"a one-element list\"]", Kind::Text), "bad_schema");
        assert_eq!(p("[\"text\", \"a list\"]", Kind::Text), "bad_schema");
        assert_eq!(p("[\"text\", \"a list\"]", Kind::Auto), "bad_schema");
        assert_eq!(
            p(
                "{\"conversations\": [[\"user\", \"hi\"], {\"role\": \"assistant\", \"content\": \"a\"}]}",
                Kind::Chat
            ),
            "bad_schema"
        );
        assert_eq!(p("[1, 2", Kind::Text), "invalid_json");
    }

    #[test]
    fn ignores_unknown_keys_and_reads_auto() {
        let r = parse_line(b"{\"id\": 7, \"text\": \"<s>hi</s>\"}", Kind::Auto).unwrap();
        assert_eq!(r, Some(Record::Text("<s>hi</s>".into())));
        let r = parse_line(
            b"{\"conversations\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\", \"x\": 1}]}",
            Kind::Auto,
        )
        .unwrap();
        assert!(matches!(r, Some(Record::Chat(m)) if m.len() == 2));
    }
}
