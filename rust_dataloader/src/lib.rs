//! SpongeBob's data engine. The core (jsonl records, template and mask, packing, token cache)
//! is plain Rust, tested with `cargo test`; `python` is the thin PyO3 layer over it.

pub mod cache;
pub mod error;
pub mod jsonl;
pub mod loader;
pub mod pack;
pub mod pyjson;
pub mod template;
pub mod tokenizer;
pub mod tokenizer_train;

mod python;

#[cfg(test)]
mod test_support;
