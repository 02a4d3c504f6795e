//! Test helpers: a tiny byte-level BPE tokenizer trained here (nothing fetched) and jsonl files.

use std::io::Write;
use std::path::{Path, PathBuf};

use ahash::AHashMap;
use compact_str::CompactString;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::tokenizer::{ChatTokenizer, SPECIAL_TOKENS};
use crate::tokenizer_train::{byte_level, pretokenize, split_re, train_on_counts};

/// Texts the tiny tokenizer is trained on: Chinese, English, the template's words.
pub const TRAIN_TEXTS: &[&str] = &[
    "system\nuser\nassistant\n",
    "你好，世界！我是一个人工智能助手。",
    "hello world, the model reads the data and trains on it",
    "思考一下这个问题，然后回答。",
    "1 + 2 = 3, 12 * 12 = 144",
];

/// A byte-level BPE (vocab 400) trained here on `texts` with `specials` first, and a copy of
/// it that has them as added tokens (`special` of them special, the rest plain): the plain one
/// is an independent encoder for expected values.
fn trained(texts: &[&str], specials: &[String], special: usize) -> (Tokenizer, Tokenizer) {
    let mut words: AHashMap<CompactString, u64> = AHashMap::new();
    let re = split_re().unwrap();
    for _ in 0..3 {
        for t in texts {
            pretokenize(re, t, |p| *words.entry(byte_level(p)).or_default() += 1);
        }
    }
    let model = train_on_counts(&words, 400, specials).unwrap();
    let mut plain = Tokenizer::new(model);
    plain.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    plain.with_decoder(Some(ByteLevelDecoder::default()));
    let mut full = plain.clone();
    let (special, rest) = specials.split_at(special);
    let added = |toks: &[String], sp: bool| -> Vec<AddedToken> {
        toks.iter()
            .map(|s| AddedToken::from(s.clone(), sp).normalized(false))
            .collect()
    };
    full.add_special_tokens(added(special, true)).unwrap();
    full.add_tokens(added(rest, false)).unwrap();
    (full, plain)
}

fn saved(dir: &Path, full: &Tokenizer) -> ChatTokenizer {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("tokenizer.json");
    full.save(&path, false).unwrap();
    ChatTokenizer::from_path(&path).unwrap()
}

/// A trained tokenizer in `dir/tokenizer.json`: byte-level BPE (vocab 400), with all seven
/// specials (`with_tags`) or MiniMind's three. Also returns the same model *without* added
/// tokens: an independent plain encoder for expected values.
pub fn tiny_tokenizer(dir: &Path, with_tags: bool) -> (ChatTokenizer, Tokenizer) {
    let specials: Vec<String> = SPECIAL_TOKENS[..if with_tags { 7 } else { 3 }]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (full, plain) = trained(TRAIN_TEXTS, &specials, specials.len());
    (saved(dir, &full), plain)
}

/// A chatml tokenizer in `dir/tokenizer.json` (MiniMind-3's added tokens: three special,
/// the think and tool tags plain added tokens), trained like [`tiny_tokenizer`]; with the
/// same model without added tokens.
pub fn tiny_chatml_tokenizer(dir: &Path) -> (ChatTokenizer, Tokenizer) {
    use crate::template::{CHATML_NUM_SPECIAL, CHATML_SPECIAL_TOKENS};
    let specials: Vec<String> = CHATML_SPECIAL_TOKENS
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut texts = TRAIN_TEXTS.to_vec();
    texts.push("{\"name\": \"f\", \"arguments\": {\"x\": 1}}");
    let (full, plain) = trained(&texts, &specials, CHATML_NUM_SPECIAL);
    (saved(dir, &full), plain)
}

pub fn write_lines(path: &Path, lines: &[String]) -> PathBuf {
    let mut f = std::fs::File::create(path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
    path.to_owned()
}

/// `n` pretraining lines of varied length.
pub fn text_lines(n: usize, salt: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let body = TRAIN_TEXTS[(i + salt) % TRAIN_TEXTS.len()].repeat(1 + (i * 7 + salt) % 4);
            serde_json::json!({ "text": format!("{i} {body}") }).to_string()
        })
        .collect()
}

/// `n` chat lines (some with a system turn, some with reasoning tags).
pub fn chat_lines(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let mut msgs = vec![];
            if i % 3 == 0 {
                msgs.push(serde_json::json!({"role": "system", "content": "你是助手。"}));
            }
            let q = TRAIN_TEXTS[i % TRAIN_TEXTS.len()].repeat(1 + i % 3);
            msgs.push(serde_json::json!({"role": "user", "content": format!("{i}: {q}")}));
            let a = if i % 2 == 0 {
                format!("<think>\n{q}\n</think>\n<answer>\n{i}\n</answer>")
            } else {
                TRAIN_TEXTS[(i + 1) % TRAIN_TEXTS.len()].to_string()
            };
            msgs.push(serde_json::json!({"role": "assistant", "content": a}));
            serde_json::json!({ "conversations": msgs }).to_string()
        })
        .collect()
}
