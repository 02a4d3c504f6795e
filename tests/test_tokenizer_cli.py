"""Issue 2: `spongebob tokenizer train|info` as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import reference as ref


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "spongebob"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("spongebob")
    return [found] if found else [sys.executable, "-m", "spongebob"]


def run_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*_cli(), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


GOOD_TEXT = b'{"text": "\xe4\xbd\xa0\xe5\xa5\xbd world"}\n'
GOOD_CHAT = (
    b'{"conversations": [{"role": "user", "content": "hi"}, '
    b'{"role": "assistant", "content": "ok"}]}\n'
)


def _bad_inputs(tmp_path: Path):
    """name → (files to pass, the path that must be named, the line that must be named or None)."""
    missing = tmp_path / "missing.jsonl"
    bad_json = tmp_path / "bad_json.jsonl"
    bad_json.write_bytes(GOOD_TEXT + GOOD_CHAT + b'{"text": "unterminated\n' + GOOD_TEXT)
    bad_utf8 = tmp_path / "bad_utf8.jsonl"
    bad_utf8.write_bytes(GOOD_TEXT + b'{"text": "\xff\xfe broken"}\n' + GOOD_TEXT)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    good = tmp_path / "good.jsonl"
    good.write_bytes(GOOD_TEXT * 3)
    return {
        "missing_file": ([good, missing], missing, None),
        "invalid_json_line": ([good, bad_json], bad_json, 3),
        "invalid_utf8": ([bad_utf8], bad_utf8, 2),
        "empty_file": ([good, empty], empty, None),
    }


@pytest.mark.parametrize(
    "case", ["missing_file", "invalid_json_line", "invalid_utf8", "empty_file"]
)
def test_tokenizer_train_bad_input_fails_with_one_line_naming_file_and_line(tmp_path, case):
    files, named, line = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    res = run_cli("tokenizer", "train", "--data", *files, "--vocab-size", 300, "--out", out)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, res.stderr
    where = f"{named}:{line}" if line is not None else str(named)
    assert where in errors[0], res.stderr
    assert not (out / "tokenizer.json").exists()


def test_tokenizer_train_cli_writes_a_loadable_tokenizer_with_specials_0_to_6(tmp_path):
    import random

    from tokenizers import Tokenizer

    rng = random.Random(5)
    data = ref.write_jsonl(tmp_path / "d.jsonl", ref.text_objs(rng, 100) + ref.chat_objs(rng, 50))
    out = tmp_path / "tok"
    res = run_cli("tokenizer", "train", "--data", data, "--vocab-size", 400, "--out", out)
    assert res.returncode == 0, res.stderr
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == 400
    for i, t in enumerate(["<unk>", "<s>", "</s>", "<think>", "</think>", "<answer>", "</answer>"]):
        assert tok.token_to_id(t) == i
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "chat_template" in config


def test_tokenizer_info_reports_vocab_specials_and_chars_per_token(tmp_path, tok_dir, chat_tok):
    import random

    rng = random.Random(9)
    objs = ref.text_objs(rng, 40)
    data = ref.write_jsonl(tmp_path / "info.jsonl", objs)
    res = run_cli("tokenizer", "info", tok_dir, "--data", data, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["vocab_size"] == chat_tok.vocab_size
    assert info["specials"] == {
        t: i
        for i, t in enumerate(
            ["<unk>", "<s>", "</s>", "<think>", "</think>", "<answer>", "</answer>"]
        )
    }
    # The texts the tokenizer sees: one `<s>`/`</s>` marker pair stripped (contracts.md §1).
    texts = [ref.strip_markers(o["text"]) for o in objs]
    chars = sum(len(t) for t in texts)
    tokens = sum(len(chat_tok.encode(t)) for t in texts)
    assert info["chars"] == chars
    assert info["tokens"] == tokens
    assert info["chars_per_token"] == pytest.approx(chars / tokens)

    table = run_cli("tokenizer", "info", tok_dir, "--data", data)
    assert table.returncode == 0, table.stderr
    assert str(chat_tok.vocab_size) in table.stdout
    assert f"{chars / tokens:.3f}" in table.stdout


def test_tokenizer_info_on_a_missing_directory_fails_cleanly(tmp_path):
    res = run_cli("tokenizer", "info", tmp_path / "nope")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert str(tmp_path / "nope") in res.stderr
