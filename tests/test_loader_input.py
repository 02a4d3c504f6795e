"""Issue 3 / contracts.md §1: every bad-input class under both policies.

error (default): a `DataFormatError` naming `file:line` (the file alone for an empty file).
skip: the bad line is not a document, it is counted by reason in `stats()["skipped"]`, and every
good line is still there (the batches equal the reference, which skips the same lines).
"""

from __future__ import annotations

import json
import random

import pytest

import reference as ref
import spongebob.data

U, A = (
    {"role": "user", "content": "问题"},
    {"role": "assistant", "content": "回答"},
)


def _conv(*msgs) -> bytes:
    return json.dumps({"conversations": list(msgs)}, ensure_ascii=False).encode()


BAD_LINES = [  # (kind, reason, case name, raw line)
    ("text", "invalid_utf8", "latin1_bytes", b'{"text": "caf\xe9 \xff"}'),
    ("text", "invalid_json", "unterminated", b'{"text": "unterminated'),
    ("text", "invalid_json", "lone_surrogate", b'{"text": "lone \\ud800 surrogate"}'),
    ("text", "invalid_json", "nan", b'{"text": "x", "score": NaN}'),
    ("text", "invalid_json", "unquoted_key", b"{text: 1}"),
    ("text", "bad_schema", "text_is_int", b'{"text": 42}'),
    ("text", "bad_schema", "text_is_null", b'{"text": null}'),
    ("text", "bad_schema", "missing_key", b'{"txt": "typo in the key"}'),
    ("text", "bad_schema", "top_level_list_2", b'["text", "a list"]'),
    ("text", "bad_schema", "top_level_list_1", b'["a one-element list"]'),
    ("text", "bad_schema", "top_level_string", b'"just a string"'),
    ("text", "bad_schema", "chat_line_in_text", _conv(U, A)),
    (
        "chat",
        "invalid_utf8",
        "bad_utf8",
        b'{"conversations": [{"role": "user", "content": "\xc3\x28"}]}',
    ),
    ("chat", "invalid_json", "truncated", b'{"conversations": [}'),
    ("chat", "invalid_json", "lone_surrogate", _conv(U, A).replace("回答".encode(), b"\\udc00")),
    ("chat", "bad_schema", "not_a_list", b'{"conversations": "not a list"}'),
    ("chat", "bad_schema", "missing_content", _conv({"role": "user"}, A)),
    ("chat", "bad_schema", "content_is_int", _conv({"role": "user", "content": 3}, A)),
    ("chat", "bad_schema", "role_is_null", _conv({"role": None, "content": "x"}, A)),
    ("chat", "bad_schema", "message_is_list", _conv(["user", "hi"], A)),
    ("chat", "bad_schema", "text_line_in_chat", b'{"text": "a pretrain line in a chat file"}'),
    ("chat", "unknown_role", "bot", _conv({"role": "bot", "content": "x"}, A)),
    ("chat", "unknown_role", "capitalised", _conv({"role": "User", "content": "x"}, A)),
    ("chat", "empty_conversation", "empty_list", b'{"conversations": []}'),
    ("chat", "no_assistant", "user_only", _conv(U)),
    ("chat", "no_assistant", "system_and_user", _conv({"role": "system", "content": "s"}, U)),
]


def _good_lines(kind: str, n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    objs = ref.text_objs(rng, n) if kind == "text" else ref.chat_objs(rng, n)
    return [json.dumps(o, ensure_ascii=False).encode() for o in objs]


def _write(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize(
    "case",
    [(k, r, raw) for k, r, _, raw in BAD_LINES],
    ids=[f"{k}-{r}-{n}" for k, r, n, _ in BAD_LINES],
)
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_bad_line_is_reported_with_file_and_line_or_skipped_and_counted(
    tmp_path, chat_tok, tok_dir, make_ds, make_ref, case, policy
):
    from spongebob.data import DataFormatError

    kind, reason, raw = case
    assert reason in spongebob.data.BAD_LINE_REASONS
    good = _good_lines(kind, 12, seed=len(raw))
    first = _write(tmp_path / "first.jsonl", good[:4])
    bad_line_no = 6  # 1-based, after a blank line
    second = _write(tmp_path / "second.jsonl", [*good[4:8], b"", raw, *good[8:]])
    files = [first, second]
    seq_len = 32 if kind == "text" else 128
    kw = dict(seq_len=seq_len, batch_size=2, seed=1, on_bad_line=policy)
    if policy == "error":
        with pytest.raises(DataFormatError) as err:
            list(make_ds(files, chat_tok, kind, **kw))
        msg = str(err.value)
        assert f"{second}:{bad_line_no}" in msg, msg
        assert "\n" not in msg.strip(), "one line"
        return
    ds = make_ds(files, chat_tok, kind, **kw)
    got = list(ds)
    r = make_ref(files, tok_dir, kind, memo=False, **kw)
    assert dict(r.skipped) == {reason: 1}, "reference disagrees with the case table"
    skipped = {k: v for k, v in dict(ds.stats()["skipped"]).items() if v}
    assert skipped == {reason: 1}
    assert ds.stats()["documents"] == len(good)
    ref.assert_same_batches(got, r.batches(0), f"{kind} skip {reason}")


@pytest.mark.parametrize(
    "contents", [b"", b"\n", b"\n   \n\n"], ids=["zero_bytes", "newline", "blank"]
)
@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize("kind", ["text", "chat"])
def test_empty_file_is_an_error_naming_the_file_or_skipped_and_counted(
    tmp_path, chat_tok, tok_dir, make_ds, make_ref, contents, policy, kind
):
    from spongebob.data import DataFormatError

    good = _write(tmp_path / "good.jsonl", _good_lines(kind, 10, seed=3))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(contents)
    files = [good, empty]
    kw = dict(seq_len=32 if kind == "text" else 128, batch_size=2, on_bad_line=policy)
    if policy == "error":
        with pytest.raises(DataFormatError) as err:
            list(make_ds(files, chat_tok, kind, **kw))
        assert str(empty) in str(err.value)
        return
    ds = make_ds(files, chat_tok, kind, **kw)
    got = list(ds)
    skipped = {k: v for k, v in dict(ds.stats()["skipped"]).items() if v}
    assert skipped == {"empty_file": 1}
    r = make_ref(files, tok_dir, kind, memo=False, **kw)
    ref.assert_same_batches(got, r.batches(0), "with an empty file")


def test_several_bad_lines_are_all_counted_by_reason(tmp_path, chat_tok, make_ds):
    good = _good_lines("chat", 6, seed=9)
    bad = [raw for k, _, _, raw in BAD_LINES if k == "chat"]
    path = _write(
        tmp_path / "mixed.jsonl",
        [x for pair in zip(good, bad, strict=False) for x in pair] + bad[6:],
    )
    ds = make_ds([path], chat_tok, "chat", seq_len=128, batch_size=2, on_bad_line="skip")
    list(ds)
    expected: dict = {}
    for k, reason, _, _ in BAD_LINES:
        if k == "chat":
            expected[reason] = expected.get(reason, 0) + 1
    skipped = {k: v for k, v in dict(ds.stats()["skipped"]).items() if v}
    assert skipped == expected
    assert ds.stats()["documents"] == len(good)


def test_error_policy_names_the_first_bad_line_of_the_first_bad_file(tmp_path, chat_tok, make_ds):
    from spongebob.data import DataFormatError

    good = _good_lines("text", 5, seed=2)
    a = _write(tmp_path / "a.jsonl", good)
    b = _write(tmp_path / "b.jsonl", [good[0], b"", b"", b"{oops", b'{"text": 1}'])
    with pytest.raises(DataFormatError) as err:
        list(make_ds([a, b], chat_tok, "text", seq_len=16, batch_size=1))
    assert f"{b}:4" in str(err.value)


def test_unknown_keys_and_blank_lines_are_not_errors(
    tmp_path, chat_tok, tok_dir, make_ds, make_ref
):
    lines = [
        b"",
        json.dumps({"conversations": [U, A], "id": 1, "source": {"x": [1, 2]}}).encode(),
        b"   ",
        json.dumps({"conversations": [{**U, "name": "n"}, {**A, "score": 0.5}]}).encode(),
        b"",
    ]
    path = _write(tmp_path / "extra.jsonl", lines)
    ds = make_ds([path], chat_tok, "chat", seq_len=128, batch_size=1)
    got = list(ds)
    assert ds.stats()["documents"] == 2
    r = make_ref([path], tok_dir, "chat", memo=False, seq_len=128, batch_size=1)
    ref.assert_same_batches(got, r.batches(0), "unknown keys")


def test_crlf_line_endings_are_accepted(tmp_path, chat_tok, tok_dir, make_ds, make_ref):
    good = _good_lines("text", 8, seed=4)
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b"\r\n".join(good) + b"\r\n")
    ds = make_ds([path], chat_tok, "text", seq_len=16, batch_size=2)
    got = list(ds)
    r = make_ref([path], tok_dir, "text", memo=False, seq_len=16, batch_size=2)
    ref.assert_same_batches(got, r.batches(0), "CRLF")


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_a_byte_order_mark_at_the_start_of_a_file_is_skipped(
    tmp_path, chat_tok, tok_dir, make_ds, make_ref, kind
):
    good = _good_lines(kind, 8, seed=5)
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(good) + b"\n")
    kw = dict(seq_len=32 if kind == "text" else 128, batch_size=2)
    ds = make_ds([path], chat_tok, kind, **kw)  # error policy: the first line is a record
    got = list(ds)
    assert ds.stats()["documents"] == len(good)
    r = make_ref([path], tok_dir, kind, memo=False, **kw)
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(b"\n".join(good) + b"\n")
    without = make_ref([plain], tok_dir, kind, memo=False, **kw)
    assert r.docs == without.docs, "the reference reads the same records with and without it"
    ref.assert_same_batches(got, r.batches(0), f"{kind} with a BOM")


def test_a_byte_order_mark_after_the_first_line_is_bad_json(tmp_path, chat_tok, make_ds):
    from spongebob.data import DataFormatError

    good = _good_lines("text", 3, seed=6)
    path = _write(tmp_path / "inner_bom.jsonl", [good[0], b"\xef\xbb\xbf" + good[1], good[2]])
    with pytest.raises(DataFormatError, match=r"inner_bom\.jsonl:2: invalid JSON"):
        list(make_ds([path], chat_tok, "text", seq_len=16, batch_size=1))


@pytest.mark.parametrize(
    ("raw", "unit", "column"),
    [
        (b'{"text": "lone \\ud800 surrogate"}', "\\ud800", 16),
        (b'{"text": "\\udc00"}', "\\udc00", 11),
        (b'{"text": "\\ud83d\\u0041"}', "\\ud83d", 11),
        (b'{"text": "ok", "meta": "\\uDFFF"}', "\\udfff", 25),
    ],
)
def test_a_lone_surrogate_is_reported_as_such(tmp_path, chat_tok, make_ds, raw, unit, column):
    from spongebob.data import DataFormatError

    good = _good_lines("text", 3, seed=7)
    path = _write(tmp_path / "sur.jsonl", [good[0], good[1], raw, good[2]])
    with pytest.raises(DataFormatError) as err:
        list(make_ds([path], chat_tok, "text", seq_len=16, batch_size=1))
    expected = f"{path}:3: invalid JSON: lone surrogate escape {unit} at line 1 column {column}"
    assert str(err.value) == expected
    # Skipped, it counts under the stable reason code.
    ds = make_ds([path], chat_tok, "text", seq_len=16, batch_size=1, on_bad_line="skip")
    list(ds)
    assert {k: v for k, v in ds.stats()["skipped"].items() if v} == {"invalid_json": 1}
    assert ds.stats()["documents"] == 3
