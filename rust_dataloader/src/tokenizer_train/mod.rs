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
//!
//! Layout: `pretokenize` (the split and the byte-level alphabet), `counts` (the bounded table,
//! its cost model and the cutting), `train` (a whole run: read, count, train). The Python
//! binding, `spongebob._rust.train_bpe_bounded`, is in `python.rs`.

mod counts;
mod pretokenize;
mod train;

pub use counts::{cut_point, BigramSketch, CostModel, LocalCounts, PieceTable, PruneReport};
#[cfg(test)]
pub(crate) use pretokenize::split_re;
pub use pretokenize::{byte_level, is_cjk, pretokenize};
pub use train::{
    count_pieces, current_rss, default_max_memory, parse_size, train_bounded, train_on_counts,
    TrainConfig, TrainOutput, TrainStats, BASE_ALLOWANCE, MIN_TABLE_BYTES, RESERVE_BYTES,
};
