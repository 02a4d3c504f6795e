"""The demo corpus: deterministic, parseable by the loader, eval keys true, eval held out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from spongebob import demo_data
from spongebob.data import ChatTokenizer, TextStream
from spongebob.demo_data import FACTS, FILES, apply_op, generate
from spongebob.tokenizer import train_tokenizer

TRAIN = ("sft_512", "sft_1024", "r1_1024")
REASONING = re.compile(r"\A<think>\n(.+)\n</think>\n<answer>\n(.+)\n</answer>\Z", re.S)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("demo"), seed=3, scale=0.1)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict[str, list[dict]]:
    paths = generate(tmp_path_factory.mktemp("demo_full"), seed=0, scale=1.0)
    return {name: _read(p) for name, p in paths.items()}


@pytest.fixture(scope="module")
def tokenizer(small, tmp_path_factory) -> ChatTokenizer:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(
        [small[n] for n in ("pretrain", *TRAIN)], out, vocab_size=2048, show_progress=False
    )
    return ChatTokenizer.from_dir(str(out))


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    a = generate(tmp_path / "a", seed=7, scale=0.05)
    b = generate(tmp_path / "b", seed=7, scale=0.05)
    c = generate(tmp_path / "c", seed=8, scale=0.05)
    assert set(a) == set(FILES)
    for name in FILES:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    assert any(a[n].read_bytes() != c[n].read_bytes() for n in FILES)
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_scale_multiplies_training_records_but_not_eval(tmp_path):
    a = generate(tmp_path / "a", seed=0, scale=0.05)
    b = generate(tmp_path / "b", seed=0, scale=0.1)
    for name in ("pretrain", *TRAIN):
        na, nb = len(_read(a[name])), len(_read(b[name]))
        assert nb == pytest.approx(2 * na, abs=1), name
    assert len(_read(a["eval"])) == len(_read(b["eval"]))
    with pytest.raises(ValueError):
        generate(tmp_path / "c", scale=0)


def test_every_file_parses_with_the_rust_reader_without_a_bad_line(small):
    for name in FILES:
        lines = small[name].read_text(encoding="utf-8").count("\n")
        stream = TextStream([str(small[name])], on_bad_line="skip")
        texts = [t for chunk in stream for t in chunk]
        stats = stream.stats()
        assert stats["records"] == lines > 0, name
        assert not stats["skipped"], (name, stats["skipped"])
        assert all(texts), name


def test_pretrain_texts_carry_exactly_one_marker_pair(small, tokenizer):
    for rec in _read(small["pretrain"]):
        text = rec["text"]
        assert text.startswith("<s>") and text.endswith("</s>")
        assert text.count("<s>") == 1 and text.count("</s>") == 1
        ids = tokenizer.encode_document(text)
        # Markers are stripped and re-added once: no doubled <s> or </s> (MiniMind #185).
        assert ids[0] == tokenizer.bos_id and ids[1] != tokenizer.bos_id
        assert ids[-1] == tokenizer.eos_id and ids[-2] != tokenizer.eos_id


def test_reasoning_replies_are_well_formed_and_their_tags_are_weighted(small, tokenizer):
    n_tags = 0
    for rec in _read(small["r1_1024"]):
        assistant = [m["content"] for m in rec["conversations"] if m["role"] == "assistant"]
        for content in assistant:
            assert REASONING.match(content), content
        _, weights = tokenizer.encode_conversation(rec["conversations"], think_weight=10.0)
        n_tags += int((weights == 10.0).sum())
        assert (weights == 10.0).sum() == 4 * len(assistant)
    assert n_tags > 0
    for name in ("sft_512", "sft_1024"):
        for rec in _read(small[name]):
            assert all("<think>" not in m["content"] for m in rec["conversations"]), name


def test_chat_records_alternate_user_and_assistant_and_encode(small, tokenizer):
    for name in TRAIN:
        for rec in _read(small[name]):
            roles = [m["role"] for m in rec["conversations"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2), (name, roles)
            ids, weights = tokenizer.encode_conversation(rec["conversations"])
            assert len(ids) == len(weights) and weights.sum() > 0


def test_long_sft_conversations_are_mostly_512_to_1024_tokens(small, tokenizer):
    lengths = [
        len(tokenizer.encode_conversation(r["conversations"])[0]) for r in _read(small["sft_1024"])
    ]
    inside = [n for n in lengths if 450 <= n <= 1100]
    assert len(inside) >= 0.9 * len(lengths), sorted(lengths)
    short = [
        len(tokenizer.encode_conversation(r["conversations"])[0]) for r in _read(small["sft_512"])
    ]
    assert max(short) <= 512


def test_eval_answer_keys_agree_with_the_fact_table_and_arithmetic(full):
    facts = {f.id: f for f in FACTS}
    tasks = {"fact": 0, "identity": 0, "arith": 0}
    for rec in full["eval"]:
        tasks[rec["task"]] += 1
        user, ref = (m["content"] for m in rec["conversations"])
        assert user and rec["answer"] in ref
        if rec["task"] == "fact":
            f = facts[rec["id"]]
            assert rec["answer"] == (f.en_answer if rec["lang"] == "en" else f.answer)
        elif rec["task"] == "arith":
            a, op, b = rec["expr"].split()
            assert rec["answer"] == str(apply_op(op, int(a), int(b)))
            m = REASONING.match(ref)
            assert m and m.group(2) == rec["answer"]
        else:
            assert rec["answer"] == demo_data.IDENTITY_NAME
    assert tasks["fact"] >= len(FACTS) and tasks["arith"] >= 40 and tasks["identity"] >= 3
    # Known facts stay true (the table is real, not invented).
    assert facts["capital:法国"].answer == "巴黎" and facts["year:登月"].answer == "1969年"
    assert 40 <= len(FACTS) <= 80


def test_eval_prompts_never_occur_in_training_but_their_facts_do(full):
    train_users = {
        m["content"]
        for n in TRAIN
        for r in full[n]
        for m in r["conversations"]
        if m["role"] == "user"
    }
    train_text = "\n".join(
        [r["text"] for r in full["pretrain"]]
        + [m["content"] for n in TRAIN for r in full[n] for m in r["conversations"]]
    )
    facts = {f.id: f for f in FACTS}
    for rec in full["eval"]:
        prompt = rec["conversations"][0]["content"]
        assert prompt not in train_users
        assert prompt not in train_text
        if rec["task"] == "fact":
            f = facts[rec["id"]]
            topic = f.en_topic if rec["lang"] == "en" else f.topic
            # The fact itself is taught: asked in other wordings in SFT.
            assert any(topic in u for u in train_users), topic
        if rec["task"] == "arith":
            a, op, b = rec["expr"].split()
            word = {"+": "加", "-": "减", "×": "乘以"}[op]
            for form in (
                rf"{a} \{op} {b} =" if op == "+" else rf"{a} {op} {b} =",
                rf"{a}{word}{b}等于",
            ):
                # Unseen numbers: the pair is never worked in training, in any form.
                assert not re.search(rf"(?<!\d){form}", train_text), rec["expr"]


def test_corpus_is_chinese_first_with_some_english(full):
    def is_english(rec: dict) -> bool:
        text = rec.get("text") or rec["conversations"][0]["content"]
        return not re.search(r"[\u4e00-\u9fff]", text)

    records = [r for n in ("pretrain", *TRAIN) for r in full[n]]
    share = sum(map(is_english, records)) / len(records)
    assert 0.03 < share < 0.3, share
