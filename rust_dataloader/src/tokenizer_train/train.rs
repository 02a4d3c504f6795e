//! One bounded training run: read the jsonl texts, count them within the budget, then train
//! with the `tokenizers` crate's own BPE trainer.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use ahash::AHashMap;
use compact_str::CompactString;
use rayon::prelude::*;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use super::counts::{BigramSketch, CostModel, LocalCounts, PieceTable};
use super::pretokenize::split_re;
use crate::error::{DataError, Result};
use crate::jsonl::Texts;

/// Options of one bounded training run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub vocab_size: usize,
    pub special_tokens: Vec<String>,
    /// Peak resident memory the whole process should stay under, in bytes.
    pub max_memory: u64,
    pub skip_bad: bool,
    /// 0 = all available cores.
    pub num_threads: usize,
    /// Text per counting batch.
    pub chunk_bytes: usize,
    /// After a prune the estimate is at most this fraction of the table budget.
    pub prune_to: f64,
    pub model: CostModel,
}

impl TrainConfig {
    pub fn new(vocab_size: usize, special_tokens: Vec<String>, max_memory: u64) -> Self {
        TrainConfig {
            vocab_size,
            special_tokens,
            max_memory,
            skip_bad: false,
            num_threads: 0,
            chunk_bytes: 4 << 20,
            prune_to: 0.5,
            model: CostModel::default(),
        }
    }
}

/// Memory the run needs besides the table: reader/counting buffers, `do_train`'s pair counts,
/// merge queue and vocabulary, thread stacks.
pub const RESERVE_BYTES: u64 = 96 << 20;
/// The smallest table budget accepted (it must hold at least every distinct character).
pub const MIN_TABLE_BYTES: u64 = 32 << 20;
/// What the process is assumed to hold already (interpreter, libraries). The budget is
/// computed from this, not from the RSS measured now, so that the same data and flags give the
/// same tokenizer; only a process bigger than this gets a smaller budget.
pub const BASE_ALLOWANCE: u64 = 128 << 20;

/// What a run did, for the log and the benchmark.
#[derive(Debug, Default, Clone)]
pub struct TrainStats {
    pub records: u64,
    pub bytes: u64,
    pub pieces: u64,
    pub skipped: BTreeMap<&'static str, u64>,
    pub base_rss: u64,
    pub table_budget: u64,
    pub sketch_bytes: u64,
    pub prunes: u64,
    pub prune_rounds: u64,
    pub cut: u64,
    pub max_threshold: u64,
    pub entries: u64,
    pub table_cost: u64,
    pub words: u64,
    pub count_secs: f64,
    pub train_secs: f64,
    pub threads: usize,
}

/// The trained model as `tokenizers` serialises it (`{"type": "BPE", "vocab": …, "merges": …}`).
#[derive(Debug)]
pub struct TrainOutput {
    pub model_json: String,
    pub stats: TrainStats,
}

/// The cap when none is asked for: 2 GiB, or 1 GiB above what the process holds if that is
/// more (a big host process, e.g. one that imported torch, still gets a working budget).
pub fn default_max_memory() -> u64 {
    (2u64 << 30).max(current_rss() + (1 << 30))
}

/// Resident set size of this process now (0 where /proc is not there).
pub fn current_rss() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(4096) as u64
}

/// Parse a size like "2GB", "512MB", "1.5G", "300M", "1000000" (bytes). Units are binary.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || DataError::Config(format!("bad memory size {s:?} (e.g. \"2GB\", \"512MB\")"));
    let x: f64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    if !x.is_finite() || x <= 0.0 {
        return Err(bad());
    }
    Ok((x * mult as f64) as u64)
}

/// Reads the texts of jsonl files (text records and chat contents, like `TextStream`) in
/// batches of about `chunk_bytes`, and sends them on `tx`.
fn read_texts(
    paths: &[PathBuf],
    skip_bad: bool,
    chunk_bytes: usize,
    tx: crossbeam_channel::Sender<Result<Vec<String>>>,
    stats: &mut TrainStats,
) {
    let mut texts = Texts::new(paths.to_vec(), skip_bad);
    let mut batch = Vec::new();
    let mut size = 0;
    loop {
        match texts.next_record() {
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
            Ok(None) => break,
            Ok(Some(record)) => {
                size += record.iter().map(|t| t.len()).sum::<usize>();
                batch.extend(record);
            }
        }
        if size >= chunk_bytes {
            size = 0;
            if tx.send(Ok(std::mem::take(&mut batch))).is_err() {
                return; // the consumer stopped (it failed)
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.send(Ok(batch));
    }
    stats.records = texts.records;
    stats.bytes = texts.bytes;
    stats.skipped = texts.skipped;
}

/// Count the pre-tokens of `paths` within the budget of `cfg` (the counting phase alone).
pub fn count_pieces(
    paths: &[PathBuf],
    cfg: &TrainConfig,
    pool: &rayon::ThreadPool,
    stats: &mut TrainStats,
) -> Result<PieceTable> {
    let re = split_re()?;
    let mut table = PieceTable::new(cfg.model, stats.sketch_bytes);
    let limit = stats.table_budget;
    let target = (limit as f64 * cfg.prune_to) as u64;
    let threads = pool.current_num_threads().max(1);
    let mut read_stats = TrainStats::default();
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let reader = scope.spawn(|| {
            read_texts(paths, cfg.skip_bad, cfg.chunk_bytes, tx, &mut read_stats);
        });
        let mut result = Ok(());
        for batch in rx.iter() {
            let batch: Vec<String> = match batch {
                Ok(b) => b,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let texts: Vec<&str> = batch.iter().map(|s| s.as_str()).collect();
            let per = texts.len().div_ceil(threads * 4).max(1);
            let locals: Vec<LocalCounts> =
                pool.install(|| texts.par_chunks(per).map(|c| table.count(re, c)).collect());
            stats.pieces += locals.iter().map(|l| l.pieces).sum::<u64>();
            pool.install(|| table.merge(locals));
            if table.cost() > limit {
                let r = pool.install(|| table.prune(target));
                stats.prunes += 1;
                stats.prune_rounds += r.rounds as u64;
                stats.cut += r.cut;
                stats.max_threshold = stats.max_threshold.max(r.threshold);
            }
        }
        drop(rx);
        reader
            .join()
            .map_err(|_| DataError::Config("the jsonl reader thread panicked".into()))?;
        result
    })?;
    stats.records = read_stats.records;
    stats.bytes = read_stats.bytes;
    stats.skipped = read_stats.skipped;
    if stats.records == 0 {
        return Err(DataError::Config("no records to train on".into()));
    }
    Ok(table)
}

/// Train a byte-level BPE (ByteLevel alphabet, specials first) on a word-count table.
pub fn train_on_counts(
    words: &AHashMap<CompactString, u64>,
    vocab_size: usize,
    special_tokens: &[String],
) -> Result<BPE> {
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let trainer = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(0)
        .show_progress(false)
        .special_tokens(
            special_tokens
                .iter()
                .map(|t| AddedToken::from(t.clone(), true))
                .collect(),
        )
        .initial_alphabet(alphabet)
        .build();
    let mut model = BPE::default();
    trainer
        .do_train(words, &mut model)
        .map_err(|e| DataError::Config(format!("BPE training failed: {e}")))?;
    Ok(model)
}

/// The whole bounded run: count within the budget, then train.
pub fn train_bounded(paths: &[PathBuf], cfg: &TrainConfig) -> Result<TrainOutput> {
    if paths.is_empty() {
        return Err(DataError::Config("no data files given".into()));
    }
    let min_vocab = 256 + cfg.special_tokens.len();
    if cfg.vocab_size < min_vocab {
        return Err(DataError::Config(format!(
            "vocab size {} is below 256 bytes + {} specials",
            cfg.vocab_size,
            cfg.special_tokens.len()
        )));
    }
    let mut stats = TrainStats {
        base_rss: current_rss(),
        ..Default::default()
    };
    let base = stats
        .base_rss
        .max(BASE_ALLOWANCE)
        .next_multiple_of(64 << 20);
    let floor = base + RESERVE_BYTES + MIN_TABLE_BYTES;
    if cfg.max_memory < floor {
        return Err(DataError::Config(format!(
            "max memory {} MB is too small: {} MB go to this process as it is, and training \
             needs {} MB more at least (ask for {} MB or more)",
            cfg.max_memory >> 20,
            base >> 20,
            (RESERVE_BYTES + MIN_TABLE_BYTES) >> 20,
            floor.div_ceil(1 << 20)
        )));
    }
    let budget = cfg.max_memory - base - RESERVE_BYTES;
    stats.sketch_bytes = BigramSketch::new((budget / 32).clamp(1 << 20, 64 << 20)).bytes();
    stats.table_budget = budget - stats.sketch_bytes;
    let threads = if cfg.num_threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cfg.num_threads
    };
    stats.threads = threads;
    // An owned pool: rayon's global pool hangs in forked children (rayon #708).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("spongebob-bpe-{i}"))
        .build()
        .map_err(|e| DataError::Config(format!("thread pool: {e}")))?;

    let t0 = Instant::now();
    let table = count_pieces(paths, cfg, &pool, &mut stats)?;
    stats.entries = table.len() as u64;
    stats.table_cost = table.cost();
    stats.count_secs = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let words = table.into_word_counts();
    stats.words = words.len() as u64;
    // `do_train`'s parallel loops run on the pool that calls them: ours.
    let model = pool.install(|| train_on_counts(&words, cfg.vocab_size, &cfg.special_tokens))?;
    drop(words);
    stats.train_secs = t1.elapsed().as_secs_f64();
    let model_json = serde_json::to_string(&model)
        .map_err(|e| DataError::Config(format!("serialising the BPE model: {e}")))?;
    Ok(TrainOutput { model_json, stats })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::SPECIAL_TOKENS;
    use crate::tokenizer_train::counts::corpus;
    use crate::tokenizer_train::pretokenize::{byte_level, pretokenize};
    use std::io::Write;

    #[test]
    fn parse_sizes() {
        assert_eq!(parse_size("2GB").unwrap(), 2 << 30);
        assert_eq!(parse_size("512MB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size(" 300 M ").unwrap(), 300 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(default_max_memory() >= 2 << 30);
        for bad in ["", "GB", "-1GB", "2XB", "0"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    fn write_jsonl(dir: &std::path::Path, name: &str, lines: &[String]) -> PathBuf {
        let p = dir.join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        for l in lines {
            writeln!(f, "{l}").unwrap();
        }
        p
    }

    fn specials() -> Vec<String> {
        SPECIAL_TOKENS.map(String::from).to_vec()
    }

    fn model_of(json: &str) -> serde_json::Value {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn bounded_equals_plain_when_the_corpus_fits_and_stays_valid_when_it_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let docs = corpus(300);
        let lines: Vec<String> = docs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                if i % 2 == 0 {
                    serde_json::json!({ "text": format!("<s>{d}</s>") }).to_string()
                } else {
                    serde_json::json!({ "conversations": [
                        {"role": "user", "content": d},
                        {"role": "assistant", "content": "好的，我明白了。"}]})
                    .to_string()
                }
            })
            .collect();
        let path = write_jsonl(dir.path(), "c.jsonl", &lines);

        // Reference: exact counts of the same texts, trained directly.
        let mut texts: Vec<String> = Vec::new();
        for (i, d) in docs.iter().enumerate() {
            texts.push(d.clone());
            if i % 2 == 1 {
                texts.push("好的，我明白了。".into());
            }
        }
        let mut exact: AHashMap<CompactString, u64> = AHashMap::new();
        for t in &texts {
            pretokenize(split_re().unwrap(), t, |p| {
                *exact.entry(byte_level(p)).or_default() += 1
            });
        }
        let reference = train_on_counts(&exact, 600, &specials()).unwrap();
        let reference = serde_json::to_value(&reference).unwrap();

        let base = current_rss();
        let mut cfg = TrainConfig::new(600, specials(), base + (4 << 30));
        cfg.num_threads = 2;
        cfg.chunk_bytes = 1000; // many batches
        let out = train_bounded(std::slice::from_ref(&path), &cfg).unwrap();
        assert_eq!(out.stats.prunes, 0);
        assert_eq!(out.stats.records, 300);
        assert_eq!(model_of(&out.model_json), reference);

        // A budget of half the exact table: pruned, still a full vocabulary, specials first.
        let mut cfg = TrainConfig::new(600, specials(), 0);
        cfg.chunk_bytes = 1000;
        cfg.model = CostModel {
            per_entry: 1 << 16,
            per_byte: 1 << 10,
        };
        let exact_cost: u64 = exact.keys().map(|k| cfg.model.cost(k.len() / 2)).sum();
        assert!(exact_cost / 2 > MIN_TABLE_BYTES);
        cfg.max_memory = current_rss().max(BASE_ALLOWANCE).next_multiple_of(64 << 20)
            + RESERVE_BYTES
            + exact_cost / 2;
        let out = train_bounded(&[path], &cfg).unwrap();
        assert!(out.stats.prunes > 0 && out.stats.cut > 0);
        assert!(out.stats.table_cost <= out.stats.table_budget);
        let m = model_of(&out.model_json);
        let vocab = m["vocab"].as_object().unwrap();
        assert_eq!(vocab.len(), 600);
        for (i, s) in specials().iter().enumerate() {
            assert_eq!(vocab[s.as_str()], i);
        }
    }

    #[test]
    fn bad_lines_and_small_budgets_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = serde_json::json!({"text": "你好"}).to_string();
        let path = write_jsonl(
            dir.path(),
            "bad.jsonl",
            &[good.clone(), "{oops".into(), good],
        );
        let cfg = TrainConfig::new(300, specials(), 8 << 30);
        match train_bounded(std::slice::from_ref(&path), &cfg) {
            Err(DataError::BadLine { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected a bad line, got {:?}", other.err()),
        }
        let mut skip = cfg.clone();
        skip.skip_bad = true;
        let out = train_bounded(std::slice::from_ref(&path), &skip).unwrap();
        assert_eq!(out.stats.records, 2);
        assert_eq!(out.stats.skipped.get("invalid_json"), Some(&1));

        let missing = dir.path().join("missing.jsonl");
        assert!(matches!(
            train_bounded(&[missing], &cfg),
            Err(DataError::Io { .. })
        ));
        let tiny = TrainConfig::new(300, specials(), 1 << 20);
        let e = train_bounded(std::slice::from_ref(&path), &tiny).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        let small_vocab = TrainConfig::new(100, specials(), 8 << 30);
        assert!(train_bounded(&[path], &small_vocab).is_err());
    }
}
