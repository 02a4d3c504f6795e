//! The packed loader: caches for every file, the epoch plan, and batches built on a prefetch
//! thread. Python sees it through `spongebob.data.PackedDataset`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};
use sha2::{Digest, Sha256};

use crate::cache::{DocStore, Workers};
use crate::error::{DataError, Result};
use crate::jsonl::Kind;
use crate::pack::{self, Plan};
use crate::tokenizer::{class_weight, ChatTokenizer, TEMPLATE_VERSION, UNTRAINED};

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
        Ok(())
    }
}

/// One batch, row-major [B, T].
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
        let fingerprint = fingerprint(&cfg, &stores, tok);
        Ok(Loader {
            cfg,
            stores,
            doc_start,
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

    fn locate(&self, doc: u32) -> (usize, usize) {
        let d = doc as usize;
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

    pub fn num_docs(&self) -> usize {
        self.lens.len()
    }

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
        tok.hash(),
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
