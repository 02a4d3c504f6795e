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
use crate::jsonl::{strip_document_markers, Chat, Message, Record, Role};
pub use crate::template::DEFAULT_SYSTEM;
use crate::template::{self, chatml_pieces, EmptyThink, Family, Piece, Template};

/// Bumped whenever the minimind2 rendering or masking changes; part of the token cache key
/// (the chatml family adds its own version, `template::CHATML_VERSION`). 2: an assistant's
/// `reasoning_content` is rendered, so caches of files that have it are rebuilt.
pub const TEMPLATE_VERSION: u32 = 2;

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
    template: Template,
    /// The family's begin- and end-of-turn tokens (`<s>`/`</s>`, `<|im_start|>`/`<|im_end|>`).
    pub bos: u32,
    pub eos: u32,
    /// Padding (and unknown): the config's `pad_token`, else `<unk>` / `<|endoftext|>`.
    pub unk: u32,
    /// Ids of the family's stop tokens that the vocab has.
    stop_ids: Vec<u32>,
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

/// `tokenizer_config.json` next to `tokenizer.json`, if there is one.
fn read_config(tokenizer_json: &Path) -> Result<Option<serde_json::Value>> {
    let Some(dir) = tokenizer_json.parent() else {
        return Ok(None);
    };
    let path = dir.join("tokenizer_config.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DataError::io(&path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| tok_err(&path, e))
}

/// The config's `chat_template`: a string, or the `default` of a list of named templates.
fn config_chat_template(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
        _ => None,
    }
}

/// A token named in the config: `"<unk>"` or `{"content": "<unk>", ...}`.
fn config_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        v => v.get("content")?.as_str().map(str::to_owned),
    }
}

impl ChatTokenizer {
    /// Load `DIR/tokenizer.json` (or a `tokenizer.json` path) with the family its folder is
    /// made for and the empty think blocks kept.
    pub fn from_path(path: &Path) -> Result<Self> {
        Self::load(path, None, EmptyThink::Keep)
    }

    /// Load with a template family (`None`: the one `tokenizer_config.json` names, see
    /// [`Family::detect`]) and the chatml empty-think option.
    pub fn load(path: &Path, family: Option<Family>, empty_think: EmptyThink) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_owned()
        };
        let bytes = std::fs::read(&file).map_err(|e| DataError::io(&file, e))?;
        let tok = Tokenizer::from_bytes(&bytes).map_err(|e| tok_err(&file, e))?;
        let hash = format!("{:x}", Sha256::digest(&bytes));
        let config = read_config(&file)?;
        let chat_template = config.as_ref().and_then(config_chat_template);
        let family = family.unwrap_or_else(|| {
            Family::detect(chat_template.as_deref(), |t| tok.token_to_id(t).is_some())
        });
        let special = |t: &str| {
            tok.token_to_id(t)
                .ok_or_else(|| tok_err(&file, format!("missing special token {t}")))
        };
        let [bos_name, eos_name, pad_name] = family.markers();
        let pad_name = config
            .as_ref()
            .and_then(|c| config_token(c, "pad_token").or_else(|| config_token(c, "unk_token")))
            .filter(|t| tok.token_to_id(t).is_some())
            .unwrap_or_else(|| pad_name.to_owned());
        let (bos, eos, unk) = (special(bos_name)?, special(eos_name)?, special(&pad_name)?);
        let stop_ids = family
            .stop_tokens()
            .iter()
            .filter_map(|t| tok.token_to_id(t))
            .collect();
        let mut me = ChatTokenizer {
            tok,
            path: file,
            hash,
            template: Template::new(family, empty_think),
            bos,
            eos,
            unk,
            stop_ids,
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

    pub fn template(&self) -> &Template {
        &self.template
    }

    pub fn family(&self) -> Family {
        self.template.family
    }

    /// Ids that end a generated reply (`</s>`; `<|im_end|>` and `<|endoftext|>`).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The tokenizer hash plus the template's identity where it is not the default: what the
    /// token cache key and the loader fingerprint hash.
    pub fn cache_identity(&self) -> String {
        match self.template.identity() {
            None => self.hash.clone(),
            Some(t) => format!("{}+{t}", self.hash),
        }
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

    /// `text` through the normalizer, pre-tokenizer and model, with no added-token matching.
    fn tokenized(&self, text: &str) -> Result<PreTokenizedString> {
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
        Ok(pre)
    }

    /// Encode text with no special-token matching: normalizer, pre-tokenizer, model.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let pre = self.tokenized(text)?;
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
        let body = match self.template.family {
            Family::Minimind2 => self.encode_plain(strip_document_markers(text))?,
            Family::Chatml => {
                let t = text.strip_prefix(template::IM_START).unwrap_or(text);
                self.encode_plain(t.strip_suffix(template::IM_END).unwrap_or(t))?
            }
        };
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
        if messages.iter().any(Message::uses_tools) {
            return Err(template::no_tools_error());
        }
        if messages.first().map(|m| m.role) != Some(Role::System) {
            out.push(&[self.bos], UNTRAINED);
            out.push(&self.headers[Role::System as usize], UNTRAINED);
            out.push(&self.default_system, UNTRAINED);
            out.push(&[self.eos], UNTRAINED);
            out.push(&self.newline, UNTRAINED);
        }
        for m in messages {
            self.push_turn(out, m.role, &template::minimind2_content(m))?;
        }
        Ok(())
    }

    /// Encode chatml pieces: a structural token is its id (or, with a tokenizer that lacks
    /// it, its text); the text between two tokens is encoded as one string, as `tokenizers`
    /// encodes the rendered conversation, and each pre-token takes the class of the piece
    /// its last byte comes from.
    fn push_pieces(&self, out: &mut Encoded, pieces: &[Piece]) -> Result<()> {
        let mut text = String::new();
        let mut bounds: Vec<(usize, u8)> = Vec::new();
        for piece in pieces {
            let (s, class) = match piece {
                Piece::Token(name, class) => match self.tok.token_to_id(name) {
                    Some(id) => {
                        self.push_classed(out, &text, &bounds)?;
                        text.clear();
                        bounds.clear();
                        out.push(&[id], *class);
                        continue;
                    }
                    None => (*name, *class),
                },
                Piece::Text(s, class) => (s.as_str(), *class),
            };
            text.push_str(s);
            bounds.push((text.len(), class));
        }
        self.push_classed(out, &text, &bounds)
    }

    /// `text` encoded as plain text; `bounds` = (end byte, class) of consecutive pieces.
    fn push_classed(&self, out: &mut Encoded, text: &str, bounds: &[(usize, u8)]) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let pre = self.tokenized(text)?;
        for (_, (_, end), tokens) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            let Some(tokens) = tokens else { continue };
            let last = end.saturating_sub(1);
            let class = bounds
                .iter()
                .find(|(b, _)| last < *b)
                .map_or(UNTRAINED, |(_, c)| *c);
            let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
            out.push(&ids, class);
        }
        Ok(())
    }

    /// A whole training conversation with its per-token classes (messages only, no tools).
    pub fn encode_conversation(&self, messages: &[Message]) -> Result<Encoded> {
        self.encode_chat(&Chat {
            messages: messages.to_vec(),
            tools: Vec::new(),
        })
    }

    /// A whole training conversation (with its tools) and its per-token classes.
    pub fn encode_chat(&self, chat: &Chat) -> Result<Encoded> {
        let mut out = Encoded::default();
        match self.template.family {
            Family::Minimind2 => {
                if !chat.tools.is_empty() {
                    return Err(template::no_tools_error());
                }
                self.push_history(&mut out, &chat.messages)?;
            }
            Family::Chatml => {
                let p = chatml_pieces(chat, self.template.empty_think, false, false);
                self.push_pieces(&mut out, &p.0)?;
            }
        }
        Ok(out)
    }

    /// The history followed by `<s>assistant\n`: what the model continues at chat time.
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.encode_chat_prompt(
            &Chat {
                messages: messages.to_vec(),
                tools: Vec::new(),
            },
            false,
        )
    }

    /// The history (with its tools) followed by the generation prompt: `<s>assistant\n`, or
    /// `<|im_start|>assistant\n<think>\n\n</think>\n\n` (`thinking`: `…<think>\n`, the
    /// model writes its reasoning).
    pub fn encode_chat_prompt(&self, chat: &Chat, thinking: bool) -> Result<Vec<u32>> {
        let mut out = Encoded::default();
        match self.template.family {
            Family::Minimind2 => {
                if !chat.tools.is_empty() {
                    return Err(template::no_tools_error());
                }
                self.push_history(&mut out, &chat.messages)?;
                out.push(&[self.bos], UNTRAINED);
                out.push(&self.headers[Role::Assistant as usize], UNTRAINED);
            }
            Family::Chatml => {
                // The prompt is what the model reads: every turn as the template renders it.
                let p = chatml_pieces(chat, EmptyThink::Keep, true, thinking);
                self.push_pieces(&mut out, &p.0)?;
            }
        }
        Ok(out.ids)
    }

    pub fn encode_record(&self, record: &Record) -> Result<Encoded> {
        match record {
            Record::Text(t) => self.encode_document(t),
            Record::Chat(c) => self.encode_chat(c),
        }
    }

    /// The template as text (what the family's Jinja twin renders).
    pub fn render(
        &self,
        chat: &Chat,
        add_generation_prompt: bool,
        thinking: bool,
    ) -> Result<String> {
        template::render(&self.template, chat, add_generation_prompt, thinking)
    }
}

/// The minimind2 template as a string (what its `chat_template` renders).
pub fn render(messages: &[Message], add_generation_prompt: bool) -> String {
    let chat = Chat {
        messages: messages.to_vec(),
        tools: Vec::new(),
    };
    let t = Template::new(Family::Minimind2, EmptyThink::Keep);
    template::render(&t, &chat, add_generation_prompt, false).unwrap_or_default()
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
        Message::new(role, content)
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

    // --- the chatml family -------------------------------------------------------------

    use crate::jsonl::{Chat, ToolCall};
    use crate::template::{EmptyThink, Family};
    use crate::test_support::tiny_chatml_tokenizer;

    fn chat(messages: Vec<Message>, tools: &[&str]) -> Chat {
        Chat {
            messages,
            tools: tools.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn chatml_trains_reasoning_answer_tool_calls_and_im_end_only() {
        let dir = tempfile::tempdir().unwrap();
        let (tok, plain) = tiny_chatml_tokenizer(dir.path());
        assert_eq!(tok.family(), Family::Chatml);
        assert_eq!((tok.unk, tok.bos, tok.eos), (0, 1, 2));
        assert_eq!(tok.stop_ids(), &[2, 0]);
        let mut call = msg(Role::Assistant, "hello");
        call.tool_calls.push(ToolCall {
            name: "f".into(),
            arguments: "{\"x\": 1}".into(),
        });
        let mut reasoned = msg(Role::Assistant, "3");
        reasoned.reasoning = Some("1 + 2".into());
        let c = chat(
            vec![
                msg(Role::User, "你好"),
                call,
                msg(Role::Tool, "{\"y\": 2}"),
                reasoned,
            ],
            &["{\"name\": \"f\"}"],
        );
        let tools_text = format!(
            "system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{}\n</tools>\n\nFor each function call, return a json object with function name and arguments within ",
            c.tools[0]
        );
        let segs = vec![
            (Sp("<|im_start|>"), UNTRAINED),
            (Text(&tools_text), UNTRAINED),
            (Sp("<tool_call>"), UNTRAINED),
            (Sp("</tool_call>"), UNTRAINED),
            (Text(" XML tags:\n"), UNTRAINED),
            (Sp("<tool_call>"), UNTRAINED),
            (
                Text("\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"),
                UNTRAINED,
            ),
            (Sp("</tool_call>"), UNTRAINED),
            (Sp("<|im_end|>"), UNTRAINED),
            (Text("\n"), UNTRAINED),
            (Sp("<|im_start|>"), UNTRAINED),
            (Text("user\n你好"), UNTRAINED),
            (Sp("<|im_end|>"), UNTRAINED),
            (Text("\n"), UNTRAINED),
            // The call turn: empty think block (kept), answer, the call.
            (Sp("<|im_start|>"), UNTRAINED),
            (Text("assistant\n"), UNTRAINED),
            (Sp("<think>"), TAG),
            (Text("\n\n"), TRAINED),
            (Sp("</think>"), TAG),
            (Text("\n\nhello\n"), TRAINED),
            (Sp("<tool_call>"), TRAINED),
            (
                Text("\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n"),
                TRAINED,
            ),
            (Sp("</tool_call>"), TRAINED),
            (Sp("<|im_end|>"), TRAINED),
            (Text("\n"), UNTRAINED),
            // The tool's response, inside a user turn.
            (Sp("<|im_start|>"), UNTRAINED),
            (Text("user\n"), UNTRAINED),
            (Sp("<tool_response>"), UNTRAINED),
            (Text("\n{\"y\": 2}\n"), UNTRAINED),
            (Sp("</tool_response>"), UNTRAINED),
            (Sp("<|im_end|>"), UNTRAINED),
            (Text("\n"), UNTRAINED),
            (Sp("<|im_start|>"), UNTRAINED),
            (Text("assistant\n"), UNTRAINED),
            (Sp("<think>"), TAG),
            (Text("\n1 + 2\n"), TRAINED),
            (Sp("</think>"), TAG),
            (Text("\n\n3"), TRAINED),
            (Sp("<|im_end|>"), TRAINED),
            (Text("\n"), UNTRAINED),
        ];
        let got = tok.encode_chat(&c).unwrap();
        assert_same(&got, &expected(&tok, &plain, &segs));
        let rendered = tok.render(&c, false, false).unwrap();
        assert_eq!(tok.decode(&got.ids, false).unwrap(), rendered);
        // The ids are those `tokenizers` gives the rendered text (added tokens matched).
        assert_eq!(tok.encode_with_specials(&rendered).unwrap(), got.ids);
        // The prompt: the same history, then `<|im_start|>assistant\n<think>\n\n</think>\n\n`.
        let prompt = tok.encode_chat_prompt(&c, false).unwrap();
        let rendered = tok.render(&c, true, false).unwrap();
        assert_eq!(prompt, tok.encode_with_specials(&rendered).unwrap());
        assert!(rendered.ends_with("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        let thinking = tok.render(&c, true, true).unwrap();
        assert!(thinking.ends_with("<|im_start|>assistant\n<think>\n"));
    }

    #[test]
    fn chatml_can_drop_empty_think_blocks_and_keys_its_cache_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (keep, _) = tiny_chatml_tokenizer(dir.path());
        let file = dir.path().join("tokenizer.json");
        let drop = ChatTokenizer::load(&file, None, EmptyThink::Drop).unwrap();
        let c = chat(
            vec![msg(Role::User, "hello"), msg(Role::Assistant, " world")],
            &[],
        );
        let kept = keep.encode_chat(&c).unwrap();
        let dropped = drop.encode_chat(&c).unwrap();
        let text = drop.decode(&dropped.ids, false).unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n world<|im_end|>\n"
        );
        assert_eq!(kept.classes.iter().filter(|&&c| c == TAG).count(), 2);
        assert!(keep
            .decode(&kept.ids, false)
            .unwrap()
            .contains("assistant\n<think>\n\n</think>\n\n world"));
        assert!(!dropped.classes.contains(&TAG));
        // The answer's tokens and <|im_end|> are trained, the header is not; a pre-token that
        // straddles the header's newline and the answer counts as the answer.
        let trained: Vec<u32> = dropped
            .ids
            .iter()
            .zip(&dropped.classes)
            .filter(|(_, &c)| c == TRAINED)
            .map(|(&i, _)| i)
            .collect();
        let t = drop.decode(&trained, false).unwrap();
        assert!(t.ends_with("world<|im_end|>"), "{t:?}");
        assert!(!t.contains("assistant"), "{t:?}");
        // Cache identities: the default family is the bare hash, chatml's adds its options.
        assert_ne!(keep.cache_identity(), drop.cache_identity());
        assert!(keep.cache_identity().starts_with(keep.hash()));
        let m2 = ChatTokenizer::load(&file, Some(Family::Minimind2), EmptyThink::Keep);
        match m2 {
            Err(e) => assert!(e.to_string().contains("missing special token <s>"), "{e}"),
            Ok(_) => panic!("a chatml vocab loaded as minimind2"),
        }
    }

    #[test]
    fn minimind2_renders_reasoning_content_and_refuses_tools() {
        let dir = tempfile::tempdir().unwrap();
        let (tok, _) = tiny_tokenizer(dir.path(), true);
        assert_eq!(tok.family(), Family::Minimind2);
        assert_eq!(tok.stop_ids(), &[tok.eos]);
        assert_eq!(tok.cache_identity(), tok.hash());
        let mut a = msg(Role::Assistant, "<answer>\n3\n</answer>");
        a.reasoning = Some("1 + 2".into());
        let same = msg(
            Role::Assistant,
            "<think>\n1 + 2\n</think>\n<answer>\n3\n</answer>",
        );
        let u = msg(Role::User, "q");
        assert_eq!(
            tok.encode_conversation(&[u.clone(), a]).unwrap(),
            tok.encode_conversation(&[u.clone(), same]).unwrap()
        );
        let mut call = msg(Role::Assistant, "");
        call.tool_calls.push(ToolCall {
            name: "f".into(),
            arguments: "{}".into(),
        });
        for c in [
            chat(vec![u.clone(), call], &[]),
            chat(
                vec![u.clone(), msg(Role::Tool, "r"), msg(Role::Assistant, "a")],
                &[],
            ),
            chat(vec![u.clone(), msg(Role::Assistant, "a")], &["{}"]),
        ] {
            let e = tok.encode_chat(&c).unwrap_err().to_string();
            assert!(e.contains("the minimind2 template has no tools"), "{e}");
            assert!(tok.encode_chat_prompt(&c, false).is_err());
        }
    }
}
