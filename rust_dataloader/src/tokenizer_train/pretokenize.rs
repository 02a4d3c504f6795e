//! Pre-tokenizing exactly as the final tokenizer does (`Sequence[Digits(individual),
//! ByteLevel]`), and the byte-level alphabet.

use std::sync::LazyLock;

use compact_str::CompactString;
use tokenizers::utils::SysRegex;

use crate::error::{DataError, Result};

/// The GPT-2 split of `tokenizers`' ByteLevel pre-tokenizer (byte_level.rs), same engine (onig).
/// `pretokenize_matches_byte_level` checks that the pieces agree with the crate's own.
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

static SPLIT_RE: LazyLock<std::result::Result<SysRegex, String>> =
    LazyLock::new(|| SysRegex::new(GPT2_PATTERN).map_err(|e| e.to_string()));

pub(crate) fn split_re() -> Result<&'static SysRegex> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
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
}
