//! The PyO3 layer: argument conversion, error mapping, GIL release. No logic of its own.

use std::path::PathBuf;
use std::sync::Arc;

use numpy::{IntoPyArray, PyArray1};
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::error::{BadReason, DataError};
use crate::jsonl::{check_conversation, JsonlReader, Kind, Message, Record};
use crate::tokenizer::{self, ChatTokenizer as Core};

pyo3::create_exception!(
    _rust,
    DataFormatError,
    PyValueError,
    "A jsonl line (or file) that breaks the data contract; the message names file:line and why."
);

impl From<DataError> for PyErr {
    fn from(e: DataError) -> PyErr {
        let msg = e.to_string();
        match e {
            DataError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                PyFileNotFoundError::new_err(msg)
            }
            DataError::Io { .. } => PyOSError::new_err(msg),
            DataError::BadLine { .. } => DataFormatError::new_err(msg),
            _ => PyValueError::new_err(msg),
        }
    }
}

/// Read `[{"role": ..., "content": ...}, ...]` from Python. `training` requires an assistant turn.
fn messages_from_py(messages: &Bound<'_, PyAny>, training: bool) -> PyResult<Vec<Message>> {
    let mut raw = Vec::new();
    for item in messages.try_iter()? {
        let item = item?;
        let role: String = item.get_item("role")?.extract()?;
        let content: String = item.get_item("content")?.extract()?;
        raw.push((role, content));
    }
    check_conversation(raw, training).map_err(|reason| PyValueError::new_err(reason.to_string()))
}

/// The Rust chat tokenizer: the one place where the template is rendered and masked.
#[pyclass(module = "spongebob._rust", frozen)]
pub struct ChatTokenizer {
    pub(crate) core: Arc<Core>,
}

#[pymethods]
impl ChatTokenizer {
    /// Load `DIR/tokenizer.json` (a directory) or a `tokenizer.json` file.
    #[staticmethod]
    fn from_dir(path: PathBuf) -> PyResult<Self> {
        Ok(ChatTokenizer {
            core: Arc::new(Core::from_path(&path)?),
        })
    }

    /// Token ids of `text`. By default added tokens are *not* matched (content can't forge
    /// structure); `allow_special=True` matches them as the `tokenizers` library does.
    #[pyo3(signature = (text, allow_special = false))]
    fn encode<'py>(
        &self,
        py: Python<'py>,
        text: &str,
        allow_special: bool,
    ) -> PyResult<Bound<'py, PyArray1<i32>>> {
        let ids = py.detach(|| {
            if allow_special {
                self.core.encode_with_specials(text)
            } else {
                self.core.encode_plain(text)
            }
        })?;
        Ok(to_i32(ids).into_pyarray(py))
    }

    #[pyo3(signature = (ids, skip_special_tokens = false))]
    fn decode(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        Ok(self.core.decode(&ids, skip_special_tokens)?)
    }

    /// `(ids int32, weights float32)` of a training conversation (DESIGN §3).
    #[pyo3(signature = (messages, think_weight = 1.0))]
    fn encode_conversation<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyAny>,
        think_weight: f32,
    ) -> PyResult<(Bound<'py, PyArray1<i32>>, Bound<'py, PyArray1<f32>>)> {
        let msgs = messages_from_py(messages, true)?;
        let enc = py.detach(|| self.core.encode_conversation(&msgs))?;
        let weights = enc.weights(think_weight);
        Ok((to_i32(enc.ids).into_pyarray(py), weights.into_pyarray(py)))
    }

    /// Ids of the history followed by `<s>assistant\n`.
    fn encode_prompt<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<i32>>> {
        let msgs = messages_from_py(messages, false)?;
        let ids = py.detach(|| self.core.encode_prompt(&msgs))?;
        Ok(to_i32(ids).into_pyarray(py))
    }

    /// `<s>` + text + `</s>` for a pretraining document (one marker pair in `text` is stripped).
    fn encode_document<'py>(
        &self,
        py: Python<'py>,
        text: &str,
    ) -> PyResult<Bound<'py, PyArray1<i32>>> {
        let enc = py.detach(|| self.core.encode_document(text))?;
        Ok(to_i32(enc.ids).into_pyarray(py))
    }

    /// The template rendered as text (for display and for checking the Jinja template).
    #[pyo3(signature = (messages, add_generation_prompt = false))]
    fn render(&self, messages: &Bound<'_, PyAny>, add_generation_prompt: bool) -> PyResult<String> {
        let msgs = messages_from_py(messages, false)?;
        Ok(tokenizer::render(&msgs, add_generation_prompt))
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.core.inner().token_to_id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.core.inner().id_to_token(id)
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.core.vocab_size()
    }
    #[getter]
    fn bos_id(&self) -> u32 {
        self.core.bos
    }
    #[getter]
    fn eos_id(&self) -> u32 {
        self.core.eos
    }
    #[getter]
    fn pad_id(&self) -> u32 {
        self.core.unk
    }
    /// SHA-256 of tokenizer.json.
    #[getter]
    fn hash(&self) -> &str {
        self.core.hash()
    }
    #[getter]
    fn path(&self) -> PathBuf {
        self.core.path().to_owned()
    }
    /// `{tag: [ids]}` for the four reasoning tags (one id each with our tokenizer).
    #[getter]
    fn tag_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (tag, ids) in tokenizer::TAGS.iter().zip(self.core.tag_ids()) {
            d.set_item(tag, ids.clone())?;
        }
        Ok(d)
    }
}

fn to_i32(ids: Vec<u32>) -> Vec<i32> {
    ids.into_iter().map(|i| i as i32).collect()
}

/// Streams the texts of jsonl files (pretrain `text`, or every message `content` of chat
/// lines) in lists of up to `chunk` strings — the feed for tokenizer training.
#[pyclass(module = "spongebob._rust")]
pub struct TextStream {
    files: Vec<PathBuf>,
    current: Option<JsonlReader>,
    skip_bad: bool,
    chunk: usize,
    skipped: std::collections::BTreeMap<&'static str, u64>,
    records: u64,
    bytes: u64,
}

impl TextStream {
    fn next_chunk(&mut self) -> Result<Option<Vec<String>>, DataError> {
        let mut out = Vec::new();
        while out.len() < self.chunk {
            if self.current.is_none() {
                if self.files.is_empty() {
                    break;
                }
                let path = self.files.remove(0);
                self.current = Some(JsonlReader::open(&path, Kind::Auto)?);
            }
            let reader = self.current.as_mut().expect("set above");
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
                    match record {
                        Record::Text(t) => {
                            let t = crate::jsonl::strip_document_markers(&t).to_owned();
                            self.bytes += t.len() as u64;
                            out.push(t);
                        }
                        Record::Chat(msgs) => {
                            for m in msgs {
                                self.bytes += m.content.len() as u64;
                                out.push(m.content);
                            }
                        }
                    }
                }
            }
        }
        Ok(if out.is_empty() { None } else { Some(out) })
    }
}

#[pymethods]
impl TextStream {
    #[new]
    #[pyo3(signature = (paths, on_bad_line = "error", chunk = 1024))]
    fn new(paths: Vec<PathBuf>, on_bad_line: &str, chunk: usize) -> PyResult<Self> {
        Ok(TextStream {
            files: paths,
            current: None,
            skip_bad: parse_policy(on_bad_line)?,
            chunk: chunk.max(1),
            skipped: Default::default(),
            records: 0,
            bytes: 0,
        })
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        match py.detach(|| self.next_chunk())? {
            None => Ok(None),
            Some(texts) => Ok(Some(PyList::new(py, texts)?)),
        }
    }

    /// Records read so far, text bytes, and skipped lines by reason.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("records", self.records)?;
        d.set_item("bytes", self.bytes)?;
        let skipped = PyDict::new(py);
        for (k, v) in &self.skipped {
            skipped.set_item(k, v)?;
        }
        d.set_item("skipped", skipped)?;
        Ok(d)
    }
}

pub(crate) fn parse_policy(s: &str) -> PyResult<bool> {
    match s {
        "error" => Ok(false),
        "skip" => Ok(true),
        _ => Err(PyValueError::new_err(format!(
            "on_bad_line must be \"error\" or \"skip\", not {s:?}"
        ))),
    }
}

#[pymodule]
fn _rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ChatTokenizer>()?;
    m.add_class::<TextStream>()?;
    m.add("DataFormatError", m.py().get_type::<DataFormatError>())?;
    m.add("TEMPLATE_VERSION", tokenizer::TEMPLATE_VERSION)?;
    m.add("DEFAULT_SYSTEM", tokenizer::DEFAULT_SYSTEM)?;
    m.add("BAD_LINE_REASONS", BadReason::CODES.to_vec())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
