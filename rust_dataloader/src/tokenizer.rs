//! The chat template and its loss mask, built by construction (contracts.md §2).
//!
//! A conversation is rendered turn by turn as
//!
//! ```text
//! <s>{role}\n{content}</s>\n
//! ```
//!
//! and every piece is tokenized on its own: the specials are emitted as ids, the header
//! `{role}\n`, the content and the trailing `\n` are encoded as plain text. Because we know
//! where each piece starts, the loss mask needs no searching: an assistant turn trains its
//! content tokens and its `</s>`, nothing else. Plain text never matches added tokens, so a
//! literal `<s>` in content stays text. Inside assistant content the four reasoning tags are
//! split out and emitted as their token (or, with a tokenizer that lacks them, as their plain
//! token sequence); those tokens carry the class [`TAG`] so the loader can weigh them.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokenizers::tokenizer::{Model, Normalizer, PreTokenizer};
use tokenizers::{NormalizedString, OffsetReferential, OffsetType, PreTokenizedString, Tokenizer};

use crate::error::{DataError, Result};
use crate::jsonl::{strip_document_markers, Message, Record, Role};

/// Bumped whenever rendering or masking changes; part of the token cache key.
pub const TEMPLATE_VERSION: u32 = 1;

/// The system prompt used when a conversation does not start with one.
pub const DEFAULT_SYSTEM: &str = "你是 SpongeBob，一个乐于助人的人工智能助手。";

/// The reasoning tags recognised inside assistant content (contracts.md §2).
pub const REASONING_TAGS: [&str; 4] = ["<think>", "</think>", "<answer>", "</answer>"];

/// The added tokens of our tokenizer, at ids 0–6: `<unk>` (also padding), `<s>`, `</s>`, then
/// the reasoning tags. The one definition (Python imports it as `spongebob.data.SPECIAL_TOKENS`).
pub const SPECIAL_TOKENS: [&str; 7] = [
    "<unk>",
    "<s>",
    "</s>",
    REASONING_TAGS[0],
    REASONING_TAGS[1],
    REASONING_TAGS[2],
    REASONING_TAGS[3],
];

/// Per-token training class (stored in the token cache as one byte).
pub const UNTRAINED: u8 = 0;
pub const TRAINED: u8 = 1;
pub const TAG: u8 = 2;

/// Token ids plus one class byte per token (the class of *predicting* that token).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub classes: Vec<u8>,
}

impl Encoded {
    fn push(&mut self, ids: &[u32], class: u8) {
        self.ids.extend_from_slice(ids);
        self.classes.extend(std::iter::repeat_n(class, ids.len()));
    }

    /// Loss weights: 0 untrained, 1 trained, `think_weight` for tag tokens.
    pub fn weights(&self, think_weight: f32) -> Vec<f32> {
        self.classes
            .iter()
            .map(|&c| class_weight(c, think_weight))
            .collect()
    }
}

pub fn class_weight(class: u8, think_weight: f32) -> f32 {
    match class {
        UNTRAINED => 0.0,
        TAG => think_weight,
        _ => 1.0,
    }
}

pub struct ChatTokenizer {
    tok: Tokenizer,
    path: PathBuf,
    hash: String,
    pub bos: u32,
    pub eos: u32,
    pub unk: u32,
    /// Token sequence of each tag (one id when the tokenizer has it as a token).
    tag_ids: [Vec<u32>; 4],
    headers: [Vec<u32>; 3],
    newline: Vec<u32>,
    default_system: Vec<u32>,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

impl ChatTokenizer {
    /// Load `DIR/tokenizer.json` (or a `tokenizer.json` path).
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_owned()
        };
        let bytes = std::fs::read(&file).map_err(|e| DataError::io(&file, e))?;
        let tok = Tokenizer::from_bytes(&bytes).map_err(|e| tok_err(&file, e))?;
        let hash = format!("{:x}", Sha256::digest(&bytes));
        let special = |t: &str| {
            tok.token_to_id(t)
                .ok_or_else(|| tok_err(&file, format!("missing special token {t}")))
        };
        let (unk, bos, eos) = (
            special(SPECIAL_TOKENS[0])?,
            special(SPECIAL_TOKENS[1])?,
            special(SPECIAL_TOKENS[2])?,
        );
        let mut me = ChatTokenizer {
            tok,
            path: file,
            hash,
            bos,
            eos,
            unk,
            tag_ids: Default::default(),
            headers: Default::default(),
            newline: vec![],
            default_system: vec![],
        };
        for (i, tag) in REASONING_TAGS.iter().enumerate() {
            me.tag_ids[i] = match me.tok.token_to_id(tag) {
                Some(id) => vec![id],
                None => me.encode_plain(tag)?,
            };
        }
        for role in [Role::System, Role::User, Role::Assistant] {
            me.headers[role as usize] = me.encode_plain(&format!("{}\n", role.name()))?;
        }
        me.newline = me.encode_plain("\n")?;
        me.default_system = me.encode_plain(DEFAULT_SYSTEM)?;
        Ok(me)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// SHA-256 of the tokenizer.json bytes (part of the cache key).
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.tok
    }

    pub fn tag_ids(&self) -> &[Vec<u32>; 4] {
        &self.tag_ids
    }

    /// Encode text with no special-token matching: normalizer, pre-tokenizer, model.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let mut normalized = NormalizedString::from(text);
        if let Some(n) = self.tok.get_normalizer() {
            n.normalize(&mut normalized)
                .map_err(|e| DataError::Tokenize(e.to_string()))?;
        }
        let mut pre = PreTokenizedString::from(normalized);
        if let Some(p) = self.tok.get_pre_tokenizer() {
            p.pre_tokenize(&mut pre)
                .map_err(|e| DataError::Tokenize(e.to_string()))?;
        }
        let model = self.tok.get_model();
        pre.tokenize(|n| model.tokenize(n.get()))
            .map_err(|e| DataError::Tokenize(e.to_string()))?;
        let mut ids = Vec::with_capacity(text.len() / 2);
        for (_, _, tokens) in pre.get_splits(OffsetReferential::Original, OffsetType::None) {
            if let Some(tokens) = tokens {
                ids.extend(tokens.iter().map(|t| t.id));
            }
        }
        Ok(ids)
    }

    /// Encode like the `tokenizers` library does (added tokens matched in the text).
    pub fn encode_with_specials(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tok
            .encode(text, false)
            .map_err(|e| DataError::Tokenize(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tok
            .decode(ids, skip_special_tokens)
            .map_err(|e| DataError::Tokenize(e.to_string()))
    }

    /// `<s>` + text (one marker pair stripped) + `</s>`; every token but `<s>` is trained.
    pub fn encode_document(&self, text: &str) -> Result<Encoded> {
        let body = self.encode_plain(strip_document_markers(text))?;
        let mut out = Encoded::default();
        out.push(&[self.bos], UNTRAINED);
        out.push(&body, TRAINED);
        out.push(&[self.eos], TRAINED);
        Ok(out)
    }

    /// Assistant content: plain text with the reasoning tags split out and classed [`TAG`].
    fn push_assistant_content(&self, out: &mut Encoded, content: &str) -> Result<()> {
        let mut rest = content;
        while !rest.is_empty() {
            let next = REASONING_TAGS
                .iter()
                .enumerate()
                .filter_map(|(i, t)| rest.find(t).map(|pos| (pos, i)))
                .min();
            match next {
                None => {
                    out.push(&self.encode_plain(rest)?, TRAINED);
                    break;
                }
                Some((pos, i)) => {
                    out.push(&self.encode_plain(&rest[..pos])?, TRAINED);
                    out.push(&self.tag_ids[i], TAG);
                    rest = &rest[pos + REASONING_TAGS[i].len()..];
                }
            }
        }
        Ok(())
    }

    fn push_turn(&self, out: &mut Encoded, role: Role, content: &str) -> Result<()> {
        let trained = role == Role::Assistant;
        out.push(&[self.bos], UNTRAINED);
        out.push(&self.headers[role as usize], UNTRAINED);
        if trained {
            self.push_assistant_content(out, content)?;
        } else {
            out.push(&self.encode_plain(content)?, UNTRAINED);
        }
        out.push(&[self.eos], if trained { TRAINED } else { UNTRAINED });
        out.push(&self.newline, UNTRAINED);
        Ok(())
    }

    fn push_history(&self, out: &mut Encoded, messages: &[Message]) -> Result<()> {
        if messages.first().map(|m| m.role) != Some(Role::System) {
            out.push(&[self.bos], UNTRAINED);
            out.push(&self.headers[Role::System as usize], UNTRAINED);
            out.push(&self.default_system, UNTRAINED);
            out.push(&[self.eos], UNTRAINED);
            out.push(&self.newline, UNTRAINED);
        }
        for m in messages {
            self.push_turn(out, m.role, &m.content)?;
        }
        Ok(())
    }

    /// A whole training conversation with its per-token classes.
    pub fn encode_conversation(&self, messages: &[Message]) -> Result<Encoded> {
        let mut out = Encoded::default();
        self.push_history(&mut out, messages)?;
        Ok(out)
    }

    /// The history followed by `<s>assistant\n`: what the model continues at chat time.
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let mut out = Encoded::default();
        self.push_history(&mut out, messages)?;
        out.push(&[self.bos], UNTRAINED);
        out.push(&self.headers[Role::Assistant as usize], UNTRAINED);
        Ok(out.ids)
    }

    pub fn encode_record(&self, record: &Record) -> Result<Encoded> {
        match record {
            Record::Text(t) => self.encode_document(t),
            Record::Chat(m) => self.encode_conversation(m),
        }
    }
}

/// The template as a string (what `tokenizer_config.json`'s `chat_template` renders).
pub fn render(messages: &[Message], add_generation_prompt: bool) -> String {
    let mut s = String::new();
    if messages.first().map(|m| m.role) != Some(Role::System) {
        s.push_str(&format!("<s>system\n{DEFAULT_SYSTEM}</s>\n"));
    }
    for m in messages {
        s.push_str(&format!("<s>{}\n{}</s>\n", m.role.name(), m.content));
    }
    if add_generation_prompt {
        s.push_str("<s>assistant\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::tiny_tokenizer;

    /// A piece of the expected encoding: an added token by name, or text encoded by the
    /// independent plain encoder (the same BPE without added tokens).
    enum Seg<'a> {
        Sp(&'a str),
        Text(&'a str),
    }
    use Seg::{Sp, Text};

    fn expected(tok: &ChatTokenizer, plain: &Tokenizer, segs: &[(Seg, u8)]) -> Encoded {
        let mut e = Encoded::default();
        for (seg, class) in segs {
            let ids = match seg {
                Sp(t) => vec![tok.inner().token_to_id(t).expect("added token")],
                Text(t) => plain.encode(*t, false).unwrap().get_ids().to_vec(),
            };
            e.push(&ids, *class);
        }
        e
    }

    fn msg(role: Role, content: &str) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }

    /// `<s>{role}\n{content}</s>\n` of a turn that is not trained.
    fn untrained_turn<'a>(role: &'a str, content: &'a str) -> Vec<(Seg<'a>, u8)> {
        vec![
            (Sp("<s>"), UNTRAINED),
            (Text(role), UNTRAINED),
            (Text(content), UNTRAINED),
            (Sp("</s>"), UNTRAINED),
            (Text("\n"), UNTRAINED),
        ]
    }

    fn assert_same(got: &Encoded, exp: &Encoded) {
        assert_eq!(got.ids.len(), exp.ids.len(), "lengths differ");
        for (i, (g, e)) in got
            .ids
            .iter()
            .zip(&got.classes)
            .zip(exp.ids.iter().zip(&exp.classes))
            .enumerate()
        {
            assert_eq!(g, e, "token {i}: (id, class)");
        }
    }

    const REASONING: &str = "<think>\n思考一下\n</think>\n<answer>\n3\n</answer>";

    fn reasoning_segments(tags_are_tokens: bool) -> Vec<(Seg<'static>, u8)> {
        let tag = |t: &'static str| if tags_are_tokens { Sp(t) } else { Text(t) };
        vec![
            (Sp("<s>"), UNTRAINED),
            (Text("assistant\n"), UNTRAINED),
            (tag("<think>"), TAG),
            (Text("\n思考一下\n"), TRAINED),
            (tag("</think>"), TAG),
            (Text("\n"), TRAINED),
            (tag("<answer>"), TAG),
            (Text("\n3\n"), TRAINED),
            (tag("</answer>"), TAG),
            (Sp("</s>"), TRAINED),
            (Text("\n"), UNTRAINED),
        ]
    }

    #[test]
    fn classes_of_system_user_and_assistant_turns_with_reasoning_tags() {
        let dir = tempfile::tempdir().unwrap();
        let (tok, plain) = tiny_tokenizer(dir.path(), true);
        let msgs = [
            msg(Role::System, "你是助手。"),
            msg(Role::User, "你好，世界！"),
            msg(Role::Assistant, REASONING),
        ];
        let mut segs = untrained_turn("system\n", "你是助手。");
        segs.extend(untrained_turn("user\n", "你好，世界！"));
        segs.extend(reasoning_segments(true));
        let got = tok.encode_conversation(&msgs).unwrap();
        assert_same(&got, &expected(&tok, &plain, &segs));
        // Each tag is one token of class 2; the weights follow the classes.
        assert_eq!(got.classes.iter().filter(|&&c| c == TAG).count(), 4);
        let w = got.weights(10.0);
        for (c, w) in got.classes.iter().zip(w) {
            assert_eq!(w, [0.0, 1.0, 10.0][*c as usize]);
        }
        assert_eq!(tok.decode(&got.ids, false).unwrap(), render(&msgs, false));
    }

    #[test]
    fn a_conversation_without_a_system_turn_gets_the_default_one_untrained() {
        let dir = tempfile::tempdir().unwrap();
        let (tok, plain) = tiny_tokenizer(dir.path(), true);
        let msgs = [
            msg(Role::User, "hello world"),
            msg(Role::Assistant, "the model"),
            msg(Role::User, "1 + 2"),
            msg(Role::Assistant, "3"),
        ];
        let mut segs = untrained_turn("system\n", DEFAULT_SYSTEM);
        for (q, a) in [("hello world", "the model"), ("1 + 2", "3")] {
            segs.extend(untrained_turn("user\n", q));
            segs.extend([
                (Sp("<s>"), UNTRAINED),
                (Text("assistant\n"), UNTRAINED),
                (Text(a), TRAINED),
                (Sp("</s>"), TRAINED),
                (Text("\n"), UNTRAINED),
            ]);
        }
        let got = tok.encode_conversation(&msgs).unwrap();
        assert_same(&got, &expected(&tok, &plain, &segs));
        // The prompt is the same history (every token untrained) plus `<s>assistant\n`.
        let prompt = tok.encode_prompt(&msgs).unwrap();
        let mut head = got.ids.clone();
        head.push(tok.bos);
        head.extend(plain.encode("assistant\n", false).unwrap().get_ids());
        assert_eq!(prompt, head);
    }

    #[test]
    fn literal_specials_and_tags_in_content_stay_plain_text() {
        let dir = tempfile::tempdir().unwrap();
        let (tok, plain) = tiny_tokenizer(dir.path(), true);
        let user = "a</s>b<s><think>x</think>";
        let answer = "x </s> y <unk><s>";
        let msgs = [msg(Role::User, user), msg(Role::Assistant, answer)];
        let mut segs = untrained_turn("system\n", DEFAULT_SYSTEM);
        segs.extend(untrained_turn("user\n", user));
        segs.extend([
            (Sp("<s>"), UNTRAINED),
            (Text("assistant\n"), UNTRAINED),
            (Text(answer), TRAINED),
            (Sp("</s>"), TRAINED),
            (Text("\n"), UNTRAINED),
        ]);
        let got = tok.encode_conversation(&msgs).unwrap();
        assert_same(&got, &expected(&tok, &plain, &segs));
        // One `</s>` and one `<s>` a turn (three turns), no tag token, no `<unk>`.
        let count = |id: u32| got.ids.iter().filter(|&&i| i == id).count();
        assert_eq!((count(tok.eos), count(tok.bos), count(tok.unk)), (3, 3, 0));
        assert!(!got.classes.contains(&TAG));
    }

    #[test]
    fn a_tokenizer_without_the_tags_trains_their_plain_tokens_as_class_2() {
        let dir = tempfile::tempdir().unwrap();
        let (tok, plain) = tiny_tokenizer(dir.path(), false);
        assert!(tok.inner().token_to_id("<think>").is_none());
        assert!(tok.tag_ids().iter().all(|ids| ids.len() > 1));
        let msgs = [msg(Role::User, "你好"), msg(Role::Assistant, REASONING)];
        let mut segs = untrained_turn("system\n", DEFAULT_SYSTEM);
        segs.extend(untrained_turn("user\n", "你好"));
        segs.extend(reasoning_segments(false));
        let got = tok.encode_conversation(&msgs).unwrap();
        assert_same(&got, &expected(&tok, &plain, &segs));
        let tag_tokens: usize = tok.tag_ids().iter().map(|t| t.len()).sum();
        assert_eq!(
            got.classes.iter().filter(|&&c| c == TAG).count(),
            tag_tokens
        );
    }

    #[test]
    fn documents_are_bos_untrained_then_text_and_eos_trained() {
        let dir = tempfile::tempdir().unwrap();
        let (tok, plain) = tiny_tokenizer(dir.path(), true);
        for (text, body) in [
            ("<s>你好，世界！</s>", "你好，世界！"),
            ("hello world", "hello world"),
            ("<s><s>x</s></s>", "<s>x</s>"),
            ("<s>", ""),
        ] {
            let segs = [
                (Sp("<s>"), UNTRAINED),
                (Text(body), TRAINED),
                (Sp("</s>"), TRAINED),
            ];
            let got = tok.encode_document(text).unwrap();
            assert_same(&got, &expected(&tok, &plain, &segs));
            let rec = tok.encode_record(&Record::Text(text.into())).unwrap();
            assert_eq!(rec, got);
        }
    }

    #[test]
    fn the_special_tokens_are_the_tags_after_the_three_markers() {
        assert_eq!(&SPECIAL_TOKENS[3..], &REASONING_TAGS);
        let dir = tempfile::tempdir().unwrap();
        let (tok, _) = tiny_tokenizer(dir.path(), true);
        for (i, t) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.inner().token_to_id(t), Some(i as u32), "{t}");
        }
        assert_eq!((tok.unk, tok.bos, tok.eos), (0, 1, 2));
    }
}
