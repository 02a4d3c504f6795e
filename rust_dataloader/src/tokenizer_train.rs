//! Bounded-memory byte-level BPE training (issue 7).
//!
//! Hugging Face's trainer keeps one entry per distinct pre-token and then, in `do_train`,
//! about 100–110 bytes of working state per byte of those pre-tokens (a 32-byte symbol per byte
//! in a doubling `Vec`, the pair → word-set index, the sets of pairs new merges create). On
//! Chinese a pre-token is a whole clause, so almost every one is distinct and the peak grows
//! with the corpus (measured: 75–100× its size).
//!
//! Here the pre-tokens (the exact split of the final tokenizer: digits alone, then the
//! ByteLevel/GPT-2 pattern) are counted in a sharded table whose *training* cost is estimated
//! entry by entry (`CostModel`). When the estimate passes the budget, the table is pruned: the
//! rarest entries (longest first) are cut in two at their weakest link — the adjacent-character
//! pair that a count-min sketch of all pairs rates lowest (a script boundary counts as weakest)
//! — and each part takes the whole count of its parent. Nothing is dropped: the byte mass Σ
//! count·len is invariant, every byte pair inside a character and every pair not at a cut keeps
//! its count, and since cuts fall between words (like an unsupervised segmenter's), the
//! frequent character pairs BPE merges into words are almost never the ones lost. Frequent
//! pieces (template phrases, common words) stay whole, as the plain trainer sees them; rare
//! clauses shrink to words that repeat. When the corpus fits the budget nothing is cut and the
//! result is the plain trainer's, merge for merge. Cutting at the middle instead cost 1.1 % of
//! compression at 50 MB under a 600 MB cap; weakest-link cuts, 0.1 %.
//!
//! The table is then turned into byte-level words and handed to the `tokenizers` crate's own
//! `BpeTrainer::do_train`, so the output is a standard BPE model. Counting is parallel over
//! documents (a reader thread parses jsonl while an owned rayon pool pre-tokenizes and counts),
//! and `do_train` runs inside the same pool. The result depends on the data and flags only:
//! not on the thread count, nor (below `BASE_ALLOWANCE`) on the process's memory at the call.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::LazyLock;
use std::time::Instant;

use ahash::AHashMap;
use compact_str::CompactString;
use rayon::prelude::*;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::utils::SysRegex;
use tokenizers::AddedToken;

use crate::error::{DataError, Result};
use crate::jsonl::{strip_document_markers, JsonlReader, Kind, Record};

/// The GPT-2 split of `tokenizers`' ByteLevel pre-tokenizer (byte_level.rs), same engine (onig).
/// `pretokenize_matches_byte_level` checks that the pieces agree with the crate's own.
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

static SPLIT_RE: LazyLock<std::result::Result<SysRegex, String>> =
    LazyLock::new(|| SysRegex::new(GPT2_PATTERN).map_err(|e| e.to_string()));

fn split_re() -> Result<&'static SysRegex> {
    SPLIT_RE
        .as_ref()
        .map_err(|e| DataError::Config(format!("pre-tokenizer regex: {e}")))
}

/// GPT-2's byte → printable char table (the one ByteLevel uses; private in the crate).
static BYTE_CHARS: LazyLock<[char; 256]> = LazyLock::new(|| {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            b as u32
        } else {
            n += 1;
            255 + n
        };
        table[b as usize] = char::from_u32(code).unwrap_or('\0');
    }
    table
});

/// The byte-level form of a piece (what the BPE model sees: one char per UTF-8 byte).
pub fn byte_level(piece: &str) -> CompactString {
    let mut s = CompactString::with_capacity(piece.len() * 2);
    for &b in piece.as_bytes() {
        s.push(BYTE_CHARS[b as usize]);
    }
    s
}

/// Calls `f` with each pre-token of `text`, as original text (not yet byte-level mapped).
/// The final tokenizer's pre-tokenizer is `Sequence[Digits(individual), ByteLevel]`: every
/// numeric character stands alone, and the text between them gets the GPT-2 split.
pub fn pretokenize<'t>(re: &SysRegex, text: &'t str, mut f: impl FnMut(&'t str)) {
    let mut seg = 0;
    for (i, c) in text.char_indices() {
        if c.is_numeric() {
            if i > seg {
                regex_split(re, &text[seg..i], &mut f);
            }
            seg = i + c.len_utf8();
            f(&text[i..seg]);
        }
    }
    if seg < text.len() {
        regex_split(re, &text[seg..], &mut f);
    }
}

fn regex_split<'t>(re: &SysRegex, text: &'t str, f: &mut impl FnMut(&'t str)) {
    let mut prev = 0;
    for (start, end) in re.find_iter(text) {
        if start > prev {
            f(&text[prev..start]);
        }
        if end > start {
            f(&text[start..end]);
        }
        prev = end;
    }
    if prev < text.len() {
        f(&text[prev..]);
    }
}

/// Han, kana, Hangul and CJK punctuation/fullwidth forms: the scripts written without spaces.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3000..=0x30FF      // CJK punctuation, hiragana, katakana
        | 0x3100..=0x31FF    // bopomofo, kanbun, katakana ext.
        | 0x3400..=0x4DBF    // Han ext. A
        | 0x4E00..=0x9FFF    // Han
        | 0xAC00..=0xD7AF    // Hangul syllables
        | 0xF900..=0xFAFF    // Han compatibility
        | 0xFF00..=0xFFEF    // fullwidth forms
        | 0x20000..=0x3FFFF) // Han ext. B–H
}

/// How often each pair of adjacent characters occurs inside pre-tokens: a count-min sketch
/// (fixed memory, never under-counts, shared by the counting threads).
pub struct BigramSketch {
    cells: Vec<AtomicU32>,
    mask: u64,
}

const SKETCH_ROWS: usize = 4;

impl BigramSketch {
    /// About `bytes` of counters (rounded down to a power of two per row, at least 1024).
    pub fn new(bytes: u64) -> Self {
        let per_row = (bytes / (4 * SKETCH_ROWS as u64)).max(1024);
        let width = 1u64 << (63 - per_row.leading_zeros());
        BigramSketch {
            cells: (0..width as usize * SKETCH_ROWS)
                .map(|_| AtomicU32::new(0))
                .collect(),
            mask: width - 1,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.cells.len() as u64 * 4
    }

    #[inline]
    fn slots(&self, a: char, b: char) -> [usize; SKETCH_ROWS] {
        // splitmix64 of the pair, then double hashing across the rows.
        let mut h = ((a as u64) << 32 | b as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
        h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^= h >> 31;
        let (h1, h2) = (h & 0xFFFF_FFFF, (h >> 32) | 1);
        let width = self.mask + 1;
        std::array::from_fn(|r| {
            (r as u64 * width + (h1.wrapping_add(r as u64 * h2) & self.mask)) as usize
        })
    }

    #[inline]
    pub fn add(&self, a: char, b: char) {
        for i in self.slots(a, b) {
            self.cells[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    #[inline]
    pub fn estimate(&self, a: char, b: char) -> u32 {
        self.slots(a, b)
            .iter()
            .map(|&i| self.cells[i].load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    /// Count every adjacent character pair of `piece`.
    pub fn add_piece(&self, piece: &str) {
        let mut it = piece.chars();
        if let Some(mut prev) = it.next() {
            for c in it {
                self.add(prev, c);
                prev = c;
            }
        }
    }
}

/// Where a pruned piece is cut (a byte offset strictly inside it), or `None` for one character.
///
/// At its weakest link: the boundary whose character pair `strength` rates lowest (a boundary
/// between CJK and other text rates 0), so that words and frequent phrases stay whole, as an
/// unsupervised word segmenter would keep them. Candidates are the boundaries in the middle
/// half (each part is at most ¾ of the piece, so a piece is down to characters after a few
/// cuts) and script boundaries anywhere; ties go to the boundary nearest the middle. A leading
/// space stays with the character after it.
pub fn cut_point(piece: &str, strength: impl Fn(char, char) -> u32) -> Option<usize> {
    let chars: Vec<(usize, char)> = piece.char_indices().collect();
    let n = chars.len();
    if n < 2 {
        return None;
    }
    let quarter = n.div_ceil(4);
    let first = 1 + usize::from(chars[0].1 == ' ' && n > 2);
    let (lo, hi) = (quarter.max(first), (n - quarter).max(first).min(n - 1));
    let script = |i: usize| is_cjk(chars[i - 1].1) != is_cjk(chars[i].1);
    let i = (first..n)
        .filter(|&i| (lo..=hi).contains(&i) || script(i))
        .min_by_key(|&i| {
            let s = if script(i) {
                0
            } else {
                strength(chars[i - 1].1, chars[i].1)
            };
            (s, (2 * i).abs_diff(n))
        })
        .unwrap_or(n / 2);
    Some(chars[i].0)
}

/// Estimated peak bytes, during `do_train`, of one table entry of `len` bytes (original text).
/// Per word: a `Word`, its count, its byte-level key and hash slot; per byte: a 32-byte symbol
/// (in a `Vec` grown by doubling), the word's place in the pair → words index (whose two
/// halves coexist while the parallel count merges them), the sets of new pairs created by
/// merges, and the byte-level key. An upper bound fitted on measured peaks (VmHWM minus the RSS
/// before training) of six runs on 5–50 MB Chinese-heavy corpora, pruned and unpruned, with
/// 8–17 % to spare: the measured per byte was 100–110 at 20–33 bytes a word.
#[derive(Debug, Clone, Copy)]
pub struct CostModel {
    pub per_entry: u64,
    pub per_byte: u64,
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel {
            per_entry: 300,
            per_byte: 110,
        }
    }
}

impl CostModel {
    #[inline]
    pub fn cost(&self, len: usize) -> u64 {
        self.per_entry + self.per_byte * len as u64
    }
}

type Shard = AHashMap<CompactString, u64>;
/// Pieces bound for each shard.
type Routed = Vec<Vec<(CompactString, u64)>>;

/// Pre-token counts, sharded by a fixed hash so that merging and pruning run per shard.
pub struct PieceTable {
    shards: Vec<Shard>,
    hasher: ahash::RandomState,
    model: CostModel,
    cost: u64,
    bigrams: BigramSketch,
}

/// Counts of one batch of documents, already split by shard.
pub struct LocalCounts {
    shards: Vec<Shard>,
    pieces: u64,
}

/// What one prune did.
#[derive(Debug, Default, Clone, Copy)]
pub struct PruneReport {
    pub rounds: u32,
    pub cut: u64,
    pub threshold: u64,
}

const NUM_SHARDS: usize = 64;
/// Prune histogram: counts 0..=254 exactly (255 = more), lengths by 4 bytes up to 252.
const COUNT_BUCKETS: usize = 256;
const LEN_BUCKETS: usize = 64;

#[inline]
fn hist_slot(count: u64, len: usize) -> usize {
    (count as usize).min(COUNT_BUCKETS - 1) * LEN_BUCKETS + (len / 4).min(LEN_BUCKETS - 1)
}

/// Which pieces a prune round cuts: those in a lower count bucket than `count`, and those in
/// that bucket at least `min_len` length buckets long.
#[derive(Debug, Clone, Copy)]
struct CutRule {
    count: usize,
    min_len: usize,
}

impl CutRule {
    #[inline]
    fn applies(&self, count: u64, len: usize) -> bool {
        let cb = (count as usize).min(COUNT_BUCKETS - 1);
        cb < self.count || (cb == self.count && (len / 4).min(LEN_BUCKETS - 1) >= self.min_len)
    }
}

impl PieceTable {
    /// A table whose bigram sketch takes `sketch_bytes`.
    pub fn new(model: CostModel, sketch_bytes: u64) -> Self {
        PieceTable {
            bigrams: BigramSketch::new(sketch_bytes),
            shards: (0..NUM_SHARDS).map(|_| Shard::default()).collect(),
            // Fixed seeds: the shard of a piece (and so the whole run) is reproducible.
            hasher: ahash::RandomState::with_seeds(
                0x5350_4f4e_4745,
                0x424f_4221,
                0x746f_6b65_6e73,
                0x6973_7375_6537,
            ),
            model,
            cost: 0,
        }
    }

    #[inline]
    fn shard_of(&self, piece: &str) -> usize {
        (self.hasher.hash_one(piece) >> 32) as usize % NUM_SHARDS
    }

    /// Estimated `do_train` bytes of the table as it is.
    pub fn cost(&self) -> u64 {
        self.cost
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Σ count · len over all entries: invariant under pruning.
    pub fn byte_mass(&self) -> u64 {
        self.shards
            .iter()
            .flat_map(|s| s.iter())
            .map(|(k, c)| c * k.len() as u64)
            .sum()
    }

    pub fn get(&self, piece: &str) -> u64 {
        self.shards[self.shard_of(piece)]
            .get(piece)
            .copied()
            .unwrap_or(0)
    }

    /// Count the pre-tokens of `texts` (in the caller's pool).
    pub fn count(&self, re: &SysRegex, texts: &[&str]) -> LocalCounts {
        let mut local = LocalCounts {
            shards: (0..NUM_SHARDS).map(|_| Shard::default()).collect(),
            pieces: 0,
        };
        for text in texts {
            pretokenize(re, text, |piece| {
                local.pieces += 1;
                self.bigrams.add_piece(piece);
                let shard = &mut local.shards[self.shard_of(piece)];
                if let Some(c) = shard.get_mut(piece) {
                    *c += 1;
                } else {
                    shard.insert(CompactString::from(piece), 1);
                }
            });
        }
        local
    }

    /// Add counts into the table, shard by shard in parallel.
    pub fn merge(&mut self, locals: Vec<LocalCounts>) {
        let mut per_shard: Vec<Vec<Shard>> = (0..NUM_SHARDS).map(|_| Vec::new()).collect();
        for local in locals {
            for (i, m) in local.shards.into_iter().enumerate() {
                if !m.is_empty() {
                    per_shard[i].push(m);
                }
            }
        }
        let model = self.model;
        let added: u64 = self
            .shards
            .par_iter_mut()
            .zip(per_shard)
            .map(|(shard, maps)| {
                let mut added = 0;
                for m in maps {
                    for (k, c) in m {
                        added += add_to(shard, k, c, model);
                    }
                }
                added
            })
            .sum();
        self.cost += added;
    }

    /// Cut the lowest-count pieces until the estimate is at most `target` (or only single
    /// characters are left). Each cut piece's count goes to both of its halves.
    pub fn prune(&mut self, target: u64) -> PruneReport {
        let mut report = PruneReport::default();
        while self.cost > target && report.rounds < 256 {
            // Estimated cost of the multi-character entries, by count and length.
            let model = self.model;
            let hist = self
                .shards
                .par_iter()
                .fold(
                    || vec![0u64; COUNT_BUCKETS * LEN_BUCKETS],
                    |mut h, shard| {
                        for (k, &c) in shard {
                            if has_two_chars(k) {
                                h[hist_slot(c, k.len())] += model.cost(k.len());
                            }
                        }
                        h
                    },
                )
                .reduce(
                    || vec![0u64; COUNT_BUCKETS * LEN_BUCKETS],
                    |mut a, b| {
                        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                        a
                    },
                );
            // Cut in order of count (rarest first), then of length (longest first), until
            // the cut pieces' cost covers what must go.
            let need = self.cost - target;
            let mut freed = 0;
            let mut rule = None;
            'find: for cb in 0..COUNT_BUCKETS {
                for lb in (0..LEN_BUCKETS).rev() {
                    let h = hist[cb * LEN_BUCKETS + lb];
                    freed += h;
                    if h > 0 && freed >= need {
                        rule = Some(CutRule {
                            count: cb,
                            min_len: lb,
                        });
                        break 'find;
                    }
                }
            }
            let rule = match rule {
                Some(r) => r,
                None if freed > 0 => CutRule {
                    count: COUNT_BUCKETS,
                    min_len: 0,
                }, // cut every multi-character piece
                None => break, // single characters only: nothing to cut
            };
            // Take the pieces out, cut them, route the halves to their shards.
            let this = &*self;
            let taken: Vec<(Routed, u64, u64)> = self
                .shards
                .par_iter()
                .map(|shard| {
                    let mut out: Routed = (0..NUM_SHARDS).map(|_| Vec::new()).collect();
                    let (mut removed_cost, mut n) = (0, 0);
                    for (k, &c) in shard {
                        if rule.applies(c, k.len()) && has_two_chars(k) {
                            if let Some(at) = cut_point(k, |a, b| this.bigrams.estimate(a, b)) {
                                removed_cost += model.cost(k.len());
                                n += 1;
                                for half in [&k[..at], &k[at..]] {
                                    out[this.shard_of(half)].push((CompactString::from(half), c));
                                }
                            }
                        }
                    }
                    (out, removed_cost, n)
                })
                .collect();
            let mut to_shard: Vec<Routed> = (0..NUM_SHARDS).map(|_| Vec::new()).collect();
            for (out, removed_cost, n) in taken {
                self.cost -= removed_cost;
                report.cut += n;
                for (i, v) in out.into_iter().enumerate() {
                    if !v.is_empty() {
                        to_shard[i].push(v);
                    }
                }
            }
            let added: u64 = self
                .shards
                .par_iter_mut()
                .zip(to_shard)
                .map(|(shard, incoming)| {
                    shard.retain(|k, c| !(rule.applies(*c, k.len()) && has_two_chars(k)));
                    let mut added = 0;
                    for v in incoming {
                        for (k, c) in v {
                            added += add_to(shard, k, c, model);
                        }
                    }
                    added
                })
                .sum();
            self.cost += added;
            report.rounds += 1;
            report.threshold = report.threshold.max(rule.count as u64);
        }
        report
    }

    /// The byte-level word counts `BpeTrainer::do_train` takes (consumes the table shard by
    /// shard, so the two never both exist whole).
    pub fn into_word_counts(self) -> AHashMap<CompactString, u64> {
        let mut out = AHashMap::with_capacity(self.len());
        for shard in self.shards {
            for (k, c) in shard {
                *out.entry(byte_level(&k)).or_default() += c;
            }
        }
        out
    }
}

#[inline]
fn has_two_chars(s: &str) -> bool {
    s.chars().nth(1).is_some()
}

#[inline]
fn add_to(shard: &mut Shard, k: CompactString, c: u64, model: CostModel) -> u64 {
    if let Some(v) = shard.get_mut(&k) {
        *v += c;
        0
    } else {
        let cost = model.cost(k.len());
        shard.insert(k, c);
        cost
    }
}

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
    let mut batch = Vec::new();
    let mut size = 0;
    for path in paths {
        let reader = match JsonlReader::open(path, Kind::Auto) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        for item in reader {
            let (line, rec) = match item {
                Ok(x) => x,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let rec = match rec {
                Ok(r) => r,
                Err(reason) if skip_bad => {
                    *stats.skipped.entry(reason.code()).or_default() += 1;
                    continue;
                }
                Err(reason) => {
                    let _ = tx.send(Err(DataError::BadLine {
                        path: path.clone(),
                        line,
                        reason,
                    }));
                    return;
                }
            };
            stats.records += 1;
            match rec {
                Record::Text(t) => {
                    let t = strip_document_markers(&t);
                    size += t.len();
                    batch.push(t.to_owned());
                }
                Record::Chat(msgs) => {
                    for m in msgs {
                        size += m.content.len();
                        batch.push(m.content);
                    }
                }
            }
            if size >= chunk_bytes {
                stats.bytes += size as u64;
                size = 0;
                if tx.send(Ok(std::mem::take(&mut batch))).is_err() {
                    return; // the consumer stopped (it failed)
                }
            }
        }
    }
    stats.bytes += size as u64;
    if !batch.is_empty() {
        let _ = tx.send(Ok(batch));
    }
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

// ---------------------------------------------------------------------------------------------
// Python

mod py {
    use pyo3::prelude::*;
    use pyo3::types::PyDict;

    use super::*;

    /// Train a byte-level BPE on the texts of jsonl `paths` with the process's peak memory
    /// under `max_memory` (bytes, or a string such as "2GB"; `None`: `default_max_memory()`).
    /// Returns `(model_json, stats)`: the BPE model as `tokenizers` serialises it, and a dict
    /// of what the run did.
    #[pyfunction]
    #[pyo3(signature = (paths, vocab_size, special_tokens, max_memory = None,
                        on_bad_line = "error", num_threads = None, prune_to = None,
                        cost_per_entry = None, cost_per_byte = None))]
    #[allow(clippy::too_many_arguments)]
    pub fn train_bpe_bounded<'py>(
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
        let skip_bad = match on_bad_line {
            "error" => false,
            "skip" => true,
            _ => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "on_bad_line must be \"error\" or \"skip\", not {on_bad_line:?}"
                )))
            }
        };
        let mut cfg = TrainConfig::new(vocab_size, special_tokens, max_memory);
        cfg.skip_bad = skip_bad;
        cfg.num_threads = num_threads.unwrap_or(0);
        if let Some(p) = prune_to {
            if !(0.05..=0.95).contains(&p) {
                return Err(pyo3::exceptions::PyValueError::new_err(
                    "prune_to must be in [0.05, 0.95]",
                ));
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
}

pub use py::train_bpe_bounded;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    const SAMPLES: &[&str] = &[
        "",
        "hello world",
        "  leading and trailing  ",
        "你好，世界！这是一个测试。",
        "用Python编程很有趣，rust也是。",
        "It's 12.5% of 3,000,000 — don't panic!\n\n  tabs\there\r\n",
        "emoji 😀🎉 and ｆｕｌｌ ｗｉｄｔｈ ＡＢＣ",
        "数字123和english混合abc中文456",
        "1 + 29 = 30。 x12 ①②٣٤ ½",
        "<s>special</s> <think>tags</think>",
        "\u{0}\u{1f}控制字符\u{7f}",
        "こんにちは世界 안녕하세요 세계",
    ];

    fn crate_pieces(text: &str) -> Vec<String> {
        use tokenizers::pre_tokenizers::{digits::Digits, sequence::Sequence};
        use tokenizers::PreTokenizerWrapper;
        let mut pts = PreTokenizedString::from(text);
        Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ])
        .pre_tokenize(&mut pts)
        .unwrap();
        pts.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_owned())
            .collect()
    }

    fn our_pieces(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        pretokenize(split_re().unwrap(), text, |p| {
            out.push(byte_level(p).to_string())
        });
        out
    }

    #[test]
    fn pretokenize_matches_byte_level() {
        for s in SAMPLES {
            assert_eq!(our_pieces(s), crate_pieces(s), "{s:?}");
        }
        // And on pseudo-random mixtures of all of the above.
        let all: Vec<char> = SAMPLES.concat().chars().collect();
        let mut x = 12345u64;
        for _ in 0..300 {
            let mut s = String::new();
            for _ in 0..(x % 60) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                s.push(all[(x >> 33) as usize % all.len()]);
            }
            assert_eq!(our_pieces(&s), crate_pieces(&s), "{s:?}");
        }
    }

    #[test]
    fn byte_table_is_the_byte_level_alphabet() {
        let ours: HashSet<char> = BYTE_CHARS.iter().copied().collect();
        let theirs: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        assert_eq!(ours.len(), 256);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn cut_points() {
        let flat = |_: char, _: char| 5;
        assert_eq!(cut_point("", flat), None);
        assert_eq!(cut_point("中", flat), None);
        assert_eq!(cut_point("中文", flat), Some(3));
        assert_eq!(cut_point("中文字符", flat), Some(6)); // all equal: the middle
        assert_eq!(cut_point("中文字符串", flat), Some(6)); // 5 chars: after 2 (or 3)
                                                            // The weakest link in the middle half wins: 们|的 is weak, the words stay whole.
        let weak = |a: char, b: char| if (a, b) == ('们', '的') { 1 } else { 9 };
        let s = "我们的工作";
        assert_eq!(&s[..cut_point(s, weak).unwrap()], "我们");
        // …but not outside the middle half (a first-character cut would shrink slowly).
        let weak_edge = |a: char, _: char| if a == '我' { 0 } else { 9 };
        let s = "我们的工作很好";
        let at = cut_point(s, weak_edge).unwrap();
        assert!(s[..at].chars().count() >= 1 && s[at..].chars().count() >= 2);
        assert_ne!(&s[..at], "我");
        // A script boundary in range is the weakest link.
        let s = "用Python编程";
        assert_eq!(&s[..cut_point(s, flat).unwrap()], "用Python");
        // A leading space stays with the character after it.
        assert_eq!(cut_point(" 中", flat), Some(1));
        assert_eq!(cut_point(" 中文字", flat), Some(4));
        assert_eq!(cut_point(" hello", flat), Some(3));
    }

    #[test]
    fn sketch_never_undercounts() {
        let sk = BigramSketch::new(4096);
        let text: Vec<char> = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地"
            .chars()
            .collect();
        let mut exact: BTreeMap<(char, char), u32> = BTreeMap::new();
        let mut x = 3u64;
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let a = text[(x >> 33) as usize % text.len()];
            let b = text[(x >> 40) as usize % 5]; // a few frequent followers
            sk.add(a, b);
            *exact.entry((a, b)).or_default() += 1;
        }
        for (&(a, b), &c) in &exact {
            assert!(sk.estimate(a, b) >= c);
        }
        let sk = BigramSketch::new(1 << 20);
        sk.add_piece("你好你好");
        assert_eq!((sk.estimate('你', '好'), sk.estimate('好', '你')), (2, 1));
        assert_eq!(sk.estimate('好', '好'), 0);
    }

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

    fn naive_counts(texts: &[&str]) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for t in texts {
            pretokenize(split_re().unwrap(), t, |p| {
                *m.entry(p.to_owned()).or_default() += 1
            });
        }
        m
    }

    fn table_counts(t: &PieceTable) -> BTreeMap<String, u64> {
        t.shards
            .iter()
            .flat_map(|s| s.iter())
            .map(|(k, c)| (k.to_string(), *c))
            .collect()
    }

    pub(super) fn corpus(n: usize) -> Vec<String> {
        // Clauses of random characters: nearly all distinct, plus a repeated phrase.
        let chars: Vec<char> = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地"
            .chars()
            .collect();
        let mut x = 7u64;
        (0..n)
            .map(|i| {
                let mut s = String::new();
                for j in 0..20 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    s.push(chars[(x >> 33) as usize % chars.len()]);
                    if j % 7 == 6 {
                        s.push('，');
                    }
                }
                if i % 3 == 0 {
                    s.push_str("。我是一个人工智能助手。");
                }
                s.push_str(" and some English words");
                s
            })
            .collect()
    }

    #[test]
    fn counting_and_merging_match_a_naive_count() {
        let docs = corpus(200);
        let texts: Vec<&str> = docs.iter().map(|s| s.as_str()).collect();
        let mut t = PieceTable::new(CostModel::default(), 1 << 20);
        let locals = texts
            .chunks(17)
            .map(|c| t.count(split_re().unwrap(), c))
            .collect();
        t.merge(locals);
        assert_eq!(table_counts(&t), naive_counts(&texts));
        let expect: u64 = naive_counts(&texts)
            .keys()
            .map(|k| CostModel::default().cost(k.len()))
            .sum();
        assert_eq!(t.cost(), expect);
    }

    #[test]
    fn prune_conserves_byte_mass_and_keeps_frequent_pieces() {
        let docs = corpus(500);
        let texts: Vec<&str> = docs.iter().map(|s| s.as_str()).collect();
        let mut t = PieceTable::new(CostModel::default(), 1 << 20);
        let local = t.count(split_re().unwrap(), &texts);
        t.merge(vec![local]);
        let mass = t.byte_mass();
        let phrase = t.get("我是一个人工智能助手");
        assert!(phrase > 100);
        let before = t.cost();
        let target = before / 4;
        let r = t.prune(target);
        assert!(r.rounds >= 1 && r.cut > 0);
        assert!(t.cost() <= target, "{} > {target}", t.cost());
        assert_eq!(t.byte_mass(), mass);
        // The frequent phrase kept its count; so did every single character at least.
        assert_eq!(t.get("我是一个人工智能助手"), phrase);
        assert_eq!(t.get(" English"), 500);
        // The cost estimate is still exact.
        let exact: u64 = table_counts(&t)
            .keys()
            .map(|k| CostModel::default().cost(k.len()))
            .sum();
        assert_eq!(t.cost(), exact);
        // Pruning to nothing leaves only single characters, with the mass intact.
        t.prune(0);
        assert!(table_counts(&t).keys().all(|k| k.chars().count() == 1));
        assert_eq!(t.byte_mass(), mass);
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
        [
            "<unk>",
            "<s>",
            "</s>",
            "<think>",
            "</think>",
            "<answer>",
            "</answer>",
        ]
        .map(String::from)
        .to_vec()
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
