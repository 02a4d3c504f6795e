"""Issue 2: the Rust tokenizer gives the same ids as Python `tokenizers` (and the reference)."""

from __future__ import annotations

import random

import numpy as np
import pytest

import reference as ref

N_STRINGS = 10_000
SPECIALS = ["<unk>", "<s>", "</s>", "<think>", "</think>", "<answer>", "</answer>"]

EDGE_CASES = [
    "",
    " ",
    "\n",
    "\r\n\r\n",
    "<s>",
    "</s>",
    "<unk>",
    "<s></s>",
    "<s><s></s></s>",
    "<think></think><answer></answer>",
    "<<s>>",
    "</s/>",
    "a<s>b</s>c",
    "你好<s>世界</s>",
    "   leading and trailing   ",
    "\t\ttabs\t",
    "1234567890" * 5,
    "😀" * 10,
    "👨‍👩‍👧 family",
    "mixed 中文 English 123 😀\n\n",
    "\u3000全角空格\u3000",
]


@pytest.fixture(scope="module")
def strings() -> list[str]:
    rng = random.Random(20240601)
    out = list(EDGE_CASES)
    while len(out) < N_STRINGS:
        out.append(ref.random_text(rng, max_pieces=10))
    return out


def _first_diff(a, b) -> str:
    a, b = list(a), list(b)
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first difference at {i}: expected {x}, got {y}"
    return f"lengths differ: expected {len(a)}, got {len(b)}"


def test_specials_have_ids_0_to_6_in_python_and_rust(hf_tok, chat_tok):
    for i, t in enumerate(SPECIALS):
        assert hf_tok.token_to_id(t) == i
        assert chat_tok.token_to_id(t) == i
        assert chat_tok.id_to_token(i) == t
        assert list(chat_tok.encode(t, allow_special=True)) == [i]
    assert (chat_tok.pad_id, chat_tok.bos_id, chat_tok.eos_id) == (0, 1, 2)
    assert chat_tok.tag_ids == {t: [i] for i, t in enumerate(SPECIALS) if i >= 3}
    assert chat_tok.vocab_size == hf_tok.get_vocab_size()


def test_rust_encode_allow_special_equals_hf_encode_on_10k_strings(strings, hf_tok, chat_tok):
    expected = hf_tok.encode_batch(strings, add_special_tokens=False)
    assert len(strings) >= N_STRINGS
    for s, e in zip(strings, expected, strict=True):
        got = chat_tok.encode(s, allow_special=True)
        assert got.dtype.kind in "iu"
        assert list(got) == e.ids, f"{s!r}: {_first_diff(e.ids, got)}"


def test_rust_plain_encode_equals_reference_on_10k_strings(strings, hf_tok, chat_tok):
    special_ids = set(range(len(SPECIALS)))
    for s in strings:
        expected = ref.plain_encode(hf_tok, s)
        got = list(chat_tok.encode(s))
        assert got == expected, f"{s!r}: {_first_diff(expected, got)}"
        assert not special_ids & set(got), f"{s!r} produced a special id in plain mode"


def test_plain_and_special_encodings_differ_exactly_when_a_special_is_present(strings, chat_tok):
    for s in strings[:2000]:
        same = list(chat_tok.encode(s)) == list(chat_tok.encode(s, allow_special=True))
        assert same == (not any(t in s for t in SPECIALS)), repr(s)


def test_decode_round_trips_both_encodings_and_matches_hf_decode(strings, hf_tok, chat_tok):
    for s in strings[:3000]:
        plain = chat_tok.encode(s)
        assert chat_tok.decode(plain) == s
        special = chat_tok.encode(s, allow_special=True)
        ids = [int(i) for i in special]
        assert chat_tok.decode(special) == s
        assert chat_tok.decode(special) == hf_tok.decode(ids, skip_special_tokens=False)
        assert chat_tok.decode(special, skip_special_tokens=True) == hf_tok.decode(
            ids, skip_special_tokens=True
        )


def test_decode_accepts_python_lists_and_numpy_arrays(chat_tok):
    ids = chat_tok.encode("你好 world 😀")
    assert chat_tok.decode([int(i) for i in ids]) == chat_tok.decode(np.asarray(ids))


# --- chat template: our renderer vs transformers' Jinja rendering of tokenizer_config.json


@pytest.fixture(scope="module")
def hf_auto(tok_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def _conversations(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    convs = [ref.random_conversation(rng) for _ in range(n)]
    convs.append([{"role": "user", "content": ""}])
    convs.append([{"role": "system", "content": ""}, {"role": "user", "content": "<s>"}])
    convs.append([{"role": "user", "content": "q"}, {"role": "assistant", "content": "</s>"}])
    return convs


@pytest.mark.parametrize("gen", [False, True])
def test_rust_render_equals_transformers_apply_chat_template(hf_auto, chat_tok, gen):
    from spongebob.data import DEFAULT_SYSTEM

    for msgs in _conversations(150, seed=7 + gen):
        expected = hf_auto.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        got = chat_tok.render(msgs, add_generation_prompt=gen)
        assert got == expected, msgs
        assert got == ref.render(msgs, DEFAULT_SYSTEM, add_generation_prompt=gen)


def test_default_system_prompt_appears_only_without_a_system_turn(chat_tok):
    from spongebob.data import DEFAULT_SYSTEM

    user = [{"role": "user", "content": "hi"}]
    assert chat_tok.render(user).startswith(f"<s>system\n{DEFAULT_SYSTEM}</s>\n<s>user\nhi")
    own = [{"role": "system", "content": "S"}, *user]
    assert DEFAULT_SYSTEM not in chat_tok.render(own)


# --- a MiniMind-style tokenizer (only <unk>, <s>, </s>)


def test_minimind_tokenizer_loads_and_tags_are_several_plain_tokens(minimind_tok_dir):
    from tokenizers import Tokenizer

    from spongebob.data import ChatTokenizer

    hf = Tokenizer.from_file(str(minimind_tok_dir / "tokenizer.json"))
    tok = ChatTokenizer.from_dir(str(minimind_tok_dir))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for tag in ["<think>", "</think>", "<answer>", "</answer>"]:
        assert hf.token_to_id(tag) is None
        ids = tok.tag_ids[tag]
        assert len(ids) > 1
        assert ids == ref.plain_encode(hf, tag)
        assert list(tok.encode(tag, allow_special=True)) == ids


def test_minimind_tokenizer_weights_tag_tokens_in_assistant_content_only(minimind_tok_dir):
    from tokenizers import Tokenizer

    from spongebob.data import DEFAULT_SYSTEM, ChatTokenizer

    hf = Tokenizer.from_file(str(minimind_tok_dir / "tokenizer.json"))
    tok = ChatTokenizer.from_dir(str(minimind_tok_dir))
    enc = ref.RefEncoder(hf, DEFAULT_SYSTEM)
    msgs = [
        {"role": "user", "content": "<think>user tag</think>"},
        {"role": "assistant", "content": "<think>\n想一想\n</think>\n<answer>\n好\n</answer>"},
    ]
    ids, weights = tok.encode_conversation(msgs, think_weight=10.0)
    exp_ids, exp_cls = enc.encode_conversation(msgs)
    assert list(ids) == exp_ids
    np.testing.assert_array_equal(weights, ref.class_weights(exp_cls, 10.0))
    n_tag_tokens = sum(len(tok.tag_ids[t]) for t in ref.TAGS)
    assert int((weights == 10.0).sum()) == n_tag_tokens
