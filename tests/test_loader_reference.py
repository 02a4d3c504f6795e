"""Self-checks of the plain-Python reference (tests/reference.py): it must mean what the spec says
before the Rust loader is compared with it."""

from __future__ import annotations

import random

import numpy as np
import pytest

import reference as ref


def test_splitmix64_matches_the_published_test_vector():
    # Vigna's splitmix64 from state 0: the first outputs are well known.
    gen = ref.splitmix64(0)
    assert next(gen) == 0xE220A8397B1DCDAF
    assert next(gen) == 0x6E789E6AA1B965F4
    assert next(gen) == 0x06C45D188009454F


@pytest.mark.parametrize("n", [0, 1, 2, 17, 300])
def test_epoch_perm_is_a_deterministic_permutation_that_changes_with_epoch_and_seed(n):
    p = ref.epoch_perm(n, seed=5, epoch=0)
    assert sorted(p) == list(range(n))
    assert p == ref.epoch_perm(n, seed=5, epoch=0)
    if n >= 17:
        assert p != ref.epoch_perm(n, seed=5, epoch=1)
        assert p != ref.epoch_perm(n, seed=6, epoch=0)


def _docs(rng, n, lo=1, hi=40):
    docs = []
    for _ in range(n):
        k = rng.randint(lo, hi)
        ids = [1] + [rng.randint(7, 99) for _ in range(k - 1)]
        classes = [0] + [rng.choice([0, 1, 1, 2]) for _ in range(k - 1)]
        docs.append((ids, classes))
    return docs


def test_text_rows_are_the_concatenated_stream_cut_into_full_rows():
    rng = random.Random(0)
    docs = _docs(rng, 50)
    perm = ref.epoch_perm(len(docs), 3, 0)
    stream = [i for d in perm for i in docs[d][0]]
    rows = ref.text_rows(docs, perm, seq_len=15)
    assert len(rows) == len(stream) // 16
    flat = [i for row in rows for piece in row.pieces for i in piece[0]]
    assert flat == stream[: len(rows) * 16]


def test_best_fit_decreasing_rows_respect_capacity_and_pick_the_tightest_row():
    rng = random.Random(1)
    T = 31
    docs = _docs(rng, 200, hi=45)
    perm = ref.epoch_perm(len(docs), 0, 0)
    rows, truncated = ref.chat_rows(docs, perm, T, seed=0, epoch=0)
    assert truncated == sum(len(docs[d][0]) > T + 1 for d in perm)
    assert all(len(r) <= T + 1 for r in rows)
    placed = sorted(d for r in rows for *_, d in r.pieces)
    assert placed == list(range(len(docs)))
    # Undo the row shuffle: shuffled row i is the row opened as number opened[i].
    opened = ref.epoch_perm(len(rows), 0 ^ ref.ROW_SALT, 0)
    assert sorted(opened) == list(range(len(rows)))
    where = {d: opened[i] for i, r in enumerate(rows) for *_, d in r.pieces}
    # Replay longest first (ties in perm order): no row that had room for a document had
    # less room than the one chosen, and a new row opens only when nothing fits.
    items = sorted(perm, key=lambda d: -min(len(docs[d][0]), T + 1))
    free = []
    for d in items:
        n = min(len(docs[d][0]), T + 1)
        fits = [k for k, f in enumerate(free) if f >= n]
        if not fits:
            assert where[d] == len(free)
            free.append(T + 1 - n)
        else:
            best = min(fits, key=lambda k: (free[k], k))
            assert where[d] == best
            free[best] -= n


def test_row_arrays_shift_labels_mask_untrained_and_restart_positions():
    row = ref.Row([([1, 10, 11, 2], [0, 1, 2, 1], 0), ([1, 12], [0, 1], 1)])
    a = ref.row_arrays(row, seq_len=8, think_weight=5.0)
    assert a["input_ids"].tolist() == [1, 10, 11, 2, 1, 12, 0, 0]
    assert a["labels"].tolist() == [10, 11, 2, -100, 12, -100, -100, -100]
    assert a["loss_weights"].tolist() == [1.0, 5.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert a["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 0, 0]
    empty = ref.row_arrays(None, seq_len=4, think_weight=1.0)
    assert empty["labels"].tolist() == [-100] * 4 and not empty["input_ids"].any()


@pytest.mark.parametrize(("n_rows", "bs", "world"), [(10, 2, 1), (10, 2, 3), (7, 3, 4), (0, 2, 2)])
def test_rank_row_indices_are_disjoint_and_cover_all_rows(n_rows, bs, world):
    per_rank = [ref.rank_row_indices(n_rows, bs, r, world) for r in range(world)]
    counts = {len(b) for b in per_rank}
    assert counts == {-(-n_rows // (bs * world))}
    flat = [i for b in per_rank for batch in b for i in batch]
    assert len(flat) == len(set(flat))
    assert {i for i in flat if i < n_rows} == set(range(n_rows))


def test_reference_encoder_trains_only_assistant_content_and_its_eos(hf_tok):
    enc = ref.RefEncoder(hf_tok, "SYS")
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "<think>a</think>b"}]
    ids, classes = enc.encode_conversation(msgs)
    trained = [i for i, c in zip(ids, classes, strict=True) if c]
    body, _ = enc._assistant_content(msgs[1]["content"])
    assert trained == [*body, enc.eos]
    assert [c for c in classes if c == 2] == [2, 2]
    assert hf_tok.decode(ids, skip_special_tokens=False) == ref.render(msgs, "SYS")


@pytest.mark.parametrize(
    ("line", "kind", "reason"),
    [
        (b'{"text": "\xff"}', "text", "invalid_utf8"),
        (b'{"text": "a"', "text", "invalid_json"),
        (b'{"text": "\\ud800"}', "text", "invalid_json"),
        (b'{"text": "a", "x": NaN}', "text", "invalid_json"),
        (b'{"text": 1}', "text", "bad_schema"),
        (b"[1]", "text", "bad_schema"),
        (b'{"conversations": [{"role": "bot", "content": "x"}]}', "chat", "unknown_role"),
        (b'{"conversations": []}', "chat", "empty_conversation"),
        (b'{"conversations": [{"role": "user", "content": "x"}]}', "chat", "no_assistant"),
        (b'{"conversations": [{"role": "user"}]}', "chat", "bad_schema"),
    ],
)
def test_reference_parser_gives_the_reason_codes(line, kind, reason):
    with pytest.raises(ref.BadLine) as e:
        ref.parse_line(line, kind)
    assert e.value.reason == reason


def test_reference_parser_ignores_unknown_keys_and_accepts_surrogate_pairs():
    assert ref.parse_line(b'{"text": "\\ud83d\\ude00", "id": 3}', "text") == "😀"
    assert np.array_equal(ref.class_weights([0, 1, 2], 4.0), np.array([0.0, 1.0, 4.0], np.float32))


def test_holdout_hash_is_splitmix64_output_i_plus_1_from_the_salted_seed():
    for seed in (0, 7, 2**64 - 1):
        gen = ref.splitmix64(seed ^ ref.HOLDOUT_SALT)
        assert [ref.holdout_hash(seed, i) for i in range(50)] == [next(gen) for _ in range(50)]
    assert ref.holdout_hash(ref.HOLDOUT_SALT, 0) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize(("holdout", "seed"), [(0.1, 0), (0.5, 3), (0.9, 2**63)])
def test_split_documents_partition_the_indices_near_the_fraction(holdout, seed):
    n = 4000
    val = ref.split_documents(n, seed, holdout, "val")
    train = ref.split_documents(n, seed, holdout, "train")
    assert sorted(val + train) == list(range(n))
    assert abs(len(val) / n - holdout) < 0.03
    assert ref.split_documents(n, seed, 0.0, "train") == list(range(n))
    assert ref.split_documents(n, seed, 0.0, "val") == []


def test_reference_reader_skips_a_leading_bom_only(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n')
    with pytest.raises(ref.BadLine) as e:
        ref.read_documents([p], "text")
    assert (e.value.reason, e.value.line) == ("invalid_json", 2)
    records, skipped = ref.read_documents([p], "text", on_bad_line="skip")
    assert records == ["a"] and skipped == {"invalid_json": 1}


def test_reference_rejects_a_lone_surrogate_even_under_an_unknown_key():
    with pytest.raises(ref.BadLine) as e:
        ref.parse_line(b'{"text": "a", "meta": "\\udc00"}', "text")
    assert e.value.reason == "invalid_json"
