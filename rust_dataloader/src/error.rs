//! Error types. Every failure that can reach Python is one of these; the binding layer maps
//! them to Python exceptions, so nothing here panics across the FFI boundary.

use std::fmt;
use std::path::PathBuf;

/// Why one jsonl line was rejected. `code()` is the stable key used in skip counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadReason {
    InvalidUtf8,
    InvalidJson(String),
    /// A key is missing or has the wrong type (serde's message says which).
    BadSchema(String),
    UnknownRole(String),
    EmptyConversation,
    NoAssistant,
    EmptyFile,
}

impl BadReason {
    /// Every reason code, in a fixed order (used to report counts).
    pub const CODES: [&'static str; 7] = [
        "invalid_utf8",
        "invalid_json",
        "bad_schema",
        "unknown_role",
        "empty_conversation",
        "no_assistant",
        "empty_file",
    ];

    pub fn code(&self) -> &'static str {
        match self {
            BadReason::InvalidUtf8 => "invalid_utf8",
            BadReason::InvalidJson(_) => "invalid_json",
            BadReason::BadSchema(_) => "bad_schema",
            BadReason::UnknownRole(_) => "unknown_role",
            BadReason::EmptyConversation => "empty_conversation",
            BadReason::NoAssistant => "no_assistant",
            BadReason::EmptyFile => "empty_file",
        }
    }
}

impl fmt::Display for BadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadReason::InvalidUtf8 => write!(f, "invalid UTF-8"),
            BadReason::InvalidJson(m) => write!(f, "invalid JSON: {m}"),
            BadReason::BadSchema(m) => write!(f, "bad record: {m}"),
            BadReason::UnknownRole(r) => write!(
                f,
                "unknown role {r:?} (expected \"system\", \"user\", \"assistant\" or \"tool\")"
            ),
            BadReason::EmptyConversation => write!(f, "empty conversation"),
            BadReason::NoAssistant => write!(f, "conversation has no assistant turn"),
            BadReason::EmptyFile => write!(f, "empty file (no records)"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `line` is 1-based; 0 means the file as a whole (e.g. an empty file).
    #[error("{}", fmt_bad_line(path, *line, reason))]
    BadLine {
        path: PathBuf,
        line: u64,
        reason: BadReason,
    },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{0}")]
    Tokenize(String),
    /// A configuration or state that does not fit (e.g. resume state from another run).
    #[error("{0}")]
    Config(String),
    /// The caller asked the work to stop (Ctrl-C); nothing half-built is kept.
    #[error("interrupted")]
    Interrupted,
}

fn fmt_bad_line(path: &std::path::Path, line: u64, reason: &BadReason) -> String {
    if line == 0 {
        format!("{}: {reason}", path.display())
    } else {
        format!("{}:{line}: {reason}", path.display())
    }
}

pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
