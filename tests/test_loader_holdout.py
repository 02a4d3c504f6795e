"""contracts.md §3 "Validation split": `holdout` / `split` select documents by a seeded hash of
their global index, before the epoch order, packing and rank sharding; no file is written.

The Rust loader is compared with tests/reference.py (`split_documents`), the splits are checked
to be disjoint and to cover every document (in the batches themselves), and the fingerprint
with `holdout=0` is pinned to the formula of the loader before the option existed.
"""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
import pytest

import reference as ref
from spongebob.data import TEMPLATE_VERSION

HOLDOUT = 0.3


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize(
    ("kind", "seq_len", "bs", "world", "seed"),
    [
        ("text", 16, 2, 1, 0),
        ("text", 24, 1, 3, 7),
        ("chat", 128, 2, 1, 3),
        ("chat", 192, 2, 2, 2**63 + 5),
    ],
)
def test_split_batches_equal_reference_on_every_rank(
    make_ds, make_ref, loader_files, tok_dir, chat_tok, kind, seq_len, bs, world, seed, split
):
    files = loader_files[kind]
    for rank in range(world):
        kw = dict(
            seq_len=seq_len,
            batch_size=bs,
            seed=seed,
            rank=rank,
            world_size=world,
            think_weight=10.0,
            holdout=HOLDOUT,
            split=split,
        )
        ds = make_ds(files, chat_tok, kind, **kw)
        r = make_ref(files, tok_dir, kind, **kw)
        assert ds.documents() == r.documents()
        assert ds.stats()["documents"] == len(r.docs)
        exp = r.batches(0)
        assert len(ds) == len(exp) > 0
        ref.assert_same_batches(list(ds), exp, f"{kind} {split} {kw}")
        # The next epoch reshuffles the same documents.
        ref.assert_same_batches(list(ds), r.batches(1), f"{kind} {split} epoch 1")


def test_the_split_does_not_depend_on_the_fraction_of_other_documents(
    make_ref, loader_files, tok_dir
):
    """A larger holdout only adds documents to val (the hash is fixed per document)."""
    files = loader_files["chat"]
    small = make_ref(files, tok_dir, "chat", holdout=0.2, split="val", seed=4).documents()
    large = make_ref(files, tok_dir, "chat", holdout=0.5, split="val", seed=4).documents()
    assert set(small) < set(large)
    other_seed = make_ref(files, tok_dir, "chat", holdout=0.2, split="val", seed=5).documents()
    assert other_seed != small


def _pieces(batch: dict) -> list[list[int]]:
    """The document pieces of a batch: runs of real tokens from a position 0."""
    b = ref.batch_to_numpy(batch)
    out = []
    for ids, pos in zip(b["input_ids"], b["position_ids"], strict=True):
        for t in range(len(ids)):
            if ids[t] == 0:
                continue
            if pos[t] == 0:
                out.append([])
            out[-1].append(int(ids[t]))
    return out


def test_train_and_val_batches_are_disjoint_in_documents_and_cover_them_all(
    make_ds, make_ref, loader_files, tok_dir, chat_tok
):
    files = loader_files["chat"]
    kw = dict(seq_len=160, batch_size=2, seed=11)
    all_docs = make_ref(files, tok_dir, "chat", **kw).all_docs
    assert len(all_docs) == make_ds(files, chat_tok, "chat", **kw).stats()["documents"]

    def served(split: str, world: int) -> list[int]:
        """Global indices of the conversations in the batches of every rank."""
        found = []
        for rank in range(world):
            ds = make_ds(
                files,
                chat_tok,
                "chat",
                holdout=HOLDOUT,
                split=split,
                rank=rank,
                world_size=world,
                **kw,
            )
            for batch in ds:
                for piece in _pieces(batch):
                    # A piece is its conversation (cut to T + 1 tokens, the last one only a
                    # label when it ends the row): a prefix of exactly one document.
                    match = [i for i, (ids, _) in enumerate(all_docs) if ids[: len(piece)] == piece]
                    assert len(match) == 1, f"{split}: piece matches documents {match}"
                    found.append(match[0])
        return found

    for world in (1, 2):
        train, val = served("train", world), served("val", world)
        assert len(train) == len(set(train)) and len(val) == len(set(val)), "each document once"
        assert not set(train) & set(val)
        assert sorted(train + val) == list(range(len(all_docs)))
        assert 0 < len(val) < len(train)
        assert sorted(val) == ref.split_documents(len(all_docs), 11, HOLDOUT, "val")


def test_text_splits_partition_the_documents_and_their_tokens(
    make_ds, make_ref, loader_files, tok_dir, chat_tok
):
    files = loader_files["text"]
    kw = dict(seq_len=16, batch_size=2, seed=2)
    whole = make_ds(files, chat_tok, "text", **kw)
    train = make_ds(files, chat_tok, "text", holdout=0.4, split="train", **kw)
    val = make_ds(files, chat_tok, "text", holdout=0.4, split="val", **kw)
    n = whole.stats()["documents"]
    assert sorted(train.documents() + val.documents()) == list(range(n))
    assert not set(train.documents()) & set(val.documents())
    assert train.stats()["tokens"] + val.stats()["tokens"] == whole.stats()["tokens"]
    # The streams are made of the split's documents only: the val stream is their
    # concatenation in the reference's order, nothing else.
    r = make_ref(files, tok_dir, "text", holdout=0.4, split="val", **kw)
    flat = np.concatenate([ref.batch_to_numpy(b)["input_ids"].ravel() for b in val])
    perm = ref.epoch_perm(len(r.docs), 2, 0)
    stream = [i for d in perm for i in r.docs[d][0]]
    width = kw["seq_len"] + 1
    rows = len(stream) // width
    expected = [i for k in range(rows) for i in stream[k * width : k * width + width - 1]]
    assert flat[: len(expected)].tolist() == expected


def test_resume_within_a_split_and_states_do_not_cross_splits(make_ds, loader_files, chat_tok):
    files = loader_files["chat"]
    kw = dict(seq_len=128, batch_size=1, seed=6)
    full = list(make_ds(files, chat_tok, "chat", holdout=HOLDOUT, split="val", **kw))
    assert len(full) >= 3
    ds = make_ds(files, chat_tok, "chat", holdout=HOLDOUT, split="val", **kw)
    it = iter(ds)
    next(it)
    next(it)
    state = ds.state_dict()
    resumed = make_ds(files, chat_tok, "chat", holdout=HOLDOUT, split="val", **kw)
    resumed.load_state_dict(state)
    ref.assert_same_batches(list(resumed), [ref.batch_to_numpy(b) for b in full[2:]], "val")
    for other in (
        dict(holdout=HOLDOUT, split="train"),
        dict(holdout=0.2, split="val"),
        dict(),
    ):
        ds = make_ds(files, chat_tok, "chat", **other, **kw)
        with pytest.raises(ValueError, match="different configuration"):
            ds.load_state_dict(state)
        assert ds.state_dict()["batches"] == 0


def _pre_holdout_fingerprint(paths, tok, kind, seq_len, bs, seed, rank, world, tw, skip) -> str:
    """The loader's fingerprint formula as it was before `holdout` (loader.rs `fingerprint`)."""
    h = hashlib.sha256()
    for p in paths:
        real = os.path.realpath(p)
        st = os.stat(real)
        h.update(f"{real}|{st.st_size}|{st.st_mtime_ns};".encode())
    tw_bits = struct.unpack("<I", struct.pack("<f", tw))[0]
    h.update(
        f"tok={tok.hash} tpl={TEMPLATE_VERSION} kind={kind.capitalize()} T={seq_len} B={bs} "
        f"seed={seed} rank={rank} world={world} tw={tw_bits} skip={str(skip).lower()}".encode()
    )
    return h.hexdigest()[:32]


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_without_holdout_the_fingerprint_is_the_one_of_before(
    make_ds, loader_files, chat_tok, kind
):
    files = loader_files[kind]
    kw = dict(seq_len=32, batch_size=3, seed=9, rank=1, world_size=2, think_weight=2.5)
    exp = _pre_holdout_fingerprint(files, chat_tok, kind, 32, 3, 9, 1, 2, 2.5, False)
    assert make_ds(files, chat_tok, kind, **kw).fingerprint == exp
    assert make_ds(files, chat_tok, kind, holdout=0.0, split="train", **kw).fingerprint == exp
    prints = {
        make_ds(files, chat_tok, kind, holdout=h, split=s, **kw).fingerprint
        for h, s in ((0.25, "train"), (0.25, "val"), (0.5, "train"))
    }
    assert len(prints) == 3 and exp not in prints


@pytest.mark.parametrize("holdout", [-0.1, 1.0, 1.5, float("nan")])
def test_a_holdout_out_of_range_is_a_value_error(make_ds, loader_files, chat_tok, holdout):
    with pytest.raises(ValueError, match=r"holdout \(--val-split\) must be in \[0, 1\)"):
        make_ds(loader_files["text"], chat_tok, "text", seq_len=16, batch_size=1, holdout=holdout)


def test_an_unknown_split_is_a_value_error(make_ds, loader_files, chat_tok):
    with pytest.raises(ValueError, match='unknown split "test"'):
        make_ds(loader_files["text"], chat_tok, "text", seq_len=16, holdout=0.2, split="test")


@pytest.mark.parametrize(
    ("holdout", "split", "counts"),
    [
        (1e-12, "train", "{n} training and 0 validation"),
        (1e-12, "val", "{n} training and 0 validation"),
        (0.0, "val", "{n} training and 0 validation"),
        (1 - 1e-12, "train", "0 training and {n} validation"),
    ],
)
def test_a_split_left_without_documents_names_both_counts(
    make_ds, loader_files, chat_tok, holdout, split, counts
):
    files = loader_files["chat"]
    n = make_ds(files, chat_tok, "chat", seq_len=64).stats()["documents"]
    with pytest.raises(ValueError) as err:
        make_ds(files, chat_tok, "chat", seq_len=64, holdout=holdout, split=split)
    msg = str(err.value)
    assert msg.startswith("--val-split "), msg
    assert f"(holdout) leaves {counts.format(n=n)} documents" in msg, msg
