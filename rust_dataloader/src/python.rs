//! The PyO3 layer, and the only one: argument conversion, error mapping, GIL release. No
//! logic of its own.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use numpy::{IntoPyArray, PyArray1, PyArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::error::{BadReason, DataError};
use crate::jsonl::{for_each_record, parse_chat_json, Chat, Kind, Texts, Workers};
use crate::loader::{Cursor, Loader, LoaderConfig, LoaderState, Split};
use crate::template::{EmptyThink, Family};
use crate::tokenizer::{self, ChatTokenizer as Core};
use crate::tokenizer_train::{default_max_memory, parse_size, train_bounded, TrainConfig};

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

/// `json.dumps(obj, ensure_ascii=False)`: how messages and tools cross into Rust, so they
/// pass the checks (and the key order) of a file's lines.
fn dumps(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    let py = obj.py();
    let kwargs = PyDict::new(py);
    kwargs.set_item("ensure_ascii", false)?;
    py.import("json")?
        .call_method("dumps", (obj,), Some(&kwargs))?
        .extract()
}

/// Read `[{"role": ..., "content": ..., "reasoning_content"?, "tool_calls"?}, ...]` and the
/// optional tools from Python. `training` requires an assistant turn.
fn chat_from_py(
    messages: &Bound<'_, PyAny>,
    tools: Option<&Bound<'_, PyAny>>,
    training: bool,
) -> PyResult<Chat> {
    let list = PyList::empty(messages.py());
    for item in messages.try_iter()? {
        list.append(item?)?;
    }
    let messages = dumps(list.as_any())?;
    let tools = match tools {
        Some(t) if !t.is_none() => Some(dumps(t)?),
        _ => None,
    };
    parse_chat_json(&messages, tools.as_deref(), training)
        .map_err(|reason| PyValueError::new_err(reason.to_string()))
}

type Array1<'py, T> = Bound<'py, PyArray1<T>>;

/// The Rust chat tokenizer: the one place where the template is rendered and masked.
#[pyclass(module = "spongebob._rust", frozen)]
pub struct ChatTokenizer {
    pub(crate) core: Arc<Core>,
}

#[pymethods]
impl ChatTokenizer {
    /// Load `DIR/tokenizer.json` (a directory) or a `tokenizer.json` file. `template`:
    /// "minimind2" or "chatml" (`None`: the family the folder's tokenizer_config.json names);
    /// `empty_think`: "keep" or "drop" the empty think block of a chatml turn without
    /// reasoning when training (contracts.md §2).
    #[staticmethod]
    #[pyo3(signature = (path, template = None, empty_think = "keep"))]
    fn from_dir(path: PathBuf, template: Option<&str>, empty_think: &str) -> PyResult<Self> {
        let family = template.map(Family::parse).transpose()?;
        let empty_think = EmptyThink::parse(empty_think)?;
        Ok(ChatTokenizer {
            core: Arc::new(Core::load(&path, family, empty_think)?),
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

    /// `(ids int32, weights float32)` of a training conversation (contracts.md §2), with the
    /// function schemas `tools` offered to it (chatml).
    #[pyo3(signature = (messages, think_weight = 1.0, tools = None))]
    fn encode_conversation<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyAny>,
        think_weight: f32,
        tools: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<(Array1<'py, i32>, Array1<'py, f32>)> {
        let chat = chat_from_py(messages, tools, true)?;
        let enc = py.detach(|| self.core.encode_chat(&chat))?;
        let weights = enc.weights(think_weight);
        Ok((to_i32(enc.ids).into_pyarray(py), weights.into_pyarray(py)))
    }

    /// Ids of the history followed by the generation prompt (`<s>assistant\n`, or
    /// `<|im_start|>assistant\n<think>\n\n</think>\n\n`; with `thinking=True` chatml ends in
    /// `<think>\n`).
    #[pyo3(signature = (messages, tools = None, thinking = false))]
    fn encode_prompt<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyAny>,
        tools: Option<&Bound<'py, PyAny>>,
        thinking: bool,
    ) -> PyResult<Bound<'py, PyArray1<i32>>> {
        let chat = chat_from_py(messages, tools, false)?;
        let ids = py.detach(|| self.core.encode_chat_prompt(&chat, thinking))?;
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

    /// The template rendered as text (for display and for checking the Jinja template, which
    /// renders the same with `tools=` and `open_thinking=thinking`).
    #[pyo3(signature = (messages, add_generation_prompt = false, tools = None, thinking = false))]
    fn render(
        &self,
        messages: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
        tools: Option<&Bound<'_, PyAny>>,
        thinking: bool,
    ) -> PyResult<String> {
        let chat = chat_from_py(messages, tools, false)?;
        Ok(self.core.render(&chat, add_generation_prompt, thinking)?)
    }

    /// The template family: "minimind2" or "chatml".
    #[getter]
    fn template(&self) -> &'static str {
        self.core.family().name()
    }

    /// "keep" or "drop" (chatml's empty think blocks in training text).
    #[getter]
    fn empty_think(&self) -> &'static str {
        self.core.template().empty_think.name()
    }

    /// The family's Jinja chat template (for tokenizer_config.json, exports, GGUF).
    #[getter]
    fn chat_template(&self) -> &'static str {
        self.core.family().jinja()
    }

    /// Ids that end a generated reply: `[</s>]`, or `[<|im_end|>, <|endoftext|>]`.
    #[getter]
    fn stop_ids(&self) -> Vec<u32> {
        self.core.stop_ids().to_vec()
    }

    #[getter]
    fn bos_token(&self) -> Option<String> {
        self.core.inner().id_to_token(self.core.bos)
    }
    #[getter]
    fn eos_token(&self) -> Option<String> {
        self.core.inner().id_to_token(self.core.eos)
    }
    #[getter]
    fn pad_token(&self) -> Option<String> {
        self.core.inner().id_to_token(self.core.unk)
    }

    /// The reasoning tags of the family (`<think>`, `</think>`, and minimind2's `<answer>` pair).
    #[getter]
    fn reasoning_tags<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.core.family().reasoning_tags())
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
    /// `{tag: [ids]}` for the four minimind2 reasoning tags (one id each with our tokenizer;
    /// a chatml tokenizer has `<think>` and `</think>`, the answer tags are plain sequences).
    #[getter]
    fn tag_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (tag, ids) in tokenizer::REASONING_TAGS.iter().zip(self.core.tag_ids()) {
            d.set_item(tag, ids.clone())?;
        }
        Ok(d)
    }
}

fn to_i32(ids: Vec<u32>) -> Vec<i32> {
    ids.into_iter().map(|i| i as i32).collect()
}

/// Streams the texts of jsonl files (pretrain `text`, or every message `content`, reasoning and
/// tool-call arguments and the tool schemas of chat lines) in lists of up to `chunk` strings —
/// the feed for tokenizer training.
#[pyclass(module = "spongebob._rust")]
pub struct TextStream {
    texts: Texts,
    chunk: usize,
}

impl TextStream {
    fn next_chunk(&mut self) -> Result<Option<Vec<String>>, DataError> {
        let mut out = Vec::new();
        while out.len() < self.chunk {
            match self.texts.next_record()? {
                None => break,
                Some(texts) => out.extend(texts),
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
            texts: Texts::new(paths, parse_policy(on_bad_line)?),
            chunk: chunk.max(1),
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
        d.set_item("records", self.texts.records)?;
        d.set_item("bytes", self.texts.bytes)?;
        let skipped = PyDict::new(py);
        for (k, v) in &self.texts.skipped {
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

/// (line, reason code, message) of a rejected line.
type BadLine = (u64, String, String);

/// Run long work (tokenizing a whole file) on a helper thread with the GIL released, while
/// this thread looks for Ctrl-C every 50 ms: a signal sets the work's `cancel` flag, waits for
/// it to stop (it checks between chunks of lines) and raises the signal's exception, so Ctrl-C
/// during a cold cache build stops it instead of being seen only minutes later.
fn interruptible<T: Send>(
    py: Python<'_>,
    work: impl FnOnce(&AtomicBool) -> Result<T, DataError> + Send,
) -> PyResult<T> {
    let cancel = AtomicBool::new(false);
    std::thread::scope(|s| {
        let handle = s.spawn(|| work(&cancel));
        loop {
            py.detach(|| {
                for _ in 0..5 {
                    if handle.is_finished() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            if handle.is_finished() {
                break;
            }
            if let Err(interrupt) = py.check_signals() {
                cancel.store(true, Ordering::Relaxed);
                // The work's own result (Interrupted, or whatever it finished with) is dropped:
                // the signal wins.
                let _ = py.detach(|| handle.join());
                return Err(interrupt);
            }
        }
        match py.detach(|| handle.join()) {
            Ok(result) => result.map_err(PyErr::from),
            Err(_) => Err(PyValueError::new_err(
                "internal error: the loader thread panicked",
            )),
        }
    })
}

fn thread_pool(num_threads: Option<usize>) -> Result<rayon::ThreadPool, DataError> {
    let threads =
        num_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| DataError::Config(e.to_string()))
}

fn bad_line(line: u64, reason: &BadReason) -> BadLine {
    (line, reason.code().to_owned(), reason.to_string())
}

/// Validate and measure every line of a file: `(token lengths, [(line, reason code, message)])`.
/// Unlike the loader it does not stop at the first bad line. Line 0 = the file as a whole.
#[pyfunction]
#[pyo3(signature = (path, tokenizer, kind, num_threads = None))]
fn scan_file<'py>(
    py: Python<'py>,
    path: PathBuf,
    tokenizer: &ChatTokenizer,
    kind: &str,
    num_threads: Option<usize>,
) -> PyResult<(Array1<'py, u32>, Vec<BadLine>)> {
    let kind = Kind::parse(kind)?;
    let core = tokenizer.core.clone();
    let (lens, bad) = interruptible(py, |cancel| -> Result<_, DataError> {
        let pool = thread_pool(num_threads)?;
        let (mut lens, mut bad) = (Vec::new(), Vec::new());
        let workers = Workers {
            pool: &pool,
            cancel,
        };
        crate::cache::for_each_encoded(&path, kind, &core, workers, |line, item| {
            match item {
                Ok(enc) => lens.push(enc.ids.len() as u32),
                Err(reason) => bad.push(bad_line(line, &reason)),
            }
            Ok(())
        })?;
        Ok((lens, bad))
    })?;
    Ok((lens.into_pyarray(py), bad))
}

/// Validate every line of a file without a tokenizer (the loader's parser and rules):
/// `(records, [(line, reason code, message)])`. Line 0 = the file as a whole.
#[pyfunction]
#[pyo3(signature = (path, kind, num_threads = None))]
fn check_file(
    py: Python<'_>,
    path: PathBuf,
    kind: &str,
    num_threads: Option<usize>,
) -> PyResult<(u64, Vec<BadLine>)> {
    let kind = Kind::parse(kind)?;
    interruptible(py, |cancel| -> Result<_, DataError> {
        let pool = thread_pool(num_threads)?;
        let (mut records, mut bad) = (0u64, Vec::new());
        let workers = Workers {
            pool: &pool,
            cancel,
        };
        for_each_record(
            &path,
            kind,
            workers,
            |_| Ok(()),
            |line, item| {
                match item {
                    Ok(()) => records += 1,
                    Err(reason) => bad.push(bad_line(line, &reason)),
                }
                Ok(())
            },
        )?;
        Ok((records, bad))
    })
}

/// Train a byte-level BPE on the texts of jsonl `paths` with the process's peak memory
/// under `max_memory` (bytes, or a string such as "2GB"; `None`: `default_max_memory()`).
/// Returns `(model_json, stats)`: the BPE model as `tokenizers` serialises it, and a dict
/// of what the run did (rust_dataloader/src/tokenizer_train/).
#[pyfunction]
#[pyo3(signature = (paths, vocab_size, special_tokens, max_memory = None,
                    on_bad_line = "error", num_threads = None, prune_to = None,
                    cost_per_entry = None, cost_per_byte = None))]
#[allow(clippy::too_many_arguments)]
fn train_bpe_bounded<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    vocab_size: usize,
    special_tokens: Vec<String>,
    max_memory: Option<&Bound<'py, PyAny>>,
    on_bad_line: &str,
    num_threads: Option<usize>,
    prune_to: Option<f64>,
    cost_per_entry: Option<u64>,
    cost_per_byte: Option<u64>,
) -> PyResult<(String, Bound<'py, PyDict>)> {
    let max_memory = match max_memory {
        None => default_max_memory(),
        Some(m) => match m.extract::<u64>() {
            Ok(n) => n,
            Err(_) => parse_size(&m.extract::<String>()?)?,
        },
    };
    let mut cfg = TrainConfig::new(vocab_size, special_tokens, max_memory);
    cfg.skip_bad = parse_policy(on_bad_line)?;
    cfg.num_threads = num_threads.unwrap_or(0);
    if let Some(p) = prune_to {
        if !(0.05..=0.95).contains(&p) {
            return Err(PyValueError::new_err("prune_to must be in [0.05, 0.95]"));
        }
        cfg.prune_to = p;
    }
    if let Some(a) = cost_per_entry {
        cfg.model.per_entry = a;
    }
    if let Some(b) = cost_per_byte {
        cfg.model.per_byte = b;
    }
    let out = py.detach(|| train_bounded(&paths, &cfg))?;
    let s = &out.stats;
    let d = PyDict::new(py);
    d.set_item("records", s.records)?;
    d.set_item("bytes", s.bytes)?;
    d.set_item("pieces", s.pieces)?;
    let skipped = PyDict::new(py);
    for (k, v) in &s.skipped {
        skipped.set_item(k, v)?;
    }
    d.set_item("skipped", skipped)?;
    d.set_item("base_rss", s.base_rss)?;
    d.set_item("table_budget", s.table_budget)?;
    d.set_item("sketch_bytes", s.sketch_bytes)?;
    d.set_item("prunes", s.prunes)?;
    d.set_item("prune_rounds", s.prune_rounds)?;
    d.set_item("cut", s.cut)?;
    d.set_item("max_threshold", s.max_threshold)?;
    d.set_item("entries", s.entries)?;
    d.set_item("table_cost", s.table_cost)?;
    d.set_item("words", s.words)?;
    d.set_item("count_secs", s.count_secs)?;
    d.set_item("train_secs", s.train_secs)?;
    d.set_item("threads", s.threads)?;
    Ok((out.model_json, d))
}

/// What a template family is made of: `specials` (the added tokens a tokenizer trained for
/// it gets, in id order; the first `num_special` are special tokens), `bos`, `eos`, `pad`,
/// `stop_tokens`, `reasoning_tags` and `chat_template` (its Jinja twin).
#[pyfunction]
fn template_info<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyDict>> {
    let f = Family::parse(name)?;
    let d = PyDict::new(py);
    d.set_item("name", f.name())?;
    d.set_item("specials", PyTuple::new(py, f.train_specials())?)?;
    d.set_item("num_special", f.num_special())?;
    let [bos, eos, pad] = f.markers();
    d.set_item("bos", bos)?;
    d.set_item("eos", eos)?;
    d.set_item("pad", pad)?;
    d.set_item("stop_tokens", PyTuple::new(py, f.stop_tokens())?)?;
    d.set_item("reasoning_tags", PyTuple::new(py, f.reasoning_tags())?)?;
    d.set_item("chat_template", f.jinja())?;
    Ok(d)
}

#[pymodule]
fn _rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ChatTokenizer>()?;
    m.add_class::<TextStream>()?;
    m.add_class::<PackedLoader>()?;
    m.add_function(wrap_pyfunction!(scan_file, m)?)?;
    m.add_function(wrap_pyfunction!(check_file, m)?)?;
    m.add_function(wrap_pyfunction!(train_bpe_bounded, m)?)?;
    m.add("DataFormatError", m.py().get_type::<DataFormatError>())?;
    m.add("TEMPLATE_VERSION", tokenizer::TEMPLATE_VERSION)?;
    m.add("DEFAULT_SYSTEM", tokenizer::DEFAULT_SYSTEM)?;
    m.add(
        "SPECIAL_TOKENS",
        PyTuple::new(m.py(), tokenizer::SPECIAL_TOKENS)?,
    )?;
    m.add(
        "REASONING_TAGS",
        PyTuple::new(m.py(), tokenizer::REASONING_TAGS)?,
    )?;
    m.add("BAD_LINE_REASONS", BadReason::CODES.to_vec())?;
    m.add("TEMPLATES", PyTuple::new(m.py(), Family::NAMES)?)?;
    m.add_function(wrap_pyfunction!(template_info, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

type Array2<'py, T> = Bound<'py, numpy::PyArray2<T>>;
type BatchArrays<'py> = (
    Array2<'py, i64>,
    Array2<'py, i64>,
    Array2<'py, f32>,
    Array2<'py, i64>,
);

/// The packed batch loader (contracts.md §3). Position: `(epoch, batches handed out)`.
#[pyclass(module = "spongebob._rust")]
pub struct PackedLoader {
    cursor: Cursor,
}

#[pymethods]
impl PackedLoader {
    #[new]
    #[pyo3(signature = (paths, tokenizer, kind, seq_len, batch_size, seed = 0, rank = 0,
        world_size = 1, think_weight = 1.0, cache_dir = None, on_bad_line = "error",
        prefetch = 4, num_threads = None, holdout = 0.0, split = "train"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        paths: Vec<PathBuf>,
        tokenizer: &ChatTokenizer,
        kind: &str,
        seq_len: usize,
        batch_size: usize,
        seed: u64,
        rank: usize,
        world_size: usize,
        think_weight: f32,
        cache_dir: Option<PathBuf>,
        on_bad_line: &str,
        prefetch: usize,
        num_threads: Option<usize>,
        holdout: f64,
        split: &str,
    ) -> PyResult<Self> {
        let cfg = LoaderConfig {
            paths,
            kind: Kind::parse(kind)?,
            seq_len,
            batch_size,
            seed,
            rank,
            world_size,
            think_weight,
            cache_dir,
            skip_bad: parse_policy(on_bad_line)?,
            threads: num_threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            holdout,
            split: Split::parse(split)?,
        };
        let core = tokenizer.core.clone();
        let loader = interruptible(py, |cancel| Loader::new(cfg, &core, cancel))?;
        Ok(PackedLoader {
            cursor: Cursor::new(Arc::new(loader), prefetch),
        })
    }

    /// The next batch of the current epoch as four [B, T] arrays, or None at its end (the
    /// position then moves to the next epoch).
    fn next_batch<'py>(&mut self, py: Python<'py>) -> PyResult<Option<BatchArrays<'py>>> {
        let cursor = &mut self.cursor;
        let Some(batch) = py.detach(|| cursor.next_batch())? else {
            return Ok(None);
        };
        let cfg = &self.cursor.loader().cfg;
        let (b, t) = (cfg.batch_size, cfg.seq_len);
        Ok(Some((
            batch.input_ids.into_pyarray(py).reshape([b, t])?,
            batch.labels.into_pyarray(py).reshape([b, t])?,
            batch.loss_weights.into_pyarray(py).reshape([b, t])?,
            batch.position_ids.into_pyarray(py).reshape([b, t])?,
        )))
    }

    /// Batches this rank gets in the current epoch.
    fn batches_per_epoch(&mut self, py: Python<'_>) -> usize {
        let cursor = &mut self.cursor;
        py.detach(|| cursor.batches_per_epoch())
    }

    fn set_epoch(&mut self, epoch: u64) {
        self.cursor.set_epoch(epoch);
    }

    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.cursor.state();
        let d = PyDict::new(py);
        d.set_item("version", s.version)?;
        d.set_item("epoch", s.epoch)?;
        d.set_item("batches", s.batches)?;
        d.set_item("fingerprint", s.fingerprint)?;
        Ok(d)
    }

    fn load_state_dict(&mut self, state: &Bound<'_, PyDict>) -> PyResult<()> {
        let get = |k: &str| -> PyResult<Bound<'_, PyAny>> {
            state
                .get_item(k)?
                .ok_or_else(|| PyValueError::new_err(format!("loader state has no {k:?}")))
        };
        let state = LoaderState {
            fingerprint: get("fingerprint")?.extract()?,
            version: get("version")?.extract()?,
            epoch: get("epoch")?.extract()?,
            batches: get("batches")?.extract()?,
        };
        Ok(self.cursor.load_state(&state)?)
    }

    /// documents and tokens of this split (tokens before truncation, or before the dropped
    /// tail of a text stream), rows of the current epoch, fill = tokens placed in rows /
    /// (rows × (seq_len + 1)), truncated conversations, skipped lines by reason.
    fn stats<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let cursor = &mut self.cursor;
        let plan = py.detach(|| cursor.plan());
        let l = self.cursor.loader();
        let d = PyDict::new(py);
        let rows = plan.num_rows();
        d.set_item("documents", l.num_docs())?;
        d.set_item("tokens", l.total_tokens())?;
        d.set_item("rows", rows)?;
        d.set_item("used_tokens", plan.used_tokens)?;
        let fill = if rows == 0 {
            0.0
        } else {
            plan.used_tokens as f64 / (rows as f64 * l.row_len() as f64)
        };
        d.set_item("fill", fill)?;
        d.set_item("truncated", l.truncated())?;
        d.set_item("batches_per_epoch", l.batches_in(&plan))?;
        d.set_item("epoch", self.cursor.epoch())?;
        let skipped = PyDict::new(py);
        for (k, v) in l.skipped() {
            skipped.set_item(k, v)?;
        }
        d.set_item("skipped", skipped)?;
        Ok(d)
    }

    /// The global document indices (contracts.md §3) of this loader's split, ascending.
    fn documents<'py>(&self, py: Python<'py>) -> Array1<'py, u32> {
        self.cursor.loader().split_documents().into_pyarray(py)
    }

    #[getter]
    fn fingerprint(&self) -> &str {
        &self.cursor.loader().fingerprint
    }
}
