//! Chat template families as data (contracts.md §2): their structural tokens, how a
//! conversation is laid out in pieces (each with its loss class), the generation prompt, the
//! stop tokens and the Jinja twin that `transformers`' `apply_chat_template` renders the same.
//!
//! * `minimind2` (the default): `<s>{role}\n{content}</s>\n`, a default system prompt, the
//!   reasoning tags inside assistant content (the tokenizer's own rendering lives in
//!   `tokenizer.rs`, unchanged since template version 1).
//! * `chatml` (MiniMind-3 / Qwen3 style): `<|im_start|>{role}\n…<|im_end|>\n`, a
//!   `<think>\n…\n</think>\n\n` block at the start of every assistant turn, a tools block in
//!   the system turn, `<tool_call>` JSON after the answer, `tool` messages as
//!   `<tool_response>` blocks inside a user turn. Equal in output to the chat template of
//!   MiniMind's `model/tokenizer_config.json`.

use crate::error::{DataError, Result};
use crate::jsonl::{Chat, Message, Role};
use crate::tokenizer::{TAG, TRAINED, UNTRAINED};

/// The system prompt the minimind2 family uses when a conversation does not start with one.
pub const DEFAULT_SYSTEM: &str = "你是 SpongeBob，一个乐于助人的人工智能助手。";

/// Bumped whenever the chatml rendering or masking changes (part of its cache identity; the
/// minimind2 family keeps `TEMPLATE_VERSION`).
pub const CHATML_VERSION: u32 = 1;

pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const THINK: &str = "<think>";
pub const END_THINK: &str = "</think>";
pub const TOOL_CALL: &str = "<tool_call>";
pub const END_TOOL_CALL: &str = "</tool_call>";
pub const TOOL_RESPONSE: &str = "<tool_response>";
pub const END_TOOL_RESPONSE: &str = "</tool_response>";

/// The added tokens a chatml tokenizer is trained with, at ids 0–8 (MiniMind's names): the
/// first three special (skipped when decoding with `skip_special_tokens`), the rest not.
pub const CHATML_SPECIAL_TOKENS: [&str; 9] = [
    ENDOFTEXT,
    IM_START,
    IM_END,
    THINK,
    END_THINK,
    TOOL_CALL,
    END_TOOL_CALL,
    TOOL_RESPONSE,
    END_TOOL_RESPONSE,
];

/// How many of a family's added tokens are special (the rest are plain added tokens).
pub const CHATML_NUM_SPECIAL: usize = 3;

const TOOLS_INTRO: &str = "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>";
const TOOLS_OUTRO: &str = "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Minimind2,
    Chatml,
}

impl Family {
    pub const NAMES: [&'static str; 2] = ["minimind2", "chatml"];

    pub fn parse(s: &str) -> Result<Family> {
        match s {
            "minimind2" => Ok(Family::Minimind2),
            "chatml" => Ok(Family::Chatml),
            _ => Err(DataError::Config(format!(
                "unknown template {s:?} (expected \"minimind2\" or \"chatml\")"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Minimind2 => "minimind2",
            Family::Chatml => "chatml",
        }
    }

    /// The family a tokenizer folder is made for: its `chat_template` names the structural
    /// tokens (`<|im_start|>` → chatml, `<s>` → minimind2); without one, a vocab holding
    /// `<|im_start|>` but not `<s>` is chatml; anything else minimind2.
    pub fn detect(chat_template: Option<&str>, has_token: impl Fn(&str) -> bool) -> Family {
        if let Some(t) = chat_template {
            if t.contains(IM_START) {
                return Family::Chatml;
            }
            if t.contains("<s>") {
                return Family::Minimind2;
            }
        }
        if has_token(IM_START) && !has_token("<s>") {
            Family::Chatml
        } else {
            Family::Minimind2
        }
    }

    /// `(begin-of-turn, end-of-turn, padding/unknown)` token names.
    pub fn markers(self) -> [&'static str; 3] {
        match self {
            Family::Minimind2 => ["<s>", "</s>", "<unk>"],
            Family::Chatml => [IM_START, IM_END, ENDOFTEXT],
        }
    }

    /// The added tokens `spongebob tokenizer train --template NAME` reserves, in id order.
    pub fn train_specials(self) -> &'static [&'static str] {
        match self {
            Family::Minimind2 => &crate::tokenizer::SPECIAL_TOKENS,
            Family::Chatml => &CHATML_SPECIAL_TOKENS,
        }
    }

    /// How many of `train_specials` are special tokens (skipped by `skip_special_tokens`).
    pub fn num_special(self) -> usize {
        match self {
            Family::Minimind2 => crate::tokenizer::SPECIAL_TOKENS.len(),
            Family::Chatml => CHATML_NUM_SPECIAL,
        }
    }

    /// Tokens that end a generated reply.
    pub fn stop_tokens(self) -> &'static [&'static str] {
        match self {
            Family::Minimind2 => &["</s>"],
            Family::Chatml => &[IM_END, ENDOFTEXT],
        }
    }

    /// The reasoning tags the family renders (and weighs with `think_weight`).
    pub fn reasoning_tags(self) -> &'static [&'static str] {
        match self {
            Family::Minimind2 => &crate::tokenizer::REASONING_TAGS,
            Family::Chatml => &[THINK, END_THINK],
        }
    }

    /// The Jinja twin (what `tokenizer_config.json`'s `chat_template` holds).
    pub fn jinja(self) -> &'static str {
        match self {
            Family::Minimind2 => MINIMIND2_JINJA,
            Family::Chatml => CHATML_JINJA,
        }
    }
}

/// What a chatml assistant turn without reasoning does with its empty
/// `<think>\n\n</think>\n\n`: trained like the rest of the turn (`Keep`, the default: it is
/// what `apply_chat_template` renders and what the generation prompt ends with), or left out
/// of the training text (`Drop`; MiniMind drops it in 80% of its samples).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmptyThink {
    Keep,
    Drop,
}

impl EmptyThink {
    pub fn parse(s: &str) -> Result<EmptyThink> {
        match s {
            "keep" => Ok(EmptyThink::Keep),
            "drop" => Ok(EmptyThink::Drop),
            _ => Err(DataError::Config(format!(
                "empty_think must be \"keep\" or \"drop\", not {s:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EmptyThink::Keep => "keep",
            EmptyThink::Drop => "drop",
        }
    }
}

/// A template family and its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Template {
    pub family: Family,
    pub empty_think: EmptyThink,
}

impl Template {
    pub fn new(family: Family, empty_think: EmptyThink) -> Template {
        Template {
            family,
            empty_think,
        }
    }

    /// What the token cache key and the loader fingerprint add to the tokenizer hash: nothing
    /// for the default minimind2 family (so those keys are the ones of before families).
    pub fn identity(&self) -> Option<String> {
        match self.family {
            Family::Minimind2 => None,
            Family::Chatml => Some(format!(
                "chatml-v{CHATML_VERSION}-{}",
                self.empty_think.name()
            )),
        }
    }
}

/// One piece of a rendered conversation: a structural token by name, or text, with the loss
/// class of its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Token(&'static str, u8),
    Text(String, u8),
}

#[derive(Default)]
pub struct Pieces(pub Vec<Piece>);

impl Pieces {
    fn tok(&mut self, name: &'static str, class: u8) {
        self.0.push(Piece::Token(name, class));
    }

    fn text(&mut self, text: impl Into<String>, class: u8) {
        let text = text.into();
        if text.is_empty() {
            return;
        }
        if let Some(Piece::Text(last, c)) = self.0.last_mut() {
            if *c == class {
                last.push_str(&text);
                return;
            }
        }
        self.0.push(Piece::Text(text, class));
    }

    /// Template-authored text (never content): its structural tokens are tokens.
    fn literal(&mut self, mut text: &str, class: u8) {
        while !text.is_empty() {
            let next = CHATML_SPECIAL_TOKENS
                .iter()
                .filter_map(|t| text.find(t).map(|pos| (pos, *t)))
                .min_by_key(|(pos, t)| (*pos, std::cmp::Reverse(t.len())));
            match next {
                None => {
                    self.text(text, class);
                    break;
                }
                Some((pos, t)) => {
                    self.text(&text[..pos], class);
                    self.tok(t, class);
                    text = &text[pos + t.len()..];
                }
            }
        }
    }

    /// The text these pieces render to.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for p in &self.0 {
            match p {
                Piece::Token(t, _) => s.push_str(t),
                Piece::Text(t, _) => s.push_str(t),
            }
        }
        s
    }
}

/// Python's `str.strip(chars)` family for one character.
fn strip_nl(s: &str) -> &str {
    s.trim_matches('\n')
}

/// An assistant turn's reasoning and answer as the chatml template reads them: its
/// `reasoning_content`, or else a `<think>…</think>` block inside the content.
pub fn split_reasoning(m: &Message) -> (String, String) {
    if let Some(r) = &m.reasoning {
        return (r.clone(), m.content.clone());
    }
    let c = &m.content;
    if let Some(first_end) = c.find(END_THINK) {
        let before = c[..first_end].trim_end_matches('\n');
        let reasoning = before
            .rsplit(THINK)
            .next()
            .unwrap_or(before)
            .trim_start_matches('\n');
        let last_end = c.rfind(END_THINK).unwrap_or(first_end);
        let answer = c[last_end + END_THINK.len()..].trim_start_matches('\n');
        return (reasoning.to_owned(), answer.to_owned());
    }
    (String::new(), c.clone())
}

/// The chatml layout of a conversation (MiniMind's `chat_template`), each piece classed:
/// assistant turns' reasoning, answer, tool calls and `<|im_end|>` trained (the think tags
/// as [`TAG`]), everything else untrained.
pub fn chatml_pieces(
    chat: &Chat,
    empty_think: EmptyThink,
    add_generation_prompt: bool,
    thinking: bool,
) -> Pieces {
    let msgs = &chat.messages;
    let mut p = Pieces::default();
    let first_system = msgs.first().filter(|m| m.role == Role::System);
    if !chat.tools.is_empty() {
        p.tok(IM_START, UNTRAINED);
        p.text("system\n", UNTRAINED);
        if let Some(s) = first_system {
            p.text(format!("{}\n\n", s.content), UNTRAINED);
        }
        p.text(TOOLS_INTRO, UNTRAINED);
        for t in &chat.tools {
            p.text(format!("\n{t}"), UNTRAINED);
        }
        p.literal(TOOLS_OUTRO, UNTRAINED);
    } else if let Some(s) = first_system {
        p.tok(IM_START, UNTRAINED);
        p.text(format!("system\n{}", s.content), UNTRAINED);
        p.tok(IM_END, UNTRAINED);
        p.text("\n", UNTRAINED);
    }
    for (i, m) in msgs.iter().enumerate() {
        match m.role {
            Role::System if i == 0 => {}
            Role::User | Role::System => {
                p.tok(IM_START, UNTRAINED);
                p.text(format!("{}\n{}", m.role.name(), m.content), UNTRAINED);
                p.tok(IM_END, UNTRAINED);
                p.text("\n", UNTRAINED);
            }
            Role::Assistant => {
                let (reasoning, answer) = split_reasoning(m);
                let reasoning = strip_nl(&reasoning);
                p.tok(IM_START, UNTRAINED);
                p.text("assistant\n", UNTRAINED);
                if !(reasoning.is_empty() && empty_think == EmptyThink::Drop) {
                    p.tok(THINK, TAG);
                    p.text(format!("\n{reasoning}\n"), TRAINED);
                    p.tok(END_THINK, TAG);
                    p.text("\n\n", TRAINED);
                }
                p.text(answer.trim_start_matches('\n'), TRAINED);
                for (k, call) in m.tool_calls.iter().enumerate() {
                    if k > 0 || !answer.is_empty() {
                        p.text("\n", TRAINED);
                    }
                    p.tok(TOOL_CALL, TRAINED);
                    p.text(
                        format!(
                            "\n{{\"name\": \"{}\", \"arguments\": {}}}\n",
                            call.name, call.arguments
                        ),
                        TRAINED,
                    );
                    p.tok(END_TOOL_CALL, TRAINED);
                }
                p.tok(IM_END, TRAINED);
                p.text("\n", UNTRAINED);
            }
            Role::Tool => {
                if i == 0 || msgs[i - 1].role != Role::Tool {
                    p.tok(IM_START, UNTRAINED);
                    p.text("user", UNTRAINED);
                }
                p.text("\n", UNTRAINED);
                p.tok(TOOL_RESPONSE, UNTRAINED);
                p.text(format!("\n{}\n", m.content), UNTRAINED);
                p.tok(END_TOOL_RESPONSE, UNTRAINED);
                if i + 1 == msgs.len() || msgs[i + 1].role != Role::Tool {
                    p.tok(IM_END, UNTRAINED);
                    p.text("\n", UNTRAINED);
                }
            }
        }
    }
    if add_generation_prompt {
        p.tok(IM_START, UNTRAINED);
        p.text("assistant\n", UNTRAINED);
        p.tok(THINK, UNTRAINED);
        if thinking {
            p.text("\n", UNTRAINED);
        } else {
            p.text("\n\n", UNTRAINED);
            p.tok(END_THINK, UNTRAINED);
            p.text("\n\n", UNTRAINED);
        }
    }
    p
}

/// The error for tool fields under a family without tools.
pub fn no_tools_error() -> DataError {
    DataError::Tokenize("the minimind2 template has no tools; use --template chatml".into())
}

/// A minimind2 assistant turn's content with its `reasoning_content` (if any) in front, as
/// `<think>\n{reasoning}\n</think>\n{content}`.
pub fn minimind2_content(m: &Message) -> std::borrow::Cow<'_, str> {
    match (&m.reasoning, m.role) {
        (Some(r), Role::Assistant) => format!("<think>\n{r}\n</think>\n{}", m.content).into(),
        _ => std::borrow::Cow::Borrowed(m.content.as_str()),
    }
}

/// The template as text (what the family's Jinja twin renders; for chatml with
/// `EmptyThink::Drop`, the training text without the empty think blocks).
pub fn render(
    template: &Template,
    chat: &Chat,
    add_generation_prompt: bool,
    thinking: bool,
) -> Result<String> {
    match template.family {
        Family::Chatml => {
            Ok(chatml_pieces(chat, template.empty_think, add_generation_prompt, thinking).render())
        }
        Family::Minimind2 => {
            let msgs = &chat.messages;
            if !chat.tools.is_empty() || msgs.iter().any(Message::uses_tools) {
                return Err(no_tools_error());
            }
            let mut s = String::new();
            if msgs.first().map(|m| m.role) != Some(Role::System) {
                s.push_str(&format!("<s>system\n{DEFAULT_SYSTEM}</s>\n"));
            }
            for m in msgs {
                s.push_str(&format!(
                    "<s>{}\n{}</s>\n",
                    m.role.name(),
                    minimind2_content(m)
                ));
            }
            if add_generation_prompt {
                s.push_str("<s>assistant\n");
            }
            Ok(s)
        }
    }
}

/// The minimind2 Jinja twin.
pub const MINIMIND2_JINJA: &str = concat!(
    "{%- if messages[0]['role'] != 'system' -%}",
    "{{- '<s>system\\n",
    "你是 SpongeBob，一个乐于助人的人工智能助手。",
    "</s>\\n' -}}",
    "{%- endif -%}",
    "{%- for message in messages -%}",
    "{{- '<s>' + message['role'] + '\\n' -}}",
    "{%- if message['role'] == 'assistant' and message['reasoning_content'] is string -%}",
    "{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n' -}}",
    "{%- endif -%}",
    "{{- message['content'] + '</s>\\n' -}}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '<s>assistant\\n' -}}{%- endif -%}",
);

/// The chatml Jinja twin, written for SpongeBob; renders what MiniMind's template renders.
pub const CHATML_JINJA: &str = r#"{%- set lead = messages[0] if messages else none -%}
{%- set lead_system = lead is not none and lead.role == 'system' -%}
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if lead_system -%}{{- lead.content + '\n\n' -}}{%- endif -%}
{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
{%- for schema in tools -%}{{- '\n' + (schema | tojson) -}}{%- endfor -%}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif lead_system -%}
{{- '<|im_start|>system\n' + lead.content + '<|im_end|>\n' -}}
{%- endif -%}
{%- for m in messages -%}
{%- set text = m.content if m.content is string else '' -%}
{%- if m.role == 'user' or (m.role == 'system' and not loop.first) -%}
{{- '<|im_start|>' + m.role + '\n' + text + '<|im_end|>\n' -}}
{%- elif m.role == 'assistant' -%}
{%- set think = '' -%}
{%- if m.reasoning_content is string -%}
{%- set think = m.reasoning_content -%}
{%- elif '</think>' in text -%}
{%- set think = text.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
{%- set text = text.split('</think>')[-1].lstrip('\n') -%}
{%- endif -%}
{{- '<|im_start|>assistant\n<think>\n' + think.strip('\n') + '\n</think>\n\n' + text.lstrip('\n') -}}
{%- for call in (m.tool_calls or []) -%}
{%- set fn = call.function if call.function else call -%}
{%- if text or not loop.first -%}{{- '\n' -}}{%- endif -%}
{{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' -}}
{{- fn.arguments if fn.arguments is string else (fn.arguments | tojson) -}}
{{- '}\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- elif m.role == 'tool' -%}
{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' + text + '\n</tool_response>' -}}
{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n<think>\n' -}}
{%- if not (open_thinking is defined and open_thinking is true) -%}{{- '\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jsonl::ToolCall;

    fn chat(messages: Vec<Message>, tools: &[&str]) -> Chat {
        Chat {
            messages,
            tools: tools.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn chatml_renders_minimind_s_layout() {
        let mut a = Message::new(Role::Assistant, "");
        a.tool_calls.push(ToolCall {
            name: "f".into(),
            arguments: "{\"x\": 1}".into(),
        });
        let c = chat(
            vec![
                Message::new(Role::System, "S"),
                Message::new(Role::User, "q"),
                a,
                Message::new(Role::Tool, "r1"),
                Message::new(Role::Tool, "r2"),
                Message::new(Role::Assistant, "<think>\nhm\n</think>\n\nok"),
            ],
            &["{\"name\": \"f\"}"],
        );
        let t = Template::new(Family::Chatml, EmptyThink::Keep);
        let got = render(&t, &c, true, false).unwrap();
        let expected = format!(
            "<|im_start|>system\nS\n\n{TOOLS_INTRO}\n{{\"name\": \"f\"}}{TOOLS_OUTRO}\
             <|im_start|>user\nq<|im_end|>\n\
             <|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n{{\"name\": \"f\", \"arguments\": {{\"x\": 1}}}}\n</tool_call><|im_end|>\n\
             <|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response><|im_end|>\n\
             <|im_start|>assistant\n<think>\nhm\n</think>\n\nok<|im_end|>\n\
             <|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
        assert_eq!(got, expected);
        let drop = Template::new(Family::Chatml, EmptyThink::Drop);
        let dropped = render(&drop, &c, false, false).unwrap();
        assert!(!dropped.contains("<think>\n\n</think>\n\n"));
        assert!(dropped.contains("<think>\nhm\n</think>\n\nok"));
        // The minimind2 family has no tools.
        let m2 = Template::new(Family::Minimind2, EmptyThink::Keep);
        assert!(render(&m2, &c, false, false)
            .unwrap_err()
            .to_string()
            .contains("use --template chatml"));
    }

    #[test]
    fn reasoning_is_read_from_the_field_or_the_content() {
        let mut m = Message::new(Role::Assistant, "\n\nanswer");
        m.reasoning = Some("\nwhy\n".into());
        assert_eq!(split_reasoning(&m), ("\nwhy\n".into(), "\n\nanswer".into()));
        let m = Message::new(Role::Assistant, "x<think>\n\na\n\n</think>b</think>\n\nc");
        assert_eq!(split_reasoning(&m), ("a".into(), "c".into()));
        let m = Message::new(Role::Assistant, "<think>only");
        assert_eq!(split_reasoning(&m), ("".into(), "<think>only".into()));
    }

    #[test]
    fn families_are_detected_from_the_template_then_the_vocab() {
        let none = |_: &str| false;
        assert_eq!(Family::detect(Some(CHATML_JINJA), none), Family::Chatml);
        assert_eq!(
            Family::detect(Some(MINIMIND2_JINJA), |t| t == IM_START),
            Family::Minimind2
        );
        assert_eq!(Family::detect(None, |t| t == IM_START), Family::Chatml);
        assert_eq!(Family::detect(None, |_| true), Family::Minimind2);
        assert_eq!(Family::detect(None, none), Family::Minimind2);
    }
}
