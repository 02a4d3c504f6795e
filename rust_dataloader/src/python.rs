//! The PyO3 layer: argument conversion, error mapping, GIL release. No logic of its own.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use numpy::{IntoPyArray, PyArray1, PyArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::error::{BadReason, DataError};
use crate::jsonl::{check_conversation, JsonlReader, Kind, Message, Record};
use crate::loader::{Loader, LoaderConfig, Prefetcher};
use crate::pack::Plan;
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

type Array1<'py, T> = Bound<'py, PyArray1<T>>;

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

    /// `(ids int32, weights float32)` of a training conversation (contracts.md §2).
    #[pyo3(signature = (messages, think_weight = 1.0))]
    fn encode_conversation<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyAny>,
        think_weight: f32,
    ) -> PyResult<(Array1<'py, i32>, Array1<'py, f32>)> {
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
    let threads =
        num_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let (lens, bad) = interruptible(py, |cancel| -> Result<_, DataError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
            .map_err(|e| DataError::Config(e.to_string()))?;
        let mut lens = Vec::new();
        let mut bad = Vec::new();
        let workers = crate::cache::Workers {
            pool: &pool,
            cancel,
        };
        crate::cache::for_each_encoded(&path, kind, &core, workers, |line, item| {
            match item {
                Ok(enc) => lens.push(enc.ids.len() as u32),
                Err(reason) => bad.push((line, reason.code().to_owned(), reason.to_string())),
            }
            Ok(())
        })?;
        if lens.is_empty() && bad.is_empty() {
            let r = BadReason::EmptyFile;
            bad.push((0, r.code().to_owned(), r.to_string()));
        }
        Ok((lens, bad))
    })?;
    Ok((lens.into_pyarray(py), bad))
}

#[pymodule]
fn _rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ChatTokenizer>()?;
    m.add_class::<TextStream>()?;
    m.add_class::<PackedLoader>()?;
    m.add_function(wrap_pyfunction!(scan_file, m)?)?;
    m.add_function(wrap_pyfunction!(
        crate::tokenizer_train::train_bpe_bounded,
        m
    )?)?;
    m.add("DataFormatError", m.py().get_type::<DataFormatError>())?;
    m.add("TEMPLATE_VERSION", tokenizer::TEMPLATE_VERSION)?;
    m.add("DEFAULT_SYSTEM", tokenizer::DEFAULT_SYSTEM)?;
    m.add("BAD_LINE_REASONS", BadReason::CODES.to_vec())?;
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

/// The packed batch loader (see docs/architecture.md). Position: `(epoch, batches handed out)`.
#[pyclass(module = "spongebob._rust")]
pub struct PackedLoader {
    loader: Arc<Loader>,
    epoch: u64,
    pos: usize,
    plan: Option<(u64, Arc<Plan>)>,
    prefetch: Option<Prefetcher>,
    depth: usize,
}

impl PackedLoader {
    fn plan_for(&mut self, py: Python<'_>, epoch: u64) -> Arc<Plan> {
        if let Some((e, p)) = &self.plan {
            if *e == epoch {
                return p.clone();
            }
        }
        let loader = self.loader.clone();
        let plan = Arc::new(py.detach(|| loader.plan(epoch)));
        self.plan = Some((epoch, plan.clone()));
        plan
    }

    fn drop_prefetch(&mut self) {
        if let Some(p) = self.prefetch.take() {
            if p.pid != std::process::id() {
                // Inherited through fork: its thread does not exist here and its channel
                // may hold a lock taken at fork time. Leak it rather than touch it.
                std::mem::forget(p);
            }
        }
    }
}

#[pymethods]
impl PackedLoader {
    #[new]
    #[pyo3(signature = (paths, tokenizer, kind, seq_len, batch_size, seed = 0, rank = 0,
        world_size = 1, think_weight = 1.0, cache_dir = None, on_bad_line = "error",
        prefetch = 4, num_threads = None))]
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
        };
        let core = tokenizer.core.clone();
        let loader = interruptible(py, |cancel| Loader::new(cfg, &core, cancel))?;
        Ok(PackedLoader {
            loader: Arc::new(loader),
            epoch: 0,
            pos: 0,
            plan: None,
            prefetch: None,
            depth: prefetch,
        })
    }

    /// The next batch of the current epoch as four [B, T] arrays, or None at its end (the
    /// position then moves to the next epoch).
    fn next_batch<'py>(&mut self, py: Python<'py>) -> PyResult<Option<BatchArrays<'py>>> {
        let plan = self.plan_for(py, self.epoch);
        let n = self.loader.batches_in(&plan);
        if self.pos >= n {
            self.drop_prefetch();
            self.epoch += 1;
            self.pos = 0;
            return Ok(None);
        }
        let fresh = matches!(&self.prefetch,
            Some(p) if p.pid == std::process::id() && p.epoch == self.epoch && p.next == self.pos);
        if !fresh {
            self.drop_prefetch();
            self.prefetch = Some(Prefetcher::spawn(
                self.loader.clone(),
                plan,
                self.epoch,
                self.pos,
                n,
                self.depth,
            )?);
        }
        let rx = self.prefetch.as_ref().expect("set above").rx.clone();
        let got = py.detach(move || rx.recv());
        let batch = match got {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                // The thread stops after an error: drop it so the next call starts afresh.
                self.drop_prefetch();
                return Err(e.into());
            }
            Err(_) => {
                self.drop_prefetch();
                return Err(PyValueError::new_err("the prefetch thread stopped"));
            }
        };
        self.prefetch.as_mut().expect("set above").next += 1;
        self.pos += 1;
        let (b, t) = (self.loader.cfg.batch_size, self.loader.cfg.seq_len);
        Ok(Some((
            batch.input_ids.into_pyarray(py).reshape([b, t])?,
            batch.labels.into_pyarray(py).reshape([b, t])?,
            batch.loss_weights.into_pyarray(py).reshape([b, t])?,
            batch.position_ids.into_pyarray(py).reshape([b, t])?,
        )))
    }

    /// Batches this rank gets in the current epoch.
    fn batches_per_epoch(&mut self, py: Python<'_>) -> usize {
        let plan = self.plan_for(py, self.epoch);
        self.loader.batches_in(&plan)
    }

    fn set_epoch(&mut self, epoch: u64) {
        self.drop_prefetch();
        self.epoch = epoch;
        self.pos = 0;
    }

    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("version", 1)?;
        d.set_item("epoch", self.epoch)?;
        d.set_item("batches", self.pos)?;
        d.set_item("fingerprint", &self.loader.fingerprint)?;
        Ok(d)
    }

    fn load_state_dict(&mut self, state: &Bound<'_, PyDict>) -> PyResult<()> {
        let get = |k: &str| -> PyResult<Bound<'_, PyAny>> {
            state
                .get_item(k)?
                .ok_or_else(|| PyValueError::new_err(format!("loader state has no {k:?}")))
        };
        let fp: String = get("fingerprint")?.extract()?;
        if fp != self.loader.fingerprint {
            return Err(PyValueError::new_err(
                "loader state comes from a different configuration (files, tokenizer, seq_len, \
                 batch size, seed, rank, world size, think_weight or bad-line policy differ)",
            ));
        }
        let version: u32 = get("version")?.extract()?;
        if version != 1 {
            return Err(PyValueError::new_err(format!(
                "unknown loader state version {version}"
            )));
        }
        self.drop_prefetch();
        self.epoch = get("epoch")?.extract()?;
        self.pos = get("batches")?.extract()?;
        Ok(())
    }

    fn stats<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let plan = self.plan_for(py, self.epoch);
        let l = &self.loader;
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
        d.set_item("epoch", self.epoch)?;
        let skipped = PyDict::new(py);
        for (k, v) in l.skipped() {
            skipped.set_item(k, v)?;
        }
        d.set_item("skipped", skipped)?;
        Ok(d)
    }

    #[getter]
    fn fingerprint(&self) -> &str {
        &self.loader.fingerprint
    }
}
