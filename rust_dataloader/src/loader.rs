//! The packed loader: caches for every file, the validation split, the epoch plan, batches
//! built on a prefetch thread, and the position (`Cursor`) with its resume state. Python sees
//! it through `spongebob.data.PackedDataset` (contracts.md §3).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};
use sha2::{Digest, Sha256};

use crate::cache::DocStore;
use crate::error::{DataError, Result};
use crate::jsonl::{Kind, Workers};
use crate::pack::{self, Plan};
use crate::tokenizer::{class_weight, ChatTokenizer, TEMPLATE_VERSION, UNTRAINED};

/// Which documents a loader serves when part of them is held out for validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The documents not held out (all of them with `holdout = 0`).
    Train,
    /// The held-out documents.
    Val,
}

impl Split {
    pub fn parse(s: &str) -> Result<Split> {
        match s {
            "train" => Ok(Split::Train),
            "val" => Ok(Split::Val),
            _ => Err(DataError::Config(format!(
                "unknown split {s:?} (expected \"train\" or \"val\")"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub paths: Vec<PathBuf>,
    pub kind: Kind,
    pub seq_len: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    pub think_weight: f32,
    pub cache_dir: Option<PathBuf>,
    pub skip_bad: bool,
    pub threads: usize,
    /// Fraction of the documents held out for validation, in [0, 1) (contracts.md §3).
    pub holdout: f64,
    pub split: Split,
}

impl LoaderConfig {
    /// The defaults for everything but the data: seed 0, one rank, `think_weight` 1, a
    /// temporary cache, bad lines are errors, no hold-out (for the tests).
    #[cfg(test)]
    pub fn new(paths: Vec<PathBuf>, kind: Kind, seq_len: usize, batch_size: usize) -> Self {
        LoaderConfig {
            paths,
            kind,
            seq_len,
            batch_size,
            seed: 0,
            rank: 0,
            world_size: 1,
            think_weight: 1.0,
            cache_dir: None,
            skip_bad: false,
            threads: 1,
            holdout: 0.0,
            split: Split::Train,
        }
    }
}

impl LoaderConfig {
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(DataError::Config(m));
        if self.paths.is_empty() {
            return bad("no data files given".into());
        }
        if self.kind == Kind::Auto {
            return bad("the loader needs kind \"text\" or \"chat\"".into());
        }
        if self.seq_len < 2 || self.batch_size == 0 || self.world_size == 0 {
            return bad("seq_len must be ≥ 2, batch_size and world_size ≥ 1".into());
        }
        if self.rank >= self.world_size {
            return bad(format!(
                "rank {} is not below world size {}",
                self.rank, self.world_size
            ));
        }
        if !self.think_weight.is_finite() || self.think_weight < 0.0 {
            return bad(format!(
                "think_weight must be ≥ 0, not {}",
                self.think_weight
            ));
        }
        if !(0.0..1.0).contains(&self.holdout) {
            return bad(format!(
                "holdout (--val-split) must be in [0, 1), not {}",
                self.holdout
            ));
        }
        Ok(())
    }
}

/// One batch, row-major [B, T].
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub loss_weights: Vec<f32>,
    pub position_ids: Vec<i64>,
}

pub struct Loader {
    pub cfg: LoaderConfig,
    stores: Vec<DocStore>,
    /// Global document index → (store, local index): `doc_start[s]` is store s's first.
    doc_start: Vec<usize>,
    /// The split's documents (global indices, ascending); `None` = every document. The plan
    /// numbers documents `0..lens.len()` within the split.
    split_docs: Option<Vec<u32>>,
    /// Token count of each of the split's documents.
    lens: Vec<u64>,
    pub fingerprint: String,
    pad: u32,
    // Dropped last: removes the temporary cache of a loader built without `cache_dir`.
    _tmp: Option<tempfile::TempDir>,
}

impl Loader {
    /// Open (or build) the token cache of every file. Setting `cancel` stops a build between
    /// chunks of lines with `DataError::Interrupted`.
    pub fn new(cfg: LoaderConfig, tok: &ChatTokenizer, cancel: &AtomicBool) -> Result<Loader> {
        cfg.check()?;
        let (dir, tmp) = match &cfg.cache_dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("spongebob-cache-")
                    .tempdir()
                    .map_err(|e| DataError::io(std::env::temp_dir(), e))?;
                (t.path().to_owned(), Some(t))
            }
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads.max(1))
            .build()
            .map_err(|e| DataError::Config(e.to_string()))?;
        let mut stores = Vec::with_capacity(cfg.paths.len());
        for p in &cfg.paths {
            stores.push(DocStore::open_or_build(
                p,
                cfg.kind,
                tok,
                &dir,
                cfg.skip_bad,
                Workers {
                    pool: &pool,
                    cancel,
                },
            )?);
        }
        let mut doc_start = Vec::with_capacity(stores.len());
        let mut lens = Vec::new();
        for s in &stores {
            doc_start.push(lens.len());
            lens.extend((0..s.num_docs()).map(|i| s.doc_len(i)));
        }
        if lens.len() > u32::MAX as usize {
            return Err(DataError::Config("more than 2^32 documents".into()));
        }
        let (split_docs, lens) = select_split(&cfg, lens)?;
        let fingerprint = fingerprint(&cfg, &stores, tok);
        Ok(Loader {
            cfg,
            stores,
            doc_start,
            split_docs,
            lens,
            fingerprint,
            pad: tok.unk,
            _tmp: tmp,
        })
    }

    pub fn row_len(&self) -> u64 {
        self.cfg.seq_len as u64 + 1
    }

    pub fn plan(&self, epoch: u64) -> Plan {
        let order = pack::shuffle(self.lens.len(), self.cfg.seed, epoch);
        match self.cfg.kind {
            Kind::Text => pack::plan_stream(&self.lens, &order, self.row_len()),
            _ => {
                // Best-fit decreasing opens rows longest-first; shuffle them back.
                let seed = self.cfg.seed ^ pack::ROW_SALT;
                pack::plan_best_fit_in_order(&self.lens, &order, self.row_len(), |rows| {
                    pack::shuffle(rows, seed, epoch)
                })
            }
        }
    }

    pub fn batches_in(&self, plan: &Plan) -> usize {
        pack::batches_per_rank(plan.num_rows(), self.cfg.batch_size, self.cfg.world_size)
    }

    /// Document `doc` of the split → (store, index in that store).
    fn locate(&self, doc: u32) -> (usize, usize) {
        let d = match &self.split_docs {
            Some(global) => global[doc as usize] as usize,
            None => doc as usize,
        };
        let s = self.doc_start.partition_point(|&start| start <= d) - 1;
        (s, d - self.doc_start[s])
    }

    /// Build batch `g` of this rank from the epoch plan (docs/architecture.md, "Row → arrays").
    pub fn batch(&self, plan: &Plan, g: usize) -> Result<Batch> {
        let (b, t) = (self.cfg.batch_size, self.cfg.seq_len);
        let mut out = Batch {
            input_ids: vec![self.pad as i64; b * t],
            labels: vec![-100; b * t],
            loss_weights: vec![0.0; b * t],
            position_ids: vec![0; b * t],
        };
        let mut ids = Vec::with_capacity(t + 1);
        let mut classes = Vec::with_capacity(t + 1);
        let mut pos = Vec::with_capacity(t + 1);
        let rows = pack::batch_rows(g, b, self.cfg.rank, self.cfg.world_size);
        for (i, r) in rows.enumerate() {
            if r >= plan.num_rows() {
                continue; // an empty row fills the last global batch
            }
            ids.clear();
            classes.clear();
            pos.clear();
            for p in plan.row(r) {
                let (s, local) = self.locate(p.doc);
                self.stores[s].read(local, p.start as u64, p.len as u64, &mut ids, &mut classes)?;
                pos.extend(0..p.len as i64);
            }
            let o = i * t;
            for k in 0..t.min(ids.len()) {
                out.input_ids[o + k] = ids[k] as i64;
                out.position_ids[o + k] = pos[k];
                if k + 1 < ids.len() && classes[k + 1] != UNTRAINED {
                    out.labels[o + k] = ids[k + 1] as i64;
                    out.loss_weights[o + k] = class_weight(classes[k + 1], self.cfg.think_weight);
                }
            }
        }
        Ok(out)
    }

    /// Documents in this loader's split.
    pub fn num_docs(&self) -> usize {
        self.lens.len()
    }

    /// The global indices (contracts.md §3) of this split's documents, ascending.
    pub fn split_documents(&self) -> Vec<u32> {
        match &self.split_docs {
            Some(d) => d.clone(),
            None => (0..self.lens.len() as u32).collect(),
        }
    }

    /// Tokens of this split's documents as encoded, before truncation (chat) or the dropped
    /// tail (text).
    pub fn total_tokens(&self) -> u64 {
        self.lens.iter().sum()
    }

    pub fn truncated(&self) -> usize {
        match self.cfg.kind {
            Kind::Text => 0,
            _ => self.lens.iter().filter(|&&l| l > self.row_len()).count(),
        }
    }

    pub fn skipped(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for s in &self.stores {
            for (k, v) in &s.meta.skipped {
                *out.entry(k.clone()).or_default() += v;
            }
        }
        out
    }
}

/// Keep the documents of `cfg.split` (contracts.md §3 "Validation split"): with `holdout = 0`
/// every document is in `train` and nothing is selected (so all stays as it was without the
/// option). Otherwise both splits must hold a document.
fn select_split(cfg: &LoaderConfig, lens: Vec<u64>) -> Result<(Option<Vec<u32>>, Vec<u64>)> {
    if cfg.holdout == 0.0 && cfg.split == Split::Train {
        return Ok((None, lens));
    }
    let val = pack::split_documents(lens.len(), cfg.seed, cfg.holdout, true);
    let (n_val, n_train) = (val.len(), lens.len() - val.len());
    if n_val == 0 || n_train == 0 {
        return Err(DataError::Config(format!(
            "--val-split {} (holdout) leaves {n_train} training and {n_val} validation \
             documents; use a larger fraction or more data",
            cfg.holdout
        )));
    }
    let docs = match cfg.split {
        Split::Val => val,
        Split::Train => pack::split_documents(lens.len(), cfg.seed, cfg.holdout, false),
    };
    let split_lens = docs.iter().map(|&d| lens[d as usize]).collect();
    Ok((Some(docs), split_lens))
}

fn fingerprint(cfg: &LoaderConfig, stores: &[DocStore], tok: &ChatTokenizer) -> String {
    let mut h = Sha256::new();
    for s in stores {
        let src = &s.meta.source;
        h.update(format!(
            "{}|{}|{};",
            src.path.display(),
            src.size,
            src.mtime_ns
        ));
    }
    h.update(format!(
        "tok={} tpl={} kind={:?} T={} B={} seed={} rank={} world={} tw={} skip={}",
        tok.cache_identity(),
        TEMPLATE_VERSION,
        cfg.kind,
        cfg.seq_len,
        cfg.batch_size,
        cfg.seed,
        cfg.rank,
        cfg.world_size,
        cfg.think_weight.to_bits(),
        cfg.skip_bad
    ));
    // Only with a hold-out, so that fingerprints without one are those of before the option.
    if cfg.holdout != 0.0 || cfg.split != Split::Train {
        h.update(format!(
            " holdout={} split={}",
            cfg.holdout.to_bits(),
            cfg.split.name()
        ));
    }
    format!("{:x}", h.finalize())[..32].to_owned()
}

/// A thread that builds batches `[from, to)` of one epoch ahead of the consumer.
pub struct Prefetcher {
    pub rx: Receiver<Result<Batch>>,
    pub pid: u32,
    pub epoch: u64,
    pub next: usize,
    _handle: JoinHandle<()>,
}

impl Prefetcher {
    pub fn spawn(
        loader: Arc<Loader>,
        plan: Arc<Plan>,
        epoch: u64,
        from: usize,
        to: usize,
        depth: usize,
    ) -> Result<Prefetcher> {
        let (tx, rx) = bounded(depth.max(1));
        let handle = std::thread::Builder::new()
            .name("spongebob-prefetch".into())
            .spawn(move || {
                for g in from..to {
                    let b = loader.batch(&plan, g);
                    let failed = b.is_err();
                    // A send fails once the consumer is gone: stop quietly.
                    if tx.send(b).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| DataError::io("<prefetch thread>", e))?;
        Ok(Prefetcher {
            rx,
            pid: std::process::id(),
            epoch,
            next: from,
            _handle: handle,
        })
    }
}

/// Version of the resume state's layout (`LoaderState`).
pub const STATE_VERSION: u32 = 1;

/// Where a loader stands (contracts.md §3 "State"): batches handed out in `epoch`, and the
/// fingerprint of the configuration that produced them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderState {
    pub version: u32,
    pub epoch: u64,
    pub batches: usize,
    pub fingerprint: String,
}

/// A loader's position with its prefetch thread: the batches of the current epoch in order,
/// then the next epoch. `next_batch` blocks; the binding calls it with the GIL released.
pub struct Cursor {
    loader: Arc<Loader>,
    epoch: u64,
    pos: usize,
    plan: Option<(u64, Arc<Plan>)>,
    prefetch: Option<Prefetcher>,
    depth: usize,
}

impl Cursor {
    /// At the start of epoch 0; `depth` batches are built ahead.
    pub fn new(loader: Arc<Loader>, depth: usize) -> Self {
        Cursor {
            loader,
            epoch: 0,
            pos: 0,
            plan: None,
            prefetch: None,
            depth,
        }
    }

    pub fn loader(&self) -> &Loader {
        &self.loader
    }

    /// The plan of the current epoch (built once per epoch).
    pub fn plan(&mut self) -> Arc<Plan> {
        if let Some((e, p)) = &self.plan {
            if *e == self.epoch {
                return p.clone();
            }
        }
        let plan = Arc::new(self.loader.plan(self.epoch));
        self.plan = Some((self.epoch, plan.clone()));
        plan
    }

    /// Batches this rank gets in the current epoch.
    pub fn batches_per_epoch(&mut self) -> usize {
        let plan = self.plan();
        self.loader.batches_in(&plan)
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

    /// The next batch of the current epoch, or `None` at its end (the position then moves
    /// to the start of the next epoch).
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        let plan = self.plan();
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
        let got = self.prefetch.as_ref().expect("set above").rx.recv();
        let batch = match got {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                // The thread stops after an error: drop it so the next call starts afresh.
                self.drop_prefetch();
                return Err(e);
            }
            Err(_) => {
                self.drop_prefetch();
                return Err(DataError::Config("the prefetch thread stopped".into()));
            }
        };
        self.prefetch.as_mut().expect("set above").next += 1;
        self.pos += 1;
        Ok(Some(batch))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Move to the start of `epoch`.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.drop_prefetch();
        self.epoch = epoch;
        self.pos = 0;
    }

    pub fn state(&self) -> LoaderState {
        LoaderState {
            version: STATE_VERSION,
            epoch: self.epoch,
            batches: self.pos,
            fingerprint: self.loader.fingerprint.clone(),
        }
    }

    /// Resume at `state`; refused (and the position kept) if it comes from another
    /// configuration or another state layout.
    pub fn load_state(&mut self, state: &LoaderState) -> Result<()> {
        if state.fingerprint != self.loader.fingerprint {
            return Err(DataError::Config(
                "loader state comes from a different configuration (files, tokenizer, seq_len, \
                 batch size, seed, rank, world size, think_weight, bad-line policy, holdout or \
                 split differ)"
                    .into(),
            ));
        }
        if state.version != STATE_VERSION {
            return Err(DataError::Config(format!(
                "unknown loader state version {}",
                state.version
            )));
        }
        self.drop_prefetch();
        self.epoch = state.epoch;
        self.pos = state.batches;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{chat_lines, text_lines, tiny_tokenizer, write_lines};

    struct Data {
        _dir: tempfile::TempDir,
        tok: ChatTokenizer,
        text: Vec<PathBuf>,
        chat: Vec<PathBuf>,
    }

    fn data() -> Data {
        let dir = tempfile::tempdir().unwrap();
        let (tok, _) = tiny_tokenizer(&dir.path().join("tok"), true);
        let d = dir.path();
        Data {
            tok,
            text: vec![
                write_lines(&d.join("a.jsonl"), &text_lines(30, 0)),
                write_lines(&d.join("b.jsonl"), &text_lines(20, 3)),
            ],
            chat: vec![write_lines(&d.join("c.jsonl"), &chat_lines(40))],
            _dir: dir,
        }
    }

    fn config(d: &Data, kind: Kind) -> LoaderConfig {
        let (paths, seq_len) = match kind {
            Kind::Text => (d.text.clone(), 16),
            _ => (d.chat.clone(), 96),
        };
        let mut cfg = LoaderConfig::new(paths, kind, seq_len, 2);
        cfg.seed = 5;
        cfg.think_weight = 3.0;
        cfg
    }

    fn open(d: &Data, cfg: LoaderConfig) -> Result<Arc<Loader>> {
        Loader::new(cfg, &d.tok, &AtomicBool::new(false)).map(Arc::new)
    }

    fn take(c: &mut Cursor, k: usize) -> Vec<Batch> {
        (0..k).map(|_| c.next_batch().unwrap().unwrap()).collect()
    }

    /// The rest of the current epoch.
    fn drain(c: &mut Cursor) -> Vec<Batch> {
        std::iter::from_fn(|| c.next_batch().unwrap()).collect()
    }

    #[test]
    fn a_state_round_trip_resumes_with_exactly_the_following_batches() {
        let d = data();
        for kind in [Kind::Text, Kind::Chat] {
            let mut cfg = config(&d, kind);
            cfg.rank = 1;
            cfg.world_size = 2;
            let mut whole = Cursor::new(open(&d, cfg.clone()).unwrap(), 2);
            let epoch0 = drain(&mut whole);
            assert_eq!(whole.state().epoch, 1);
            let epoch1 = drain(&mut whole);
            assert!(epoch0.len() >= 4, "{kind:?}: {} batches", epoch0.len());
            assert_ne!(epoch0, epoch1, "epochs are reshuffled");
            for k in [0, 1, epoch0.len() / 2, epoch0.len() - 1, epoch0.len()] {
                let mut first = Cursor::new(open(&d, cfg.clone()).unwrap(), 2);
                assert_eq!(take(&mut first, k), epoch0[..k]);
                let state = first.state();
                assert_eq!((state.epoch, state.batches), (0, k));
                // A fresh loader of the same configuration (a new process) takes over.
                let mut resumed = Cursor::new(open(&d, cfg.clone()).unwrap(), 3);
                resumed.load_state(&state).unwrap();
                assert_eq!(drain(&mut resumed), epoch0[k..], "{kind:?} resumed at {k}");
                assert_eq!(drain(&mut resumed), epoch1, "{kind:?} then the next epoch");
            }
            // Mid-way through a later epoch, and on the same cursor.
            let mut c = Cursor::new(open(&d, cfg.clone()).unwrap(), 1);
            c.set_epoch(1);
            take(&mut c, 2);
            let state = c.state();
            assert_eq!((state.epoch, state.batches), (1, 2));
            take(&mut c, 1);
            c.load_state(&state).unwrap();
            assert_eq!(drain(&mut c), epoch1[2..]);
        }
    }

    #[test]
    fn a_state_of_another_configuration_or_version_is_refused_without_moving() {
        let d = data();
        let base = config(&d, Kind::Text);
        let mut c = Cursor::new(open(&d, base.clone()).unwrap(), 2);
        take(&mut c, 2);
        let state = c.state();
        let others: Vec<(&str, LoaderConfig)> = vec![
            (
                "seed",
                LoaderConfig {
                    seed: 6,
                    ..base.clone()
                },
            ),
            (
                "seq_len",
                LoaderConfig {
                    seq_len: 17,
                    ..base.clone()
                },
            ),
            (
                "batch",
                LoaderConfig {
                    batch_size: 3,
                    ..base.clone()
                },
            ),
            (
                "world",
                LoaderConfig {
                    world_size: 2,
                    ..base.clone()
                },
            ),
            (
                "think_weight",
                LoaderConfig {
                    think_weight: 1.0,
                    ..base.clone()
                },
            ),
            (
                "skip",
                LoaderConfig {
                    skip_bad: true,
                    ..base.clone()
                },
            ),
            (
                "files",
                LoaderConfig {
                    paths: d.text[..1].to_vec(),
                    ..base.clone()
                },
            ),
            (
                "holdout",
                LoaderConfig {
                    holdout: 0.25,
                    ..base.clone()
                },
            ),
            (
                "val",
                LoaderConfig {
                    holdout: 0.25,
                    split: Split::Val,
                    ..base.clone()
                },
            ),
        ];
        let mut prints = vec![c.loader().fingerprint.clone()];
        for (what, cfg) in others {
            let mut other = Cursor::new(open(&d, cfg).unwrap(), 2);
            take(&mut other, 1);
            match other.load_state(&state) {
                Err(DataError::Config(m)) => assert!(m.contains("different configuration"), "{m}"),
                r => panic!("{what}: expected a refusal, got {r:?}"),
            }
            assert_eq!(
                other.state().batches,
                1,
                "{what}: a refused state changes nothing"
            );
            prints.push(other.loader().fingerprint.clone());
        }
        let distinct: std::collections::BTreeSet<_> = prints.iter().collect();
        assert_eq!(distinct.len(), prints.len(), "every fingerprint differs");
        let mut same = Cursor::new(open(&d, base.clone()).unwrap(), 2);
        let future = LoaderState {
            version: STATE_VERSION + 1,
            ..state.clone()
        };
        assert!(
            matches!(same.load_state(&future), Err(DataError::Config(m)) if m.contains("version"))
        );
        same.load_state(&state).unwrap();
        assert_eq!(same.state(), state);
    }

    #[test]
    fn the_two_splits_partition_the_documents() {
        let d = data();
        for kind in [Kind::Text, Kind::Chat] {
            let all = open(&d, config(&d, kind)).unwrap();
            let n = all.num_docs();
            let split = |split, holdout| {
                open(
                    &d,
                    LoaderConfig {
                        holdout,
                        split,
                        ..config(&d, kind)
                    },
                )
                .unwrap()
            };
            let (train, val) = (split(Split::Train, 0.3), split(Split::Val, 0.3));
            let (t, v) = (train.split_documents(), val.split_documents());
            assert_eq!(t, pack::split_documents(n, 5, 0.3, false));
            assert_eq!(v, pack::split_documents(n, 5, 0.3, true));
            assert!(!t.is_empty() && !v.is_empty());
            let mut both: Vec<u32> = t.iter().chain(&v).copied().collect();
            both.sort();
            assert_eq!(both, (0..n as u32).collect::<Vec<_>>());
            assert_eq!(train.num_docs() + val.num_docs(), n);
            assert_eq!(
                train.total_tokens() + val.total_tokens(),
                all.total_tokens()
            );
            // A document of the split is read from its own place in the files.
            let (s, local) = val.locate(0);
            let (s2, local2) = all.locate(v[0]);
            assert_eq!((s, local), (s2, local2));
            // holdout = 0 is the loader without the option.
            let zero = split(Split::Train, 0.0);
            assert_eq!(zero.fingerprint, all.fingerprint);
            assert_eq!(zero.split_documents(), (0..n as u32).collect::<Vec<_>>());
        }
    }

    #[test]
    fn bad_holdouts_splits_and_empty_splits_are_errors() {
        let d = data();
        let cfg = |holdout, split| LoaderConfig {
            holdout,
            split,
            ..config(&d, Kind::Text)
        };
        for h in [-0.1, 1.0, 1.5, f64::NAN, f64::INFINITY] {
            match open(&d, cfg(h, Split::Train)) {
                Err(DataError::Config(m)) => assert!(m.contains("must be in [0, 1)"), "{m}"),
                r => panic!("holdout {h}: {:?}", r.err()),
            }
        }
        assert!(
            matches!(Split::parse("test"), Err(DataError::Config(m)) if m.contains("\"test\""))
        );
        for (h, split) in [
            (1e-12, Split::Train),
            (1e-12, Split::Val),
            (0.0, Split::Val),
        ] {
            match open(&d, cfg(h, split)) {
                Err(DataError::Config(m)) => assert!(
                    m.contains(&format!(
                        "--val-split {h} (holdout) leaves 50 training and 0 validation documents"
                    )),
                    "{m}"
                ),
                r => panic!("{h} {split:?}: {:?}", r.err()),
            }
        }
        let nearly_all = 1.0 - 1e-12;
        match open(&d, cfg(nearly_all, Split::Val)) {
            Err(DataError::Config(m)) => {
                assert!(m.contains("leaves 0 training and 50 validation"), "{m}")
            }
            r => panic!("{:?}", r.err()),
        }
    }
}
