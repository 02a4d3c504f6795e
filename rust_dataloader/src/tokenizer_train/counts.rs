//! The bounded pre-token count table: counting, merging, the training-cost estimate and
//! pruning (the rarest pieces cut at their weakest character link, never dropped).

use std::sync::atomic::{AtomicU32, Ordering};

use ahash::AHashMap;
use compact_str::CompactString;
use rayon::prelude::*;
use tokenizers::utils::SysRegex;

use super::pretokenize::{byte_level, is_cjk, pretokenize};

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
    pub(crate) pieces: u64,
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
    #[cfg(test)]
    pub fn byte_mass(&self) -> u64 {
        self.shards
            .iter()
            .flat_map(|s| s.iter())
            .map(|(k, c)| c * k.len() as u64)
            .sum()
    }

    #[cfg(test)]
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

/// Test corpus: clauses of random characters (nearly all distinct) plus a repeated phrase.
#[cfg(test)]
pub(crate) fn corpus(n: usize) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer_train::pretokenize::split_re;
    use std::collections::BTreeMap;

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
}
