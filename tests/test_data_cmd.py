"""`spongebob data check`: the loader's own validation (Rust), with or without a tokenizer.

Without `--tokenizer`: records and bad lines per file (`file:line: reason`); with it, also the
token statistics. Run through the CLI entry point, as a user would.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

import reference as ref
from spongebob.cli import main
from spongebob.data_cmd import detect_kind

BOM = b"\xef\xbb\xbf"


def _lines(kind: str, n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    objs = ref.text_objs(rng, n) if kind == "text" else ref.chat_objs(rng, n)
    return [json.dumps(o, ensure_ascii=False).encode() for o in objs]


def _write(path, lines: list[bytes], bom: bool = False):
    path.write_bytes((BOM if bom else b"") + b"\n".join(lines) + b"\n")
    return path


def _check(capsys, *argv) -> tuple[int, dict]:
    rc = main(["data", "check", *map(str, argv), "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_check_without_a_tokenizer_counts_records_and_reports_bad_lines(tmp_path, capsys):
    good = _write(tmp_path / "good.jsonl", _lines("chat", 12))
    lines = _lines("text", 6, seed=1)
    bad = _write(
        tmp_path / "bad.jsonl",
        [lines[0], b'{"text": 3}', b"", lines[1], b"{oops", *lines[2:]],
        bom=True,
    )
    rc, out = _check(capsys, good, bad)
    assert rc == 1
    assert out["files"] == [
        {"file": str(good), "kind": "chat", "records": 12, "bad": 0},
        {"file": str(bad), "kind": "text", "records": 6, "bad": 2},
    ]
    assert len(out["bad_lines"]) == 2
    assert out["bad_lines"][0].startswith(f"{bad}:2: bad record: ")
    assert out["bad_lines"][1].startswith(f"{bad}:5: invalid JSON: ")


def test_check_of_good_files_succeeds_and_prints_a_table(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", _lines("text", 5), bom=True)
    assert main(["data", "check", str(a)]) == 0
    out, err = capsys.readouterr()
    assert "records" in out.splitlines()[0] and "tokens" not in out
    assert out.splitlines()[1].split()[1:4] == ["text", "5", "0"]
    assert err == ""


def test_a_bom_file_is_read_like_the_same_file_without_it(tmp_path, capsys, tok_dir):
    lines = _lines("chat", 7, seed=3)
    with_bom = _write(tmp_path / "bom.jsonl", lines, bom=True)
    without = _write(tmp_path / "plain.jsonl", lines)
    assert detect_kind(with_bom) == detect_kind(without) == "chat"
    rc, out = _check(capsys, with_bom, without, "--tokenizer", tok_dir)
    assert rc == 0 and out["bad_lines"] == []
    a, b = out["files"]
    assert a["records"] == b["records"] == 7
    assert {k: v for k, v in a.items() if k != "file"} == {
        k: v for k, v in b.items() if k != "file"
    }


def test_detect_kind_skips_a_bom_and_unparsable_lines(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(BOM + b'{"text": "a"}\n')
    assert detect_kind(p) == "text"
    p.write_bytes(BOM + b'{oops\n\xff\n{"text": "a"}\n')
    assert detect_kind(p) == "text"


def test_token_statistics_come_only_with_a_tokenizer(tmp_path, capsys, tok_dir, chat_tok):
    lines = _lines("chat", 20, seed=4)
    path = _write(tmp_path / "c.jsonl", [*lines[:3], b'{"conversations": []}', *lines[3:]])
    rc, out = _check(capsys, path, "--tokenizer", tok_dir, "--seq-len", "64")
    assert rc == 1
    (rep,) = out["files"]
    lens = np.array(
        [len(chat_tok.encode_conversation(json.loads(x)["conversations"])[0]) for x in lines]
    )
    q = np.percentile(lens, [50, 90, 99])
    assert rep == {
        "file": str(path),
        "kind": "chat",
        "records": 20,
        "bad": 1,
        "tokens": int(lens.sum()),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p99": float(q[2]),
        "max": int(lens.max()),
        "truncated": int((lens > 65).sum()),
    }
    assert rep["truncated"] > 0
    assert out["bad_lines"] == [f"{path}:4: empty conversation"]
    # Without a tokenizer: the same validation, no token statistics.
    rc, out = _check(capsys, path)
    assert rc == 1
    assert out["files"] == [{"file": str(path), "kind": "chat", "records": 20, "bad": 1}]
    assert out["bad_lines"] == [f"{path}:4: empty conversation"]


@pytest.mark.parametrize("contents", [b"", b"\n \n", BOM + b"\n"])
def test_an_empty_file_is_reported_as_the_file_as_a_whole(tmp_path, capsys, contents):
    p = tmp_path / "empty.jsonl"
    p.write_bytes(contents)
    rc, out = _check(capsys, p, "--kind", "text")
    assert rc == 1
    assert out["files"] == [{"file": str(p), "kind": "text", "records": 0, "bad": 1}]
    assert out["bad_lines"] == [f"{p}: empty file (no records)"]


def test_a_missing_file_fails_with_one_line(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope.jsonl")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_check_file_and_scan_file_agree_with_the_loader_on_every_bad_line(tmp_path, chat_tok):
    from spongebob.data import check_file, scan_file

    good = _lines("text", 5, seed=8)
    raw = [good[0], b'{"text": "\\ud800"}', b"\xff", good[1], b"[1]", *good[2:]]
    p = _write(tmp_path / "m.jsonl", raw)
    records, bad = check_file(str(p), "text")
    lens, bad2 = scan_file(str(p), chat_tok, "text")
    assert records == len(lens) == 5
    assert bad == bad2
    assert [(line, code) for line, code, _ in bad] == [
        (2, "invalid_json"),
        (3, "invalid_utf8"),
        (5, "bad_schema"),
    ]
    assert "lone surrogate escape \\ud800" in bad[0][2]
    with pytest.raises(ValueError, match="unknown data kind"):
        check_file(str(p), "pretrain")
