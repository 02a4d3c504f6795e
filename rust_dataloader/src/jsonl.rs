//! Streaming jsonl records (contracts.md §1). One line at a time, never a whole file in memory.
//!
//! A line is read as bytes, checked for UTF-8, parsed by serde into a typed record and
//! normalised: pretrain text loses one leading `<s>` and one trailing `</s>`; a conversation
//! must be non-empty, use known roles and contain an assistant turn. Blank lines are passed
//! over (they are not records). Every rejection carries a [`BadReason`].
//!
//! This is the one place that iterates over a file's lines: [`JsonlReader`] (sequential),
//! [`Texts`] (the texts of many files, for tokenizer training) and [`for_each_record`] (parsed
//! in parallel chunks, for the cache builder and `data check`) share the line reader (a UTF-8
//! byte-order mark at the start of the file is skipped) and the empty-file rule
//! ([`empty_file`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;
use serde::de::value::MapAccessDeserializer;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::error::{BadReason, DataError, Result};
use crate::pyjson::{PyJson, StrOrJson};

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
    /// A tool's response (the chatml family renders it inside a user turn).
    Tool,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            _ => None,
        }
    }
}

/// One call an assistant turn makes: the function's name and its arguments as the template
/// writes them (a JSON object: the text given, or `json.dumps` of the object given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// `reasoning_content` (assistant turns); `None` when absent or null.
    pub reasoning: Option<String>,
    /// `tool_calls` (assistant turns), in order.
    pub tool_calls: Vec<ToolCall>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
            reasoning: None,
            tool_calls: Vec::new(),
        }
    }

    /// Whether the message uses a tool field (a tool call or the tool role).
    pub fn uses_tools(&self) -> bool {
        self.role == Role::Tool || !self.tool_calls.is_empty()
    }
}

/// A conversation and the function schemas offered to it (each as `json.dumps` text).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Chat {
    pub messages: Vec<Message>,
    pub tools: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Text(String),
    Chat(Chat),
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
    /// Required, except on an assistant turn with tool calls (where null or absent is "").
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    /// A list of calls, or a string holding one (MiniMind's files).
    #[serde(default)]
    tool_calls: Option<StrOrJson>,
    /// On a system message (MiniMind's files): the function schemas, or a string of them.
    #[serde(default)]
    tools: Option<StrOrJson>,
}

#[derive(Deserialize)]
struct RawFunction {
    name: String,
    arguments: StrOrJson,
}

#[derive(Deserialize)]
struct RawToolCall {
    #[serde(default)]
    function: Option<Object<RawFunction>>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<StrOrJson>,
}

#[derive(Deserialize)]
struct TextLine {
    text: String,
}

#[derive(Deserialize)]
struct ChatLine {
    conversations: Vec<Object<RawMessage>>,
    #[serde(default)]
    tools: Option<StrOrJson>,
}

#[derive(Deserialize)]
struct AnyLine {
    text: Option<String>,
    conversations: Option<Vec<Object<RawMessage>>>,
    #[serde(default)]
    tools: Option<StrOrJson>,
}

/// Strip one leading `<s>` and one trailing `</s>` (MiniMind's pretrain files carry them).
pub fn strip_document_markers(text: &str) -> &str {
    let t = text.strip_prefix("<s>").unwrap_or(text);
    t.strip_suffix("</s>").unwrap_or(t)
}

/// The first `\uXXXX` escape of `line` that is a UTF-16 surrogate but not half of a pair
/// (a high one not followed by a `\u` low one, or a low one on its own): its byte offset and
/// code unit. JSON strings are UTF-16 escaped; such an escape names no character.
pub fn lone_surrogate(line: &str) -> Option<(usize, u16)> {
    let b = line.as_bytes();
    let hex4 = |at: usize| -> Option<u16> {
        let digits = b.get(at..at + 4)?;
        if !digits.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            i += 1;
            continue;
        }
        // `\\` is an escaped backslash: the `u` after it is a plain letter.
        let Some(unit) = (b.get(i + 1) == Some(&b'u')).then(|| hex4(i + 2)).flatten() else {
            i += 2;
            continue;
        };
        match unit {
            0xD800..=0xDBFF => {
                let low = (b.get(i + 6) == Some(&b'\\') && b.get(i + 7) == Some(&b'u'))
                    .then(|| hex4(i + 8))
                    .flatten();
                match low {
                    Some(0xDC00..=0xDFFF) => i += 12,
                    _ => return Some((i, unit)),
                }
            }
            0xDC00..=0xDFFF => return Some((i, unit)),
            _ => i += 6,
        }
    }
    None
}

/// A line holding a lone surrogate escape is invalid JSON, wherever it is (also in a key that
/// is otherwise ignored); the message says so, unless a syntax error comes before it.
fn check_surrogates(line: &str) -> std::result::Result<(), BadReason> {
    if !line.contains("\\u") {
        return Ok(());
    }
    let Some((at, unit)) = lone_surrogate(line) else {
        return Ok(());
    };
    let column = at + 1; // 1-based, in bytes, like serde_json's
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(line) {
        if e.column() < column && !e.is_data() {
            return Err(BadReason::InvalidJson(e.to_string()));
        }
    }
    Err(BadReason::InvalidJson(format!(
        "lone surrogate escape \\u{unit:04x} at line 1 column {column}"
    )))
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

fn schema(field: &str, what: impl std::fmt::Display) -> BadReason {
    BadReason::BadSchema(format!("`{field}`: {what}"))
}

/// A list given as JSON, or as a string holding that JSON (MiniMind writes `"[...]"`):
/// its elements, each as `json.dumps` text. `None`, `[]` and `""` are no list.
fn json_list(field: &str, value: Option<StrOrJson>) -> std::result::Result<Vec<PyJson>, BadReason> {
    let text = match value {
        None => return Ok(Vec::new()),
        Some(StrOrJson::Str(s)) if s.trim().is_empty() => return Ok(Vec::new()),
        Some(StrOrJson::Str(s)) => s,
        Some(StrOrJson::Json(PyJson(j))) => j,
    };
    let items: Vec<PyJson> = serde_json::from_str(&text)
        .map_err(|e| schema(field, format!("expected a list of objects ({e})")))?;
    if let Some(bad) = items.iter().find(|i| !i.is_object()) {
        return Err(schema(
            field,
            format!("expected a list of objects, found {}", bad.0),
        ));
    }
    Ok(items)
}

/// Tool-call arguments: an object, or a string holding one (kept as written, as the
/// template renders a string as it is).
fn arguments(value: StrOrJson) -> std::result::Result<String, BadReason> {
    let field = "tool_calls[].arguments";
    match value {
        StrOrJson::Json(j) if j.is_object() => Ok(j.0),
        StrOrJson::Json(j) => Err(schema(field, format!("expected an object, found {}", j.0))),
        StrOrJson::Str(s) => match serde_json::from_str::<PyJson>(&s) {
            Ok(j) if j.is_object() => Ok(s),
            _ => Err(schema(
                field,
                format!("expected an object or a JSON object string, found {s:?}"),
            )),
        },
    }
}

fn tool_calls(value: Option<StrOrJson>) -> std::result::Result<Vec<ToolCall>, BadReason> {
    let mut out = Vec::new();
    for item in json_list("tool_calls", value)? {
        let Object(raw): Object<RawToolCall> = serde_json::from_str(&item.0)
            .map_err(|e| schema("tool_calls", format!("{e} in {}", item.0)))?;
        let (name, args) = match raw.function {
            Some(Object(f)) => (Some(f.name), Some(f.arguments)),
            None => (raw.name, raw.arguments),
        };
        let name = name.ok_or_else(|| schema("tool_calls", format!("no name in {}", item.0)))?;
        let args =
            args.ok_or_else(|| schema("tool_calls", format!("no arguments in {}", item.0)))?;
        out.push(ToolCall {
            name,
            arguments: arguments(args)?,
        });
    }
    Ok(out)
}

/// A raw message, parsed but not yet checked.
struct Parsed {
    role: String,
    message: Message,
    tools: Vec<PyJson>,
}

fn parse_message(m: RawMessage) -> std::result::Result<Parsed, BadReason> {
    let calls = tool_calls(m.tool_calls)?;
    let content = match m.content {
        Some(c) => c,
        None if m.role == "assistant" && !calls.is_empty() => String::new(),
        None => return Err(BadReason::BadSchema("missing field `content`".into())),
    };
    let tools = json_list("tools", m.tools)?;
    Ok(Parsed {
        message: Message {
            role: Role::System, // set by check_chat
            content,
            reasoning: m.reasoning_content,
            tool_calls: calls,
        },
        role: m.role,
        tools,
    })
}

/// Turn parsed messages into a checked conversation, in the contracts.md §1 order: schema
/// (every message), roles, empty, assistant present. Training data must hold an assistant
/// turn; a prompt (`require_assistant = false`) need not. The tools are the record's
/// top-level `tools`, or those on a system message (MiniMind's files); both is an error.
fn check_chat(
    raw: Vec<RawMessage>,
    top_tools: Option<StrOrJson>,
    require_assistant: bool,
) -> std::result::Result<Chat, BadReason> {
    let mut tools: Vec<String> = json_list("tools", top_tools)?
        .into_iter()
        .map(|t| t.0)
        .collect();
    let parsed = raw
        .into_iter()
        .map(parse_message)
        .collect::<std::result::Result<Vec<_>, _>>()?;
    for p in &parsed {
        if p.role == "system" && !p.tools.is_empty() {
            if !tools.is_empty() {
                return Err(schema(
                    "tools",
                    "given twice (on the record and a system message)",
                ));
            }
            tools = p.tools.iter().map(|t| t.0.clone()).collect();
        }
    }
    if parsed.is_empty() {
        return Err(BadReason::EmptyConversation);
    }
    let mut messages = Vec::with_capacity(parsed.len());
    for p in parsed {
        let role = Role::parse(&p.role).ok_or(BadReason::UnknownRole(p.role))?;
        messages.push(Message { role, ..p.message });
    }
    if require_assistant && !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err(BadReason::NoAssistant);
    }
    Ok(Chat { messages, tools })
}

fn chat_record(
    raw: Vec<Object<RawMessage>>,
    tools: Option<StrOrJson>,
) -> std::result::Result<Record, BadReason> {
    check_chat(raw.into_iter().map(|Object(m)| m).collect(), tools, true).map(Record::Chat)
}

/// A conversation given as JSON text (a list of messages) plus optional tools JSON: how the
/// Python binding hands over its messages, so they pass the very checks a file's lines do.
pub fn parse_chat_json(
    messages: &str,
    tools: Option<&str>,
    require_assistant: bool,
) -> std::result::Result<Chat, BadReason> {
    check_surrogates(messages)?;
    let raw: Vec<Object<RawMessage>> =
        serde_json::from_str(messages).map_err(|e| json_error(messages, e))?;
    let tools = match tools {
        None => None,
        Some(t) => {
            check_surrogates(t)?;
            Some(serde_json::from_str::<StrOrJson>(t).map_err(|e| json_error(t, e))?)
        }
    };
    check_chat(
        raw.into_iter().map(|Object(m)| m).collect(),
        tools,
        require_assistant,
    )
}

/// Parse one line (without its newline). `Ok(None)` for a blank line. Text is returned as
/// written; the encoder strips the document markers (so they are stripped exactly once).
pub fn parse_line(bytes: &[u8], kind: Kind) -> std::result::Result<Option<Record>, BadReason> {
    let line = std::str::from_utf8(bytes).map_err(|_| BadReason::InvalidUtf8)?;
    if line.trim().is_empty() {
        return Ok(None);
    }
    check_surrogates(line)?;
    let record = match kind {
        Kind::Text => {
            let Object(t): Object<TextLine> =
                serde_json::from_str(line).map_err(|e| json_error(line, e))?;
            Record::Text(t.text)
        }
        Kind::Chat => {
            let Object(c): Object<ChatLine> =
                serde_json::from_str(line).map_err(|e| json_error(line, e))?;
            chat_record(c.conversations, c.tools)?
        }
        Kind::Auto => {
            let Object(a): Object<AnyLine> =
                serde_json::from_str(line).map_err(|e| json_error(line, e))?;
            match (a.text, a.conversations) {
                (Some(t), _) => Record::Text(t),
                (None, Some(c)) => chat_record(c, a.tools)?,
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

/// The UTF-8 byte-order mark, skipped at the start of a file (contracts.md §1).
pub const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The empty-file rule (contracts.md §1): a file without a single non-blank line (no record,
/// no bad line) is itself bad, as "line" 0 (the file as a whole). `seen_any` = a non-blank
/// line was read. Every reader of jsonl files applies it through this function.
pub fn empty_file(seen_any: bool) -> Option<(u64, BadReason)> {
    (!seen_any).then_some((0, BadReason::EmptyFile))
}

/// Raw lines of one file (without `\n` / `\r\n`, the byte-order mark of line 1 removed).
struct Lines {
    path: PathBuf,
    reader: BufReader<File>,
    line_no: u64,
    buf: Vec<u8>,
}

impl Lines {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        Ok(Lines {
            path: path.to_owned(),
            reader: BufReader::with_capacity(1 << 20, file),
            line_no: 0,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Read the next line into `buf`; its 1-based number, or `None` at end of file.
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
        if self.line_no == 0 && self.buf.starts_with(BOM) {
            self.buf.drain(..BOM.len());
        }
        self.line_no += 1;
        Ok(Some(self.line_no))
    }
}

/// Streams the records of one file. I/O errors end the stream with `Err`; bad lines are
/// yielded as `Ok((line, Err(reason)))` so the caller applies its policy. An empty file
/// yields one `(0, Err(EmptyFile))` ([`empty_file`]).
pub struct JsonlReader {
    lines: Lines,
    kind: Kind,
    seen_any: bool,
    done: bool,
}

impl JsonlReader {
    pub fn open(path: &Path, kind: Kind) -> Result<Self> {
        Ok(JsonlReader {
            lines: Lines::open(path)?,
            kind,
            seen_any: false,
            done: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.lines.path
    }
}

impl Iterator for JsonlReader {
    type Item = Result<LineResult>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            match self.lines.next_raw() {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok(None) => {
                    self.done = true;
                    return empty_file(self.seen_any).map(|(line, r)| Ok((line, Err(r))));
                }
                Ok(Some(line)) => match parse_line(&self.lines.buf, self.kind) {
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

/// The texts of jsonl files, file after file: a pretraining record's text (its document
/// markers stripped) or every message content of a conversation. What tokenizer training
/// reads (`TextStream`, the bounded trainer). Bad lines are an error (`skip_bad = false`) or
/// skipped and counted by reason code.
pub struct Texts {
    files: std::collections::VecDeque<PathBuf>,
    current: Option<JsonlReader>,
    skip_bad: bool,
    /// Records read so far.
    pub records: u64,
    /// UTF-8 bytes of the texts returned so far.
    pub bytes: u64,
    /// Skipped lines (and empty files) by reason code.
    pub skipped: BTreeMap<&'static str, u64>,
}

impl Texts {
    pub fn new(paths: Vec<PathBuf>, skip_bad: bool) -> Self {
        Texts {
            files: paths.into(),
            current: None,
            skip_bad,
            records: 0,
            bytes: 0,
            skipped: BTreeMap::new(),
        }
    }

    /// The texts of the next record; `None` after the last file.
    pub fn next_record(&mut self) -> Result<Option<Vec<String>>> {
        loop {
            let reader = match &mut self.current {
                Some(r) => r,
                None => match self.files.pop_front() {
                    None => return Ok(None),
                    Some(path) => self.current.insert(JsonlReader::open(&path, Kind::Auto)?),
                },
            };
            match reader.next() {
                None => self.current = None,
                Some(Err(e)) => return Err(e),
                Some(Ok((line, Err(reason)))) => {
                    if !self.skip_bad {
                        return Err(DataError::BadLine {
                            path: reader.path().to_owned(),
                            line,
                            reason,
                        });
                    }
                    *self.skipped.entry(reason.code()).or_default() += 1;
                }
                Some(Ok((_, Ok(record)))) => {
                    self.records += 1;
                    let texts = match record {
                        Record::Text(t) => vec![strip_document_markers(&t).to_owned()],
                        Record::Chat(chat) => chat_texts(chat),
                    };
                    self.bytes += texts.iter().map(|t| t.len() as u64).sum::<u64>();
                    return Ok(Some(texts));
                }
            }
        }
    }
}

/// The texts of a conversation for tokenizer training: each message's content, reasoning and
/// tool-call arguments, then the tool schemas.
fn chat_texts(chat: Chat) -> Vec<String> {
    let mut out = Vec::new();
    for m in chat.messages {
        out.push(m.content);
        out.extend(m.reasoning);
        out.extend(m.tool_calls.into_iter().map(|c| c.arguments));
    }
    out.extend(chat.tools);
    out
}

/// Where parallel parsing runs: a thread pool, and a flag that asks it to stop.
#[derive(Clone, Copy)]
pub struct Workers<'a> {
    pub pool: &'a rayon::ThreadPool,
    /// Checked between chunks of lines; once set, the work ends with `Interrupted`.
    pub cancel: &'a AtomicBool,
}

/// Lines read, parsed and mapped per chunk (the unit of parallel work and of cancelling).
pub const LINES_PER_CHUNK: usize = 4096;

/// Parse every record of `path` in order, in parallel chunks of lines, map it with `map` (on
/// the pool too: the cache builder encodes there) and call `f(line, mapped or why not)` for
/// each non-blank line, in file order, then `f(0, Err(EmptyFile))` for an empty file. `f` may
/// stop the scan by returning an error; `workers.cancel` stops it between chunks with
/// `Interrupted`. The same lines and outcomes as [`JsonlReader`].
pub fn for_each_record<T: Send>(
    path: &Path,
    kind: Kind,
    workers: Workers<'_>,
    map: impl Fn(Record) -> std::result::Result<T, BadReason> + Sync,
    mut f: impl FnMut(u64, std::result::Result<T, BadReason>) -> Result<()>,
) -> Result<()> {
    let mut lines = Lines::open(path)?;
    let mut chunk: Vec<(u64, Vec<u8>)> = Vec::with_capacity(LINES_PER_CHUNK);
    let mut seen_any = false;
    loop {
        if workers.cancel.load(Ordering::Relaxed) {
            return Err(DataError::Interrupted);
        }
        chunk.clear();
        let mut more = true;
        while chunk.len() < LINES_PER_CHUNK {
            match lines.next_raw()? {
                None => {
                    more = false;
                    break;
                }
                Some(line) => chunk.push((line, lines.buf.clone())),
            }
        }
        let parsed: Vec<(u64, Option<std::result::Result<T, BadReason>>)> =
            workers.pool.install(|| {
                chunk
                    .par_iter()
                    .map(|(line, raw)| {
                        let item = match parse_line(raw, kind) {
                            Ok(None) => None,
                            Ok(Some(rec)) => Some(map(rec)),
                            Err(reason) => Some(Err(reason)),
                        };
                        (*line, item)
                    })
                    .collect()
            });
        for (line, item) in parsed {
            if let Some(item) = item {
                seen_any = true;
                f(line, item)?;
            }
        }
        if !more {
            break;
        }
    }
    match empty_file(seen_any) {
        Some((line, reason)) => f(line, Err(reason)),
        None => Ok(()),
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
        assert!(matches!(r, Some(Record::Chat(c)) if c.messages.len() == 2));
    }

    fn lines_of(path: &Path, kind: Kind) -> Vec<(u64, std::result::Result<Record, BadReason>)> {
        JsonlReader::open(path, kind)
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    }

    /// The same outcomes through the parallel reader.
    fn parallel_lines_of(
        path: &Path,
        kind: Kind,
    ) -> Vec<(u64, std::result::Result<Record, BadReason>)> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let cancel = AtomicBool::new(false);
        let workers = Workers {
            pool: &pool,
            cancel: &cancel,
        };
        let mut out = Vec::new();
        for_each_record(path, kind, workers, Ok, |line, r| {
            out.push((line, r));
            Ok(())
        })
        .unwrap();
        out
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn a_byte_order_mark_at_the_start_of_a_file_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "bom.jsonl",
            b"\xEF\xBB\xBF{\"text\": \"a\"}\r\n{\"text\": \"b\"}\n\xEF\xBB\xBF{\"text\": \"c\"}\n",
        );
        for got in [lines_of(&p, Kind::Text), parallel_lines_of(&p, Kind::Text)] {
            assert_eq!(got.len(), 3);
            assert_eq!(got[0], (1, Ok(Record::Text("a".into()))));
            assert_eq!(got[1], (2, Ok(Record::Text("b".into()))));
            // Only the file's first bytes: a mark inside the file is bad JSON.
            assert_eq!(got[2].0, 3);
            assert_eq!(got[2].1.as_ref().unwrap_err().code(), "invalid_json");
        }
        // A file holding only the mark (and blank lines) is empty.
        let p = write(dir.path(), "only.jsonl", b"\xEF\xBB\xBF\n\n");
        for got in [lines_of(&p, Kind::Chat), parallel_lines_of(&p, Kind::Chat)] {
            assert_eq!(got, vec![(0, Err(BadReason::EmptyFile))]);
        }
    }

    #[test]
    fn both_readers_give_the_same_outcomes_and_the_empty_file_rule() {
        let dir = tempfile::tempdir().unwrap();
        let mut body = Vec::new();
        for i in 0..9000 {
            match i % 5 {
                0 => body.extend_from_slice(b"   \n"),
                1 => body.extend_from_slice(b"{oops\n"),
                _ => body.extend_from_slice(format!("{{\"text\": \"{i}\"}}\n").as_bytes()),
            }
        }
        let p = write(dir.path(), "mixed.jsonl", &body);
        let seq = lines_of(&p, Kind::Text);
        assert_eq!(seq.len(), 9000 / 5 * 4);
        assert_eq!(parallel_lines_of(&p, Kind::Text), seq);
        for bytes in [&b""[..], b"\n", b"  \n\r\n\t\n"] {
            let p = write(dir.path(), "empty.jsonl", bytes);
            assert_eq!(
                lines_of(&p, Kind::Text),
                vec![(0, Err(BadReason::EmptyFile))]
            );
            assert_eq!(
                parallel_lines_of(&p, Kind::Text),
                vec![(0, Err(BadReason::EmptyFile))]
            );
        }
        assert_eq!(empty_file(true), None);
    }

    fn message(line: &str) -> String {
        parse_line(line.as_bytes(), Kind::Auto)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn lone_surrogates_are_named_as_such() {
        assert_eq!(
            message(r#"{"text": "\ud800"}"#),
            r"invalid JSON: lone surrogate escape \ud800 at line 1 column 11"
        );
        assert_eq!(
            message(r#"{"text": "ab \uDC00 cd"}"#),
            r"invalid JSON: lone surrogate escape \udc00 at line 1 column 14"
        );
        // A high surrogate followed by something else than a low one.
        assert!(message(r#"{"text": "\ud83d\u0041"}"#).contains(r"lone surrogate escape \ud83d"));
        assert!(message(r#"{"text": "\ud83dx"}"#).contains(r"lone surrogate escape \ud83d"));
        // Two highs: the first is lone.
        assert!(message(r#"{"text": "\ud83d\ud83d\ude00"}"#).contains("column 11"));
        // Also where the value would be ignored (an unknown key), under every kind.
        for kind in [Kind::Text, Kind::Chat, Kind::Auto] {
            let r = parse_line(br#"{"text": "a", "meta": "\udfff"}"#, kind).unwrap_err();
            assert_eq!(r.code(), "invalid_json");
            assert!(
                r.to_string().contains(r"lone surrogate escape \udfff"),
                "{r}"
            );
        }
        // An earlier syntax error is reported as itself.
        let m = message(r#"{"text" "\ud800"}"#);
        assert!(
            m.starts_with("invalid JSON") && !m.contains("surrogate"),
            "{m}"
        );
        // Not surrogates: a pair, an escaped backslash before "ud800", other escapes.
        let ok = |s: &str| parse_line(s.as_bytes(), Kind::Text).unwrap().unwrap();
        assert_eq!(ok(r#"{"text": "\ud83d\ude00"}"#), Record::Text("😀".into()));
        assert_eq!(ok(r#"{"text": "\\ud800"}"#), Record::Text(r"\ud800".into()));
        assert_eq!(
            ok(r#"{"text": "\u00e9\n\\"}"#),
            Record::Text("é\n\\".into())
        );
        assert_eq!(lone_surrogate(r#""\\\ud800""#), Some((3, 0xD800)));
        assert_eq!(lone_surrogate(r#""\u12""#), None);
    }

    #[test]
    fn texts_of_many_files_are_documents_and_message_contents() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(
            dir.path(),
            "a.jsonl",
            "\u{feff}{\"text\": \"<s>你好</s>\"}\n{oops\n\n{\"text\": \"b\"}\n".as_bytes(),
        );
        let empty = write(dir.path(), "e.jsonl", b"\n");
        let c = write(
            dir.path(),
            "c.jsonl",
            br#"{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>x</think>"}]}"#,
        );
        let all = || vec![a.clone(), empty.clone(), c.clone()];
        let mut t = Texts::new(all(), true);
        let mut got = Vec::new();
        while let Some(texts) = t.next_record().unwrap() {
            got.push(texts);
        }
        assert_eq!(
            got,
            vec![
                vec!["你好".to_string()],
                vec!["b".into()],
                vec!["q".into(), "<think>x</think>".into()]
            ]
        );
        assert_eq!((t.records, t.bytes), (3, 6 + 1 + 1 + 16));
        let skipped: Vec<_> = t.skipped.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(skipped, vec![("empty_file", 1), ("invalid_json", 1)]);
        assert!(t.next_record().unwrap().is_none());
        // Under the error policy the first bad line stops it, with its file and line.
        let mut t = Texts::new(all(), false);
        assert!(t.next_record().unwrap().is_some());
        match t.next_record() {
            Err(DataError::BadLine { path, line, .. }) => assert_eq!((path, line), (a.clone(), 2)),
            r => panic!("{r:?}"),
        }
        let mut t = Texts::new(vec![empty.clone()], false);
        assert!(matches!(
            t.next_record(),
            Err(DataError::BadLine {
                line: 0,
                reason: BadReason::EmptyFile,
                ..
            })
        ));
    }

    fn chat_of(line: &str) -> Chat {
        match parse_line(line.as_bytes(), Kind::Chat) {
            Ok(Some(Record::Chat(c))) => c,
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn reasoning_tools_tool_calls_and_tool_messages_are_read() {
        // MiniMind's layout: tools on the system message and tool_calls as JSON strings.
        let c = chat_of(
            r#"{"conversations": [{"role": "system", "content": "S", "tools": "[{\"name\": \"f\", \"parameters\": {\"b\": 1.50, \"a\": \"é\"}}]"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": "[{\"name\":\"f\",\"arguments\":{\"z\":1,\"a\":[2]}}]"}, {"role": "tool", "content": "r"}, {"role": "assistant", "content": "ok", "reasoning_content": "why", "extra": 1}]}"#,
        );
        assert_eq!(
            c.tools,
            vec![r#"{"name": "f", "parameters": {"b": 1.5, "a": "é"}}"#.to_string()]
        );
        assert_eq!(c.messages[3].role, Role::Tool);
        assert_eq!(
            c.messages[2].tool_calls,
            vec![ToolCall {
                name: "f".into(),
                arguments: r#"{"z": 1, "a": [2]}"#.into()
            }]
        );
        assert_eq!(c.messages[4].reasoning.as_deref(), Some("why"));
        // OpenAI's layout: top-level tools, function objects, string arguments kept as written,
        // a null content beside tool calls.
        let c = chat_of(
            r#"{"tools": [{"type": "function", "function": {"name": "g"}}], "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null, "reasoning_content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "g", "arguments": "{\"k\":true}"}}]}]}"#,
        );
        assert_eq!(c.tools.len(), 1);
        assert_eq!(c.messages[1].content, "");
        assert_eq!(c.messages[1].reasoning, None);
        assert_eq!(c.messages[1].tool_calls[0].arguments, r#"{"k":true}"#);
    }

    #[test]
    fn malformed_tools_and_tool_calls_are_schema_errors() {
        let bad = |extra: &str, assistant: &str| {
            let line = format!(
                r#"{{{extra}"conversations": [{{"role": "user", "content": "q"}}, {{"role": "assistant", {assistant}}}]}}"#
            );
            let r = parse_line(line.as_bytes(), Kind::Chat).unwrap_err();
            assert_eq!(r.code(), "bad_schema", "{line}: {r}");
            r.to_string()
        };
        assert!(bad(r#""tools": 3, "#, r#""content": "a""#).contains("`tools`"));
        assert!(bad(r#""tools": [1], "#, r#""content": "a""#).contains("list of objects"));
        assert!(bad(r#""tools": "[{", "#, r#""content": "a""#).contains("`tools`"));
        assert!(bad("", r#""content": "a", "tool_calls": {"name": "f"}"#).contains("tool_calls"));
        assert!(
            bad("", r#""content": "a", "tool_calls": [{"arguments": {}}]"#).contains("no name")
        );
        assert!(
            bad("", r#""content": "a", "tool_calls": [{"name": "f"}]"#).contains("no arguments")
        );
        assert!(bad(
            "",
            r#""content": "a", "tool_calls": [{"name": "f", "arguments": [1]}]"#
        )
        .contains("expected an object"));
        assert!(bad(
            "",
            r#""content": "a", "tool_calls": [{"name": "f", "arguments": "{oops"}]"#
        )
        .contains("JSON object string"));
        assert!(bad("", r#""content": "a", "tool_calls": "not json""#).contains("tool_calls"));
        assert!(bad("", r#""content": "a", "reasoning_content": 3"#).contains("invalid type"));
        // Content may only be missing beside tool calls.
        assert!(bad("", r#""reasoning_content": "r""#).contains("content"));
        // Tools given on the record and on a system message.
        let line = r#"{"tools": [{"name": "f"}], "conversations": [{"role": "system", "content": "s", "tools": [{"name": "g"}]}, {"role": "assistant", "content": "a"}]}"#;
        assert!(parse_line(line.as_bytes(), Kind::Chat)
            .unwrap_err()
            .to_string()
            .contains("given twice"));
        // Schema is checked before roles (contracts.md §1 order).
        let line = r#"{"conversations": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "a", "tool_calls": 5}]}"#;
        assert_eq!(
            parse_line(line.as_bytes(), Kind::Chat).unwrap_err().code(),
            "bad_schema"
        );
    }

    #[test]
    fn tokenizer_training_reads_reasoning_tool_arguments_and_schemas_too() {
        let c = chat_of(
            r#"{"tools": [{"name": "f"}], "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r", "tool_calls": [{"name": "f", "arguments": {"x": 1}}]}]}"#,
        );
        assert_eq!(
            chat_texts(c),
            vec!["q", "a", "r", "{\"x\": 1}", "{\"name\": \"f\"}"]
        );
    }

    #[test]
    fn python_messages_pass_the_same_checks() {
        let c = parse_chat_json(
            r#"[{"role": "user", "content": "q"}]"#,
            Some(r#"[{"name": "f"}]"#),
            false,
        )
        .unwrap();
        assert_eq!((c.messages.len(), c.tools.len()), (1, 1));
        assert_eq!(
            parse_chat_json(r#"[{"role": "user", "content": "q"}]"#, None, true).unwrap_err(),
            BadReason::NoAssistant
        );
        assert_eq!(
            parse_chat_json("[]", None, false).unwrap_err(),
            BadReason::EmptyConversation
        );
        assert_eq!(
            parse_chat_json(r#"[{"role": "x", "content": "q"}]"#, None, false)
                .unwrap_err()
                .code(),
            "unknown_role"
        );
    }
}
