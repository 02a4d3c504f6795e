"""Issue 3: `PackedDataset` yields exactly the reference batches; ranks, epochs, resume, state.

The reference is tests/reference.py, written from docs/architecture.md ("loader contract").
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref


def take(ds, k: int) -> list:
    it = iter(ds)
    return [next(it) for _ in range(k)]


TEXT_CONFIGS = [  # seq_len, batch_size, world_size, seed
    (16, 2, 1, 0),
    (32, 3, 2, 1),
    (64, 1, 3, 7),
    (24, 4, 4, 123456789),
]
CHAT_CONFIGS = [
    (128, 2, 1, 0),
    (256, 3, 2, 3),
    (160, 2, 3, 11),
    (512, 1, 4, 2**63 + 5),
]


@pytest.mark.parametrize(("seq_len", "bs", "world", "seed"), TEXT_CONFIGS)
def test_text_batches_equal_reference_on_every_rank(
    make_ds, make_ref, loader_files, tok_dir, chat_tok, seq_len, bs, world, seed
):
    files = loader_files["text"]
    for rank in range(world):
        kw = dict(seq_len=seq_len, batch_size=bs, seed=seed, rank=rank, world_size=world)
        ds = make_ds(files, chat_tok, "text", **kw)
        exp = make_ref(files, tok_dir, "text", **kw).batches(0)
        assert len(ds) == len(exp)
        ref.assert_same_batches(list(ds), exp, f"text {kw}")


@pytest.mark.parametrize(("seq_len", "bs", "world", "seed"), CHAT_CONFIGS)
def test_chat_batches_equal_reference_on_every_rank(
    make_ds, make_ref, loader_files, tok_dir, chat_tok, seq_len, bs, world, seed
):
    files = loader_files["chat"]
    for rank in range(world):
        kw = dict(
            seq_len=seq_len,
            batch_size=bs,
            seed=seed,
            rank=rank,
            world_size=world,
            think_weight=10.0,
        )
        ds = make_ds(files, chat_tok, "chat", **kw)
        exp = make_ref(files, tok_dir, "chat", **kw).batches(0)
        assert len(ds) == len(exp)
        ref.assert_same_batches(list(ds), exp, f"chat {kw}")


def test_chat_batches_with_a_minimind_tokenizer_equal_reference(
    make_ds, make_ref, loader_files, minimind_tok_dir
):
    from spongebob.data import ChatTokenizer

    tok = ChatTokenizer.from_dir(str(minimind_tok_dir))
    files = loader_files["chat"]
    kw = dict(seq_len=256, batch_size=2, seed=5, think_weight=10.0)
    exp = make_ref(files, minimind_tok_dir, "chat", **kw).batches(0)
    ref.assert_same_batches(list(make_ds(files, tok, "chat", **kw)), exp, "minimind chat")


def test_every_batch_has_fixed_shape_and_dtypes(make_ds, make_ref, loader_files, chat_tok):
    import torch

    ds = make_ds(loader_files["chat"], chat_tok, "chat", seq_len=128, batch_size=3, world_size=2)
    n = 0
    for batch in ds:
        n += 1
        for k in ref.BATCH_KEYS:
            assert isinstance(batch[k], torch.Tensor)
            assert tuple(batch[k].shape) == (3, 128)
        assert batch["loss_weights"].dtype == torch.float32
        assert batch["input_ids"].dtype == torch.int64
    assert n == len(ds) > 0


def test_chat_rows_never_mix_attention_across_conversations(
    make_ds, make_ref, loader_files, chat_tok, tok_dir
):
    """Each position-0 starts with <s>; labels never cross into the next conversation's <s>."""
    ds = make_ds(loader_files["chat"], chat_tok, "chat", seq_len=256, batch_size=2)
    for batch in ds:
        b = ref.batch_to_numpy(batch)
        ids, pos, labels = b["input_ids"], b["position_ids"], b["labels"]
        real = ids != 0
        assert np.all(ids[(pos == 0) & real] == chat_tok.bos_id)
        assert not np.any(labels == chat_tok.bos_id)
        assert np.all(b["loss_weights"][labels == -100] == 0)
        assert np.all(b["loss_weights"][labels != -100] > 0)


def test_epochs_are_reshuffled_and_iteration_continues_into_the_next_epoch(
    make_ds, make_ref, loader_files, tok_dir, chat_tok
):
    files = loader_files["text"]
    kw = dict(seq_len=32, batch_size=2, seed=3)
    r = make_ref(files, tok_dir, "text", **kw)
    e0, e1, e2 = r.batches(0), r.batches(1), r.batches(2)
    assert any(ref.batch_mismatch(a, b) for a, b in zip(e0, e1, strict=False))
    ds = make_ds(files, chat_tok, "text", **kw)
    ref.assert_same_batches(list(ds), e0, "epoch 0")
    assert (ds.state_dict()["epoch"], ds.state_dict()["batches"]) == (1, 0)
    ref.assert_same_batches(list(ds), e1, "epoch 1 (continued)")
    ds.set_epoch(2)
    ref.assert_same_batches(list(ds), e2, "set_epoch(2)")
    fresh = make_ds(files, chat_tok, "text", **kw)
    fresh.set_epoch(1)
    ref.assert_same_batches(list(fresh), e1, "fresh set_epoch(1)")


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["text", "chat"])
def test_ranks_are_disjoint_and_together_cover_the_epoch(
    make_ds, make_ref, loader_files, chat_tok, tok_dir, kind, world
):
    seq_len = 32 if kind == "text" else 192
    files = loader_files[kind]
    kw = dict(seq_len=seq_len, batch_size=2, seed=9)
    single = [
        row
        for batch in make_ds(files, chat_tok, kind, **kw)
        for row in _rows(ref.batch_to_numpy(batch))
    ]
    single = [r for r in single if not _empty(r)]
    per_rank = [
        list(make_ds(files, chat_tok, kind, rank=r, world_size=world, **kw)) for r in range(world)
    ]
    n = {len(b) for b in per_rank}
    assert len(n) == 1, f"ranks have different batch counts: {n}"
    n_rows = len(single)
    assert n.pop() == math.ceil(n_rows / (2 * world))
    # Global order: batch g, then rank r, then row i.
    merged = [
        row
        for g in range(len(per_rank[0]))
        for r in range(world)
        for row in _rows(ref.batch_to_numpy(per_rank[r][g]))
    ]
    real = [row for row in merged if not _empty(row)]
    assert all(_empty(row) for row in merged[len(real) :]), "empty rows only at the very end"
    assert len(real) == n_rows
    for i, (a, b) in enumerate(zip(real, single, strict=True)):
        assert all(np.array_equal(a[k], b[k]) for k in ref.BATCH_KEYS), f"global row {i} differs"


def _rows(batch: dict) -> list[dict]:
    return [{k: batch[k][i] for k in ref.BATCH_KEYS} for i in range(batch["input_ids"].shape[0])]


def _empty(row: dict) -> bool:
    return not row["input_ids"].any() and np.all(row["labels"] == -100)


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_stats_count_documents_rows_truncation_and_fill(
    make_ds, make_ref, loader_files, tok_dir, chat_tok, kind
):
    seq_len = 32 if kind == "text" else 128
    files = loader_files[kind]
    kw = dict(seq_len=seq_len, batch_size=2, seed=1)
    ds = make_ds(files, chat_tok, kind, **kw)
    list(ds)
    st = ds.stats()
    r = make_ref(files, tok_dir, kind, **kw)
    rows, truncated = r.rows(0)
    assert st["documents"] == len(r.docs)
    assert st["rows"] == len(rows)
    assert st["truncated"] == truncated
    if kind == "chat":
        assert truncated > 0, "the test data should contain conversations longer than seq_len"
    assert {k: v for k, v in dict(st["skipped"]).items() if v} == {}
    total = sum(len(ids) for ids, _ in r.docs)
    kept = sum(len(row) for row in rows)
    # contracts.md §3 "Stats": tokens as encoded (before truncation and the dropped tail);
    # used_tokens placed in rows; fill over the rows' T + 1 tokens.
    assert st["tokens"] == total
    assert st["used_tokens"] == kept
    assert kept < total, "the test data should lose tokens to truncation or the tail"
    assert st["fill"] == pytest.approx(kept / (len(rows) * (seq_len + 1)), rel=1e-12)
    if kind == "text":
        assert st["fill"] == 1.0
    else:
        assert st["fill"] < 1.0


# --- resume


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("kind", ["text", "chat"])
def test_resume_mid_epoch_gives_the_remaining_batches_of_an_uninterrupted_run(
    make_ds, make_ref, loader_files, chat_tok, tmp_path, kind, cache
):
    seq_len = 24 if kind == "text" else 128
    kw = dict(seq_len=seq_len, batch_size=2, seed=42, rank=1, world_size=2, think_weight=3.0)
    if cache:
        kw["cache_dir"] = str(tmp_path / "cache")
    files = loader_files[kind]
    full = list(make_ds(files, chat_tok, kind, **kw))
    assert len(full) >= 6
    for k in (0, 1, len(full) // 2, len(full) - 1):
        ds = make_ds(files, chat_tok, kind, **kw)
        got_first = take(ds, k)
        state = ds.state_dict()
        assert set(state) >= {"version", "epoch", "batches", "fingerprint"}
        assert (state["epoch"], state["batches"]) == (0, k)
        ref.assert_same_batches(got_first, [ref.batch_to_numpy(b) for b in full[:k]], "first k")
        resumed = make_ds(files, chat_tok, kind, **kw)
        resumed.load_state_dict(state)
        rest = list(resumed)
        ref.assert_same_batches(rest, [ref.batch_to_numpy(b) for b in full[k:]], f"resume k={k}")


def test_state_dict_counts_handed_out_batches_not_prefetched_ones(
    make_ds, make_ref, loader_files, chat_tok
):
    ds = make_ds(loader_files["text"], chat_tok, "text", seq_len=16, batch_size=1)
    it = iter(ds)
    next(it)
    import time

    time.sleep(0.2)  # let a prefetch thread run ahead
    assert ds.state_dict()["batches"] == 1
    next(it)
    next(it)
    assert ds.state_dict()["batches"] == 3


def test_resume_in_a_later_epoch(make_ds, make_ref, loader_files, chat_tok):
    files = loader_files["chat"]
    kw = dict(seq_len=128, batch_size=2, seed=8)
    ds = make_ds(files, chat_tok, "chat", **kw)
    ds.set_epoch(3)
    full = list(ds)
    ds.set_epoch(3)
    take(ds, 4)
    state = ds.state_dict()
    assert (state["epoch"], state["batches"]) == (3, 4)
    resumed = make_ds(files, chat_tok, "chat", **kw)
    resumed.load_state_dict(state)
    ref.assert_same_batches(list(resumed), [ref.batch_to_numpy(b) for b in full[4:]], "epoch 3")


CHANGES = {
    "seq_len": dict(seq_len=20),
    "batch_size": dict(batch_size=3),
    "seed": dict(seed=1),
    "rank": dict(rank=1, world_size=2),
    "world_size": dict(rank=0, world_size=2),
    "think_weight": dict(think_weight=10.0),
    "on_bad_line": dict(on_bad_line="skip"),
}


@pytest.mark.parametrize("change", [*CHANGES, "files", "tokenizer", "kind"])
def test_load_state_dict_from_a_different_configuration_raises(
    make_ds, make_ref, loader_files, chat_tok, minimind_tok_dir, change
):
    from spongebob.data import ChatTokenizer

    base = dict(seq_len=16, batch_size=2, seed=0)
    ds = make_ds(loader_files["text"], chat_tok, "text", **base)
    take(ds, 2)
    state = ds.state_dict()
    files, tok, kind, kw = loader_files["text"], chat_tok, "text", dict(base)
    if change == "files":
        files = files[:1]
    elif change == "tokenizer":
        tok = ChatTokenizer.from_dir(str(minimind_tok_dir))
    elif change == "kind":
        files, kind = loader_files["chat"], "chat"
        kw["seq_len"] = 128
    else:
        kw.update(CHANGES[change])
    other = make_ds(files, tok, kind, **kw)
    with pytest.raises((ValueError, RuntimeError, KeyError)):
        other.load_state_dict(state)
    # The same configuration accepts it.
    same = make_ds(loader_files["text"], chat_tok, "text", **base)
    same.load_state_dict(state)
    assert same.state_dict()["batches"] == 2


def test_load_state_dict_refuses_a_tampered_fingerprint_or_version(
    make_ds, make_ref, loader_files, chat_tok
):
    ds = make_ds(loader_files["text"], chat_tok, "text", seq_len=16, batch_size=2)
    take(ds, 1)
    state = ds.state_dict()
    for key, value in (("fingerprint", "0" * 16), ("version", 10**6)):
        other = make_ds(loader_files["text"], chat_tok, "text", seq_len=16, batch_size=2)
        with pytest.raises((ValueError, RuntimeError, KeyError)):
            other.load_state_dict({**state, key: value})


# --- property test of the packer: small generated corpora, random shapes

message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant"]),
        "content": st.lists(
            st.sampled_from([*ref.LITERALS, *ref.WHITESPACE, *ref.EMOJI, "你好世界", "word", "42"]),
            max_size=12,
        ).map("".join),
    }
)
conversation = st.builds(
    lambda sys_, msgs, a: [*sys_, *msgs, {"role": "assistant", "content": a}],
    st.lists(
        st.fixed_dictionaries({"role": st.just("system"), "content": st.text(max_size=5)}),
        max_size=1,
    ),
    st.lists(message, max_size=4),
    st.text(max_size=20),
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    convs=st.lists(conversation, min_size=1, max_size=25),
    texts=st.lists(st.text(max_size=40), min_size=1, max_size=25),
    seq_len=st.integers(8, 200),
    batch_size=st.integers(1, 4),
    world=st.integers(1, 4),
    seed=st.integers(0, 2**64 - 1),
    tw=st.sampled_from([1.0, 10.0]),
)
def test_packer_equals_reference_on_generated_corpora(
    make_ds, make_ref, chat_tok, tok_dir, convs, texts, seq_len, batch_size, world, seed, tw
):
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        chat = Path(d) / "c.jsonl"
        chat.write_text("".join(json.dumps({"conversations": c}) + "\n" for c in convs))
        text = Path(d) / "t.jsonl"
        text.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        for kind, path in (("chat", chat), ("text", text)):
            rank = seed % world
            kw = dict(
                seq_len=seq_len,
                batch_size=batch_size,
                seed=seed,
                rank=rank,
                world_size=world,
                think_weight=tw,
            )
            exp = make_ref([path], tok_dir, kind, memo=False, **kw).batches(0)
            got = list(make_ds([path], chat_tok, kind, **kw))
            ref.assert_same_batches(got, exp, f"{kind} {kw}")
