"""Built-in tools and `spongebob chat --tools`: the calculator against Python's arithmetic, its
refusals, and the chat loop (call → tool message → continue) with a scripted chatml model."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from dataclasses import replace

import pytest

from spongebob import tools
from spongebob.chat import ChatSession, reply_to
from spongebob.errors import UserError
from spongebob.generate import Generator, SamplingConfig
from test_generate import make_checkpoint
from test_serve import Reasoner


def test_calc_equals_python_arithmetic_on_random_expressions():
    rng = random.Random(0)
    for _ in range(300):
        a, b, c = (rng.randint(-999, 999) for _ in range(3))
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        expr = f"{a} {op1} ({b} {op2} {c})"
        assert tools.calc(expr) == str(eval(expr)), expr  # ints and + - * only, made here
    assert (
        tools.calc("7 / 2") == "3.5" and tools.calc("8/2") == "4" and tools.calc("2**10") == "1024"
    )
    assert tools.calc("12×3") == "36" and tools.calc(" 100 - 37 ") == "63"


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ("__import__('os')", "not allowed"),
        ("a + 1", "not allowed"),
        ("9**9**9", "exponent"),
        ("1/0", "division by zero"),
        ("1 +", "not an arithmetic expression"),
        ("", "1 to 200 characters"),
    ],
)
def test_calc_refuses_what_is_not_arithmetic(expr, why):
    with pytest.raises(ValueError, match=why):
        tools.calc(expr)
    assert tools.run("calc", {"expr": expr}).startswith("error: ")  # a result, not a crash


def test_run_answers_bad_calls_with_an_error_result():
    assert tools.run("calc", {"expr": "6*7"}) == "42"
    assert tools.run("calc", {}).startswith("error: calc takes")
    assert tools.run("weather", {"city": "x"}) == "error: no tool named 'weather'"
    with pytest.raises(UserError, match="unknown tool 'weather'"):
        tools.pick(["weather"])


class Rounds(Reasoner):
    """A scripted model with one script per prompt (each prefill starts the next one)."""

    def __init__(self, scripts: list[list[int]], vocab: int) -> None:
        super().__init__(scripts[0], vocab)
        self.scripts, self.prompts = scripts, []
        self.config = replace(self.config, max_seq_len=4096)  # room for the tools block

    def forward(self, input_ids, **kw):
        if input_ids.shape[1] > 1:
            self.prompts.append(input_ids[0].tolist())
            self.script = self.scripts[min(len(self.prompts), len(self.scripts)) - 1]
        return super().forward(input_ids, **kw)


def test_chat_runs_the_calculator_and_continues_with_its_result(chatml_tok):
    t = chatml_tok
    call = '<tool_call>\n{"name": "calc", "arguments": {"expr": "12*3"}}\n</tool_call>'
    end = t.token_to_id("<|im_end|>")
    model = Rounds(
        [[*map(int, t.encode(call)), end], [*map(int, t.encode("等于36。")), end]], t.vocab_size
    )
    session = ChatSession(t, "chat", history=4, tools=["calc"])
    session.check()
    out = io.StringIO()
    cfg = SamplingConfig(max_new_tokens=200, temperature=0.0)
    text, finish = reply_to(session, Generator(model, t), "12*3 是多少？", cfg, out=out)
    assert (text, finish) == ("等于36。", "stop")
    assert '[工具] calc({"expr": "12*3"}) → 36' in out.getvalue()
    # The second prompt is the template's rendering of the call and its result.
    calls = [{"type": "function", "function": {"name": "calc", "arguments": {"expr": "12*3"}}}]
    history = [
        {"role": "user", "content": "12*3 是多少？"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "36"},
    ]
    want = t.encode_prompt(history, tools=[tools.CALC_SCHEMA])
    assert model.prompts[1] == [int(i) for i in want]
    assert "<tool_response>\n36\n</tool_response>" in t.decode(model.prompts[1])
    # The whole exchange stays in the history for the next turn.
    assert session.turns[0] == [*history, {"role": "assistant", "content": "等于36。"}]


def test_a_model_that_keeps_calling_stops_after_max_tool_rounds(chatml_tok):
    t = chatml_tok
    call = '<tool_call>\n{"name": "calc", "arguments": {"expr": "1+1"}}\n</tool_call>'
    model = Rounds([[*map(int, t.encode(call)), t.token_to_id("<|im_end|>")]], t.vocab_size)
    session = ChatSession(t, "chat", tools=["calc"])
    cfg = SamplingConfig(max_new_tokens=200, temperature=0.0)
    reply_to(session, Generator(model, t), "1+1?", cfg)
    from spongebob.chat import MAX_TOOL_ROUNDS

    assert len(model.prompts) == MAX_TOOL_ROUNDS + 1


def test_tools_on_a_minimind2_checkpoint_is_a_one_line_error(tmp_path, tok_dir):
    ckpt = make_checkpoint(tmp_path / "ckpt", tok_dir)
    r = subprocess.run(
        [sys.executable, "-m", "spongebob", "chat", "--ckpt", str(ckpt), "--tools", "calc",
         "--prompt", "1+1?", "--device", "cpu"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode != 0
    assert "--tools needs a chatml-family tokenizer" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
