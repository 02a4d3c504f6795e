//! The epoch plan: shuffle documents, pack them into rows, and map batches to rows by rank.
//! Pure functions of document lengths and the configuration (docs/architecture.md).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// A slice of one document placed in a row: tokens `[start, start + len)` of document `doc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub doc: u32,
    pub start: u32,
    pub len: u32,
}

/// All rows of an epoch: row `r` is `pieces[row_ends[r-1]..row_ends[r]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub pieces: Vec<Piece>,
    pub row_ends: Vec<usize>,
    /// Tokens placed in rows (the rest of `rows × (T+1)` is padding).
    pub used_tokens: u64,
}

impl Plan {
    pub fn num_rows(&self) -> usize {
        self.row_ends.len()
    }

    pub fn row(&self, r: usize) -> &[Piece] {
        let start = if r == 0 { 0 } else { self.row_ends[r - 1] };
        &self.pieces[start..self.row_ends[r]]
    }
}

/// Mixed into the seed for the shuffle of packed chat rows (a stream apart from the documents').
pub const ROW_SALT: u64 = 0xA5A5_A5A5_A5A5_A5A5;

/// splitmix64's increment (the golden ratio in 64 bits).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's output function.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// splitmix64: a tiny, well-mixed generator that the Python reference reproduces exactly.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn for_epoch(seed: u64, epoch: u64) -> Self {
        SplitMix64(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix64(self.0)
    }
}

/// Mixed into the seed for the validation hold-out (a stream apart from the epoch orders').
pub const HOLDOUT_SALT: u64 = 0x6A09_E667_F3BC_C909;

/// `h(seed, i)` of contracts.md §3: output number `i + 1` of splitmix64 started from the state
/// `seed XOR HOLDOUT_SALT`, i.e. `mix64((seed ^ HOLDOUT_SALT) + (i + 1)·GAMMA)` (mod 2^64).
pub fn holdout_hash(seed: u64, doc: u64) -> u64 {
    mix64((seed ^ HOLDOUT_SALT).wrapping_add(doc.wrapping_add(1).wrapping_mul(GAMMA)))
}

/// Document `i` is held out iff `h(seed, i) < holdout · 2^64`; for an integer `h` that is
/// `h < ceil(holdout · 2^64)`, the value returned (exact: `holdout · 2^64` is an exact f64,
/// and below 2^64 every f64 from 2^53 up is an integer, so the ceiling fits in a u64).
pub fn holdout_threshold(holdout: f64) -> u64 {
    (holdout * 18_446_744_073_709_551_616.0).ceil() as u64
}

/// The global indices of the documents in one split: `val` = those with
/// `holdout_hash(seed, i) < threshold`, `train` = the others, in index order.
pub fn split_documents(n: usize, seed: u64, holdout: f64, val: bool) -> Vec<u32> {
    let threshold = holdout_threshold(holdout);
    (0..n as u32)
        .filter(|&i| (holdout_hash(seed, i as u64) < threshold) == val)
        .collect()
}

/// Fisher–Yates permutation of `0..n` for this seed and epoch.
pub fn shuffle(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut perm: Vec<u32> = (0..n as u32).collect();
    let mut rng = SplitMix64::for_epoch(seed, epoch);
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm
}

/// Pretraining: documents in `order` as one stream, cut into full rows of `row_len` tokens.
pub fn plan_stream(lens: &[u64], order: &[u32], row_len: u64) -> Plan {
    let mut plan = Plan::default();
    let total: u64 = order.iter().map(|&d| lens[d as usize]).sum();
    let rows = total / row_len;
    let mut room = row_len;
    for &d in order {
        if plan.row_ends.len() as u64 == rows {
            break;
        }
        let mut start = 0u64;
        let len = lens[d as usize];
        while start < len && (plan.row_ends.len() as u64) < rows {
            let take = room.min(len - start);
            plan.pieces.push(Piece {
                doc: d,
                start: start as u32,
                len: take as u32,
            });
            start += take;
            room -= take;
            if room == 0 {
                plan.row_ends.push(plan.pieces.len());
                room = row_len;
            }
        }
    }
    plan.used_tokens = rows * row_len;
    plan
}

/// Chat: best-fit decreasing. A document longer than `row_len` keeps its first `row_len`
/// tokens. Documents are taken longest first (ties in `order`), and each goes to the open row
/// with the least free space that fits it (ties: the row opened first), else to a new row.
/// Rows come out in opening order, so longest-first; the loader shuffles them as it packs
/// (`plan_best_fit_in_order`); this plain form is for the tests.
#[cfg(test)]
pub fn plan_best_fit(lens: &[u64], order: &[u32], row_len: u64) -> Plan {
    plan_best_fit_in_order(lens, order, row_len, |rows| (0..rows as u32).collect())
}

/// `plan_best_fit(..).reorder(&row_order(rows))` without holding two copies of the plan: row
/// `i` of the result is opened row `row_order(rows)[i]`.
pub fn plan_best_fit_in_order(
    lens: &[u64],
    order: &[u32],
    row_len: u64,
    row_order: impl FnOnce(usize) -> Vec<u32>,
) -> Plan {
    let cap = row_len as usize;
    // (length, doc), longest first; the sort is stable, so equal lengths keep `order`.
    let mut by_len: Vec<(u32, u32)> = order
        .iter()
        .map(|&d| (lens[d as usize].min(row_len) as u32, d))
        .collect();
    by_len.sort_by_key(|&(n, _)| std::cmp::Reverse(n));
    // by_free[f] = the rows with exactly f tokens free, smallest (first opened) on top. A row
    // only ever leaves the top of its heap, so a heap per free size is enough.
    let mut by_free: Vec<BinaryHeap<Reverse<u32>>> = vec![BinaryHeap::new(); cap + 1];
    let mut free: Vec<u32> = Vec::new();
    // row_of[k] = the row of the k-th document of `by_len`.
    let mut row_of: Vec<u32> = Vec::with_capacity(by_len.len());
    let mut used = 0u64;
    for &(n, _) in &by_len {
        let n = n as usize;
        let r = match (n..=cap).find(|&f| !by_free[f].is_empty()) {
            Some(f) => by_free[f]
                .pop()
                .map(|Reverse(r)| r)
                .expect("non-empty heap"),
            None => {
                free.push(cap as u32);
                (free.len() - 1) as u32
            }
        };
        free[r as usize] -= n as u32;
        by_free[free[r as usize] as usize].push(Reverse(r));
        row_of.push(r);
        used += n as u64;
    }
    // Freed before the output is allocated: the peak is then the output, not both.
    drop(by_free);
    let rows = free.len();
    drop(free);
    // Counting sort of the documents by their row's place in the output; documents of one row
    // stay in the order they arrived.
    let mut place = vec![0u32; rows];
    for (i, r) in row_order(rows).into_iter().enumerate() {
        place[r as usize] = i as u32;
    }
    let mut starts = vec![0usize; rows + 1];
    for &r in &row_of {
        starts[place[r as usize] as usize + 1] += 1;
    }
    for i in 0..rows {
        starts[i + 1] += starts[i];
    }
    let row_ends = starts[1..].to_vec();
    let mut pieces = vec![
        Piece {
            doc: 0,
            start: 0,
            len: 0
        };
        by_len.len()
    ];
    for (&(n, d), &r) in by_len.iter().zip(&row_of) {
        let slot = &mut starts[place[r as usize] as usize];
        pieces[*slot] = Piece {
            doc: d,
            start: 0,
            len: n,
        };
        *slot += 1;
    }
    Plan {
        pieces,
        row_ends,
        used_tokens: used,
    }
}

#[cfg(test)]
impl Plan {
    /// The same rows in the order `perm` (row `i` of the result is row `perm[i]` of `self`).
    /// The plain statement of what `plan_best_fit_in_order` does in one pass; tests only.
    pub fn reorder(&self, perm: &[u32]) -> Plan {
        let mut out = Plan {
            used_tokens: self.used_tokens,
            pieces: Vec::with_capacity(self.pieces.len()),
            row_ends: Vec::with_capacity(self.row_ends.len()),
        };
        for &r in perm {
            out.pieces.extend_from_slice(self.row(r as usize));
            out.row_ends.push(out.pieces.len());
        }
        out
    }
}

/// Rows of batch `g` for `rank`: `g·B·W + rank·B + [0, B)`; indices ≥ the row count are empty.
pub fn batch_rows(g: usize, batch: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let start = g * batch * world + rank * batch;
    start..start + batch
}

pub fn batches_per_rank(rows: usize, batch: usize, world: usize) -> usize {
    rows.div_ceil(batch * world)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_a_permutation_that_depends_on_seed_and_epoch() {
        let a = shuffle(1000, 7, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<u32>>());
        assert_eq!(a, shuffle(1000, 7, 0));
        assert_ne!(a, shuffle(1000, 7, 1));
        assert_ne!(a, shuffle(1000, 8, 0));
    }

    #[test]
    fn stream_rows_are_full_and_cover_the_stream_in_order() {
        let lens = [5, 3, 9, 2];
        let order = [2, 0, 3, 1];
        let plan = plan_stream(&lens, &order, 4);
        assert_eq!(plan.num_rows(), 19 / 4);
        for r in 0..plan.num_rows() {
            assert_eq!(plan.row(r).iter().map(|p| p.len).sum::<u32>(), 4);
        }
        let flat: Vec<(u32, u32)> = plan
            .pieces
            .iter()
            .flat_map(|p| (p.start..p.start + p.len).map(move |t| (p.doc, t)))
            .collect();
        let expected: Vec<(u32, u32)> = order
            .iter()
            .flat_map(|&d| (0..lens[d as usize] as u32).map(move |t| (d, t)))
            .take(16)
            .collect();
        assert_eq!(flat, expected);
    }

    fn row_docs(plan: &Plan) -> Vec<Vec<u32>> {
        (0..plan.num_rows())
            .map(|r| plan.row(r).iter().map(|p| p.doc).collect())
            .collect()
    }

    #[test]
    fn best_fit_decreasing_picks_the_tightest_row_and_truncates_long_documents() {
        // Capacity 10, longest first: 25 (cut to 10) fills row 0; 7 opens row 1 (free 3);
        // 6 opens row 2 (free 4); 4 fits only row 2; 3 fits row 1 exactly.
        let lens = [6, 7, 3, 4, 25];
        let plan = plan_best_fit(&lens, &[0, 1, 2, 3, 4], 10);
        assert_eq!(row_docs(&plan), vec![vec![4], vec![1, 2], vec![0, 3]]);
        assert_eq!(plan.row(0)[0].len, 10);
        assert_eq!(plan.used_tokens, 30);
    }

    #[test]
    fn best_fit_breaks_length_ties_by_order_and_row_ties_by_opening() {
        // 9, 9 open rows 0 and 1 (free 1 each, in `order`: doc 3 then doc 2); the two 1s
        // go to row 0 first, then row 1.
        let lens = [1, 1, 9, 9];
        let plan = plan_best_fit(&lens, &[3, 2, 1, 0], 10);
        assert_eq!(row_docs(&plan), vec![vec![3, 1], vec![2, 0]]);
    }

    #[test]
    fn reorder_moves_whole_rows() {
        let lens = [10, 10, 5, 5];
        let plan = plan_best_fit(&lens, &[0, 1, 2, 3], 10);
        let moved = plan.reorder(&[2, 0, 1]);
        assert_eq!(
            row_docs(&moved),
            vec![
                row_docs(&plan)[2].clone(),
                row_docs(&plan)[0].clone(),
                row_docs(&plan)[1].clone()
            ]
        );
        assert_eq!(moved.used_tokens, plan.used_tokens);
    }

    #[test]
    fn packing_in_order_equals_packing_then_reordering() {
        let mut rng = SplitMix64::for_epoch(7, 0);
        let lens: Vec<u64> = (0..500).map(|_| 1 + rng.next_u64() % 40).collect();
        let order = shuffle(lens.len(), 3, 1);
        let plan = plan_best_fit(&lens, &order, 32);
        let perm = shuffle(plan.num_rows(), 5, 2);
        let direct = plan_best_fit_in_order(&lens, &order, 32, |rows| {
            assert_eq!(rows, plan.num_rows());
            perm.clone()
        });
        assert_eq!(direct, plan.reorder(&perm));
    }

    #[test]
    fn holdout_hash_is_splitmix64_from_the_salted_seed() {
        // Output i + 1 of the generator from state seed ^ HOLDOUT_SALT (the definition).
        for seed in [0u64, 7, u64::MAX] {
            let mut g = SplitMix64(seed ^ HOLDOUT_SALT);
            for i in 0..100 {
                assert_eq!(holdout_hash(seed, i), g.next_u64());
            }
        }
        // Vigna's published first output from state 0 pins the mixing constants.
        assert_eq!(holdout_hash(HOLDOUT_SALT, 0), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn holdout_splits_partition_the_documents_near_the_fraction() {
        assert_eq!(holdout_threshold(0.0), 0);
        assert_eq!(holdout_threshold(0.5), 1 << 63);
        assert_eq!(holdout_threshold(0.25), 1 << 62);
        // ceil: any fraction above 0 holds out at least the documents with h = 0.
        assert_eq!(holdout_threshold(f64::MIN_POSITIVE), 1);
        assert!(holdout_threshold(1.0 - f64::EPSILON) > u64::MAX - 4096);
        let n = 10_000;
        for (holdout, seed) in [(0.1, 3u64), (0.5, 0), (0.9, 12345)] {
            let val = split_documents(n, seed, holdout, true);
            let train = split_documents(n, seed, holdout, false);
            let mut all: Vec<u32> = val.iter().chain(&train).copied().collect();
            all.sort();
            assert_eq!(all, (0..n as u32).collect::<Vec<_>>());
            let frac = val.len() as f64 / n as f64;
            assert!((frac - holdout).abs() < 0.03, "{holdout}: {frac}");
            assert_ne!(val, split_documents(n, seed + 1, holdout, true));
        }
        assert!(split_documents(100, 1, 0.0, true).is_empty());
        assert_eq!(split_documents(100, 1, 0.0, false).len(), 100);
    }

    #[test]
    fn ranks_partition_the_rows() {
        let rows = 23;
        for world in 1..=4 {
            let n = batches_per_rank(rows, 3, world);
            let mut seen = vec![0; n * 3 * world];
            for rank in 0..world {
                for g in 0..n {
                    for r in batch_rows(g, 3, rank, world) {
                        seen[r] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1));
            assert!(seen.len() >= rows);
        }
    }
}
