"""`spongebob chat`: a two-turn conversation through a pseudo-terminal, scripted mode in a
subprocess, reason-mode display, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spongebob.chat import ANSWER_LABEL, THINK_LABEL, USER_PROMPT, ChatSession, ReasonView
from spongebob.generate import Generator, SamplingConfig
from test_generate import load_ckpt

GREEDY_FLAGS = ["--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


U1, U2 = "你好，你是谁？", "法国的首都是哪里？"


def _chatty_model(seed: int):
    """A random model that answers in readable, context-dependent text: byte tokens (ids
    below 263) are nearly silenced, and attention is scaled up so the history matters."""
    import torch

    from test_generate import tiny_model

    model = tiny_model(seed, sharpen=3.0)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.mul_(30)
            layer.self_attn.v_proj.weight.mul_(30)
        model.embed_tokens.weight[:263].mul_(0.05)
    return model


def _replies(model, tok) -> tuple[str, str, str]:
    gen = Generator(model, tok)
    cfg = SamplingConfig(max_new_tokens=8, temperature=0)

    def reply(msgs):
        return gen.generate([list(tok.encode_prompt(msgs))], cfg)[0].text

    r1 = reply([{"role": "user", "content": U1}])
    r2 = reply(
        [
            {"role": "user", "content": U1},
            {"role": "assistant", "content": r1},
            {"role": "user", "content": U2},
        ]
    )
    return r1, r2, reply([{"role": "user", "content": U2}])


@pytest.fixture(scope="module")
def chatty(tmp_path_factory, tok_dir, chat_tok):
    """(checkpoint, (r1, r2 with history, r2 alone)) for the first seed whose greedy replies
    are printable and depend on the history, so the tests below can tell them apart."""
    from dataclasses import asdict

    from spongebob.checkpoint import save_checkpoint

    for seed in range(20):
        model = _chatty_model(seed)
        r1, r2, r2_alone = _replies(model, chat_tok)
        text = r1 + r2 + r2_alone
        if r2 != r2_alone and text.isprintable() and "\ufffd" not in text and r1.strip():
            path = tmp_path_factory.mktemp("chat") / "final"
            meta = {"model": asdict(model.config), "stage": "sft", "step": 0}
            return save_checkpoint(path, model, meta, tokenizer_dir=tok_dir), (r1, r2, r2_alone)
    pytest.fail("no seed gave a history-dependent printable model")


@pytest.fixture(scope="module")
def ckpt(chatty) -> Path:
    return chatty[0]


@pytest.fixture(scope="module")
def expected(chatty, ckpt):
    """The in-process replies, recomputed from the saved checkpoint (so loading is covered)."""
    model, tok, _ = load_ckpt(ckpt)
    assert _replies(model, tok) == chatty[1]
    return (U1, U2, *chatty[1])


def _env() -> dict:
    env = dict(os.environ, TERM="dumb", PYTHONIOENCODING="utf-8", NO_COLOR="1")
    env.pop("PYTHONSTARTUP", None)
    return env


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spongebob", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=_env(),
        timeout=120,
    )


def _clean(s: str) -> str:
    return ANSI.sub("", s).replace("\r\n", "\n")


def test_two_turn_conversation_in_a_pseudo_terminal_keeps_history(ckpt, expected):
    import pexpect

    u1, u2, r1, r2, r2_alone = expected
    child = pexpect.spawn(
        sys.executable,
        ["-m", "spongebob", "chat", "--ckpt", str(ckpt), *GREEDY_FLAGS],
        env=_env(),
        encoding="utf-8",
        timeout=120,
    )
    try:
        child.expect_exact(USER_PROMPT)
        replies = []
        for user in (u1, u2, "/reset", u2):
            child.sendline(user)
            child.expect_exact(USER_PROMPT)
            out = _clean(child.before)
            if user == "/reset":
                assert "history cleared" in out
                continue
            replies.append(out.split("SpongeBob> ", 1)[1].removesuffix("\n"))
        assert replies == [r1, r2, r2_alone]
        child.sendeof()  # Ctrl-D quits cleanly
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_slash_exit_ends_the_repl(ckpt):
    import pexpect

    child = pexpect.spawn(
        sys.executable,
        ["-m", "spongebob", "chat", "--ckpt", str(ckpt), "--device", "cpu"],
        env=_env(),
        encoding="utf-8",
        timeout=120,
    )
    try:
        child.expect_exact(USER_PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_noninteractive_prompts_form_one_conversation_and_print_json(ckpt, expected, tmp_path):
    u1, u2, r1, r2, r2_alone = expected
    res = _run("--ckpt", str(ckpt), *GREEDY_FLAGS, "--json", "--prompt", u1, "--prompt", u2)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == [u1, u2]
    assert [x["reply"] for x in lines] == [r1, r2]

    # --history 0 answers each prompt alone; --prompts-file reads the same turns.
    f = tmp_path / "prompts.txt"
    f.write_text(f"{u1}\n\n{u2}\n", encoding="utf-8")
    res = _run(
        "--ckpt", str(ckpt), *GREEDY_FLAGS, "--json", "--history", "0", "--prompts-file", str(f)
    )
    assert res.returncode == 0, res.stderr
    assert [json.loads(x)["reply"] for x in res.stdout.splitlines()] == [r1, r2_alone]


@pytest.mark.parametrize("case", ["empty prompt", "missing", "corrupt", "vocab"])
def test_bad_input_is_one_line_error_without_traceback(
    case, ckpt, tmp_path, tok_dir, minimind_tok_dir
):
    args = ["--ckpt", str(ckpt), "--prompt", "你好", *GREEDY_FLAGS]
    if case == "empty prompt":
        args = ["--ckpt", str(ckpt), "--prompt", "  "]
    elif case == "missing":
        args[1] = str(tmp_path / "nothing")
    elif case == "corrupt":
        from test_generate import make_checkpoint

        bad = make_checkpoint(tmp_path / "bad", tok_dir)
        (bad / "model.safetensors").write_bytes(b"not a safetensors file")
        args[1] = str(bad)
    else:
        args += ["--tokenizer", str(minimind_tok_dir)]
    res = _run(*args)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spongebob: error:"), res.stderr
    assert {
        "empty prompt": "empty prompt",
        "missing": "no such",
        "corrupt": "corrupt",
        "vocab": "tokens but the model",
    }[case] in lines[0]


# --- in-process pieces ----------------------------------------------------------------------


def test_reason_view_shows_think_apart_from_answer_however_the_text_is_split():
    reply = "<think>\n原来有1块。\n1 + 29 = 30。\n</think>\n<answer>\n30\n</answer>"
    want = f"{THINK_LABEL}原来有1块。\n1 + 29 = 30。\n{ANSWER_LABEL}30"
    for size in (1, 2, 3, 7, len(reply)):
        view = ReasonView()
        shown = "".join(view.feed(reply[i : i + size]) for i in range(0, len(reply), size))
        assert shown + view.flush() == want
    view = ReasonView()  # a '<' that starts no tag is ordinary text
    assert view.feed("1 < 2 <b>") + view.flush() == "1 < 2 <b>"


def test_session_keeps_the_last_n_exchanges_and_only_answers_in_reason_mode(chat_tok):
    s = ChatSession(chat_tok, "chat", history=2, system="简短回答。")
    for i in range(3):
        s.record(f"q{i}", f"a{i}")
    msgs = s.messages("q3")
    assert msgs[0] == {"role": "system", "content": "简短回答。"}
    assert [m["content"] for m in msgs[1:]] == ["q1", "a1", "q2", "a2", "q3"]
    ids = s.prompt_ids("q3")
    assert chat_tok.decode(ids).endswith("<s>assistant\n")

    r = ChatSession(chat_tok, "reason", history=4)
    r.record("q", "<think>\nhmm\n</think>\n<answer>\n42\n</answer>")
    assert r.turns == [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "42"}]]

    p = ChatSession(chat_tok, "pretrain", history=4)
    ids = p.prompt_ids("从前")
    assert ids[0] == chat_tok.bos_id and chat_tok.decode(ids[1:]) == "从前"
    p.record("从前", "有座山")
    assert p.turns == []


def _triton_checkpoint(ckpt: Path, tmp_path: Path) -> Path:
    """A copy of `ckpt` whose config says it was trained with Triton kernels and FlexAttention
    (what checkpoints of older versions stored in the model config)."""
    import shutil

    out = tmp_path / "triton-final"
    shutil.copytree(ckpt, out)
    meta = json.loads((out / "config.json").read_text())
    meta["model"].update(kernels="triton", attention="flex")
    meta["train"] = {"kernels": "triton", "attention": "flex", "device": "cuda", "seq_len": 64}
    (out / "config.json").write_text(json.dumps(meta))
    return out


def test_a_checkpoint_trained_with_triton_kernels_chats_and_evaluates_on_cpu(
    ckpt, expected, tmp_path
):
    u1, _, r1, _, _ = expected
    tri = _triton_checkpoint(ckpt, tmp_path)
    r = _run("--ckpt", str(tri), "--prompt", u1, "--device", "cpu", *GREEDY_FLAGS)
    assert r.returncode == 0, r.stderr
    assert _clean(r.stdout).rstrip("\n") == r1
    # --kernels picks the op set at load time; triton needs CUDA (or the interpreter).
    env = {k: v for k, v in _env().items() if k != "TRITON_INTERPRET"}
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "spongebob",
            "chat",
            "--ckpt",
            str(tri),
            "--prompt",
            u1,
            "--device",
            "cpu",
            "--kernels",
            "triton",
            *GREEDY_FLAGS,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith("spongebob: error: --kernels triton needs a CUDA device")

    data = tmp_path / "eval.jsonl"
    msgs = [{"role": "user", "content": u1}, {"role": "assistant", "content": "好的。"}]
    data.write_text(json.dumps({"conversations": msgs, "answer": "好"}) + "\n", encoding="utf-8")
    out = tmp_path / "eval.json"
    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "spongebob",
            "eval",
            "--ckpt",
            str(tri),
            "--data",
            str(data),
            "--device",
            "cpu",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert ev.returncode == 0, ev.stderr
    res = json.loads(out.read_text())["files"][str(data)]
    assert res["perplexity"]["tokens"] > 0 and res["perplexity"]["ppl"] > 1
    assert res["answers"]["summary"]["all"]["n"] == 1
