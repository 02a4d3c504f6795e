"""The chat loop in-process, with a scripted generator instead of a model: multi-turn history
in chat and reason mode for both template families, and a reasoning (distilled) model in chat
mode — its think block shown apart from its answer, only the answer kept in the history."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from spongebob.chat import ANSWER_LABEL, THINK_LABEL, ChatSession, ReasonView, reply_to
from spongebob.generate import TAGS, SamplingConfig

CFG = SamplingConfig(max_new_tokens=64, temperature=0.0)
U1, U2 = "法国的首都是哪里？", "那德国呢？"
THINK, ANSWER = "法国的首都是巴黎。", "巴黎。"


class ScriptedGenerator:
    """Stands in for `Generator`: streams the next scripted reply in `size`-character pieces
    (so tags arrive split, as from a tokenizer without tag tokens) and keeps every prompt."""

    def __init__(self, replies: list[str], size: int = 2) -> None:
        self.replies, self.size, self.prompts = list(replies), size, []

    def stream(self, ids, cfg):
        self.prompts.append(list(ids))
        text = self.replies.pop(0)
        for i in range(0, len(text), self.size):
            yield text[i : i + self.size]
        return SimpleNamespace(finish="stop")


@pytest.fixture(params=["minimind2", "chatml"])
def tok(request, chat_tok, chatml_tok):
    t = chat_tok if request.param == "minimind2" else chatml_tok
    assert t.template == request.param
    return t


def reasoning_reply(template: str, opened: bool = False, answer: str = ANSWER) -> str:
    """How a distilled model of the family writes a reasoning reply (`opened`: the prompt
    already ends in `<think>`, chatml's reason mode)."""
    if template == "minimind2":
        return f"<think>\n{THINK}\n</think>\n<answer>\n{answer}\n</answer>"
    return ("" if opened else "<think>\n") + f"{THINK}\n</think>\n\n{answer}"


def run_turns(session: ChatSession, replies: list[str], users=(U1, U2), size: int = 2):
    """Play the turns; return (the generator, what each turn displayed)."""
    gen, shown = ScriptedGenerator(replies, size), []
    for user in users:
        out = io.StringIO()
        reply_to(session, gen, user, CFG, out=out)
        shown.append(out.getvalue())
    return gen, shown


def ids(tok, messages, thinking=False) -> list[int]:
    return [int(i) for i in tok.encode_prompt(messages, thinking=thinking)]


@pytest.mark.parametrize("mode", ["chat", "reason"])
def test_second_turn_prompt_contains_the_first_exchange(tok, mode):
    s = ChatSession(tok, mode, history=4)
    first = ANSWER if mode == "chat" else reasoning_reply(tok.template, s.opened)
    gen, _ = run_turns(s, [first, "柏林。"])
    history = [
        {"role": "user", "content": U1},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": U2},
    ]
    assert gen.prompts[0] == ids(tok, history[:1], s.opened)
    assert gen.prompts[1] == ids(tok, history, s.opened)
    assert U1 in tok.decode(gen.prompts[1]) and ANSWER in tok.decode(gen.prompts[1])


@pytest.mark.parametrize("mode", ["chat", "reason"])
def test_history_keeps_only_the_last_n_exchanges(tok, mode):
    s = ChatSession(tok, mode, history=1)
    replies = [reasoning_reply(tok.template, s.opened, a) for a in ("一。", "二。", "三。")]
    gen, _ = run_turns(s, replies, users=("q1", "q2", "q3"))
    want = [
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "二。"},
        {"role": "user", "content": "q3"},
    ]
    assert gen.prompts[2] == ids(tok, want, s.opened)
    assert len(s.turns) == 3 and s.messages("q4")[0]["content"] == "q3"


def test_chat_mode_separates_reasoning_from_answer_when_the_model_reasons(tok):
    """A distilled model answering a chat prompt with a think block is displayed exactly as
    reason mode displays its reasoning: labels, no tags, however the stream is split."""
    want = f"{THINK_LABEL}{THINK}\n{ANSWER_LABEL}{ANSWER}"
    reason = ChatSession(tok, "reason")
    for size in (1, 2, 3, 100):
        chat = ChatSession(tok, "chat")
        _, shown = run_turns(chat, [reasoning_reply(tok.template)], users=[U1], size=size)
        _, reason_shown = run_turns(
            reason, [reasoning_reply(tok.template, reason.opened)], users=[U1], size=size
        )
        assert shown == reason_shown == [want]
    chat = ChatSession(tok, "chat")  # whitespace before the think block is no plain reply
    _, shown = run_turns(chat, ["\n " + reasoning_reply(tok.template)], users=[U1])
    assert shown == [want]


@pytest.mark.parametrize(
    "reply",
    ["巴黎。", "\n  巴黎。\n", "1 < 2 <b>加粗</b>", "我想：<think>不是开头</think>", "  <thin", ""],
)
def test_chat_mode_passes_a_plain_reply_through_unchanged(chat_tok, reply):
    for size in (1, 2, 5, 100):
        _, shown = run_turns(ChatSession(chat_tok, "chat"), [reply], users=[U1], size=size)
        assert shown == [reply]
    view = ReasonView(detect=True)  # streaming: a plain reply is not held back to the end
    assert view.feed("巴") == "巴" and view.feed("黎<thi") == "黎<thi" and view.flush() == ""


@pytest.mark.parametrize("mode", ["chat", "reason"])
def test_history_records_only_the_answer_of_a_reasoning_reply(tok, mode):
    s = ChatSession(tok, mode)
    gen, _ = run_turns(s, [reasoning_reply(tok.template, s.opened), "柏林。"])
    assert s.turns[0] == [
        {"role": "user", "content": U1},
        {"role": "assistant", "content": ANSWER},
    ]
    assert THINK not in tok.decode(gen.prompts[1])  # the reasoning is not in the next prompt


def test_history_records_a_plain_chat_reply_as_is(tok):
    s = ChatSession(tok, "chat")
    run_turns(s, ["\n巴黎，法国的首都。\n", "柏林。"])
    assert s.turns[0][1]["content"] == "\n巴黎，法国的首都。\n"


@pytest.mark.parametrize(
    "reply",
    [
        "<think>\n</answer>",  # what a demo model's second chat turn read
        "<think>\n想一想\n</think>",  # reasoning that never answered
        "<think>想</think><answer>巴黎</answer><answer>再说一遍</answer>",
        "巴黎。</think>\n\n<answer>巴黎</answer>",  # a stray closing tag in a plain reply
    ],
)
@pytest.mark.parametrize("mode", ["chat", "reason"])
def test_recorded_history_never_contains_a_reasoning_tag(tok, mode, reply):
    s = ChatSession(tok, mode)
    gen, _ = run_turns(s, [reply, "柏林。"])
    recorded = s.turns[0][1]["content"]
    assert not any(t in recorded for t in TAGS), recorded
    if tok.template == "minimind2":  # chatml's template itself writes an empty think block
        assert not any(t in tok.decode(gen.prompts[1]) for t in TAGS)
