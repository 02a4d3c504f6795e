"""Issue 3 / contracts.md §3: the token cache is used when valid and rebuilt when stale or damaged.

Whatever state the cache is in, the batches must equal the reference computed from the current
files and tokenizer: a stale or damaged cache is rebuilt, never silently used.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import reference as ref


def _cache_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in Path(cache_dir).rglob("*") if p.is_file())


def _snapshot(cache_dir: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in _cache_files(cache_dir)}


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(77)
    text = ref.write_jsonl(tmp_path / "data" / "pre.jsonl", ref.text_objs(rng, 60))
    chat = ref.write_jsonl(tmp_path / "data" / "sft.jsonl", ref.chat_objs(rng, 50))
    return {"text": [text], "chat": [chat]}


def _kw(kind, cache_dir, **extra):
    kw = dict(seq_len=32 if kind == "text" else 160, batch_size=2, seed=4, cache_dir=str(cache_dir))
    kw.update(extra)
    return kw


def _ref_kw(kw):
    return {k: v for k, v in kw.items() if k != "cache_dir"}


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_cold_and_warm_runs_equal_the_reference_and_warm_reuses_the_cache(
    corpus, tmp_path, chat_tok, tok_dir, make_ds, make_ref, kind
):
    cache = tmp_path / "cache"
    kw = _kw(kind, cache, think_weight=10.0)
    exp = make_ref(corpus[kind], tok_dir, kind, memo=False, **_ref_kw(kw)).batches(0)
    ref.assert_same_batches(list(make_ds(corpus[kind], chat_tok, kind, **kw)), exp, "cold")
    files = _snapshot(cache)
    assert files, "the first run wrote no cache file"
    ref.assert_same_batches(list(make_ds(corpus[kind], chat_tok, kind, **kw)), exp, "warm")
    assert _snapshot(cache) == files, "a valid cache was rewritten"
    # think_weight is applied after the cache: another weight, same cache, right weights.
    kw2 = _kw(kind, cache, think_weight=2.0)
    exp2 = make_ref(corpus[kind], tok_dir, kind, memo=False, **_ref_kw(kw2)).batches(0)
    ref.assert_same_batches(list(make_ds(corpus[kind], chat_tok, kind, **kw2)), exp2, "weight")


@pytest.mark.parametrize("same_size", [False, True])
def test_a_changed_source_file_rebuilds_the_cache(
    tmp_path, chat_tok, tok_dir, make_ds, make_ref, same_size
):
    cache = tmp_path / "cache"
    path = tmp_path / "docs.jsonl"
    rng = random.Random(6)
    texts = [f"document {i:04d}: {ref.random_text(rng, 8)}" for i in range(40)]
    ref.write_jsonl(path, [{"text": t} for t in texts])
    kw = _kw("text", cache)
    list(make_ds([path], chat_tok, "text", **kw))
    before = path.read_bytes()
    if same_size:  # same length, one digit changed
        changed = before.replace(b"document 0000", b"document 9999", 1)
        assert changed != before and len(changed) == len(before)
        path.write_bytes(changed)
    else:
        ref.write_jsonl(path, ref.text_objs(rng, 40))
    exp = make_ref([path], tok_dir, "text", memo=False, **_ref_kw(kw)).batches(0)
    ref.assert_same_batches(list(make_ds([path], chat_tok, "text", **kw)), exp, "after edit")


def test_a_different_tokenizer_does_not_use_the_other_tokenizers_cache(
    corpus, tmp_path, chat_tok, tok_dir, minimind_tok_dir, make_ds, make_ref
):
    from spongebob.data import ChatTokenizer

    cache = tmp_path / "cache"
    kw = _kw("chat", cache)
    files = corpus["chat"]
    list(make_ds(files, chat_tok, "chat", **kw))
    other = ChatTokenizer.from_dir(str(minimind_tok_dir))
    exp = make_ref(files, minimind_tok_dir, "chat", memo=False, **_ref_kw(kw)).batches(0)
    ref.assert_same_batches(list(make_ds(files, other, "chat", **kw)), exp, "other tokenizer")
    # And back: the first tokenizer still gets its own batches.
    exp0 = make_ref(files, tok_dir, "chat", memo=False, **_ref_kw(kw)).batches(0)
    ref.assert_same_batches(list(make_ds(files, chat_tok, "chat", **kw)), exp0, "first again")


def test_rebuilding_after_an_edit_removes_the_old_versions_caches_and_keeps_other_files(
    corpus, tmp_path, chat_tok, minimind_tok_dir, make_ds
):
    from spongebob.data import ChatTokenizer

    def metas():
        return sorted(p.name for p in cache.glob("*.json"))

    cache = tmp_path / "cache"
    kw = _kw("chat", cache)
    path = corpus["chat"][0]
    other_file = corpus["text"][0]
    list(make_ds([path], chat_tok, "chat", **kw))
    list(make_ds([path], ChatTokenizer.from_dir(str(minimind_tok_dir)), "chat", **kw))
    list(make_ds([other_file], chat_tok, "text", **_kw("text", cache)))
    before = metas()
    assert len(before) == 3 and len(_cache_files(cache)) == 12

    with path.open("a", encoding="utf-8") as f:  # a new version of the file
        f.write(path.read_text(encoding="utf-8").splitlines()[0] + "\n")
    list(make_ds([path], chat_tok, "chat", **kw))
    after = metas()
    # Both tokenizers' caches of the old version are gone; the new version's cache and the
    # other file's cache are there, with all their data files.
    assert len(after) == 2 and len(_cache_files(cache)) == 8, after
    kept = set(before) & set(after)
    assert [n.startswith(other_file.stem) for n in kept] == [True]
    assert [n for n in after if n.startswith(path.stem) and n not in before]


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _zero_length(p: Path) -> None:
    p.write_bytes(b"")


def _garbage_header(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[: min(16, len(data))] = b"\xab" * min(16, len(data))
    p.write_bytes(bytes(data))


def _flip_middle(p: Path) -> None:
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + 8, len(data))):
        data[i] ^= 0x5A
    p.write_bytes(bytes(data))


def _random_bytes(p: Path) -> None:
    n = p.stat().st_size
    p.write_bytes(random.Random(n).randbytes(n))


DAMAGE = {
    "truncated": _truncate,
    "zero_length": _zero_length,
    "garbage_header": _garbage_header,
    "flipped_middle_bytes": _flip_middle,
    "random_bytes": _random_bytes,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("kind", ["text", "chat"])
def test_a_damaged_cache_is_detected_and_rebuilt(
    corpus, tmp_path, chat_tok, tok_dir, make_ds, make_ref, kind, damage
):
    cache = tmp_path / "cache"
    kw = _kw(kind, cache, think_weight=5.0)
    files = corpus[kind]
    exp = make_ref(files, tok_dir, kind, memo=False, **_ref_kw(kw)).batches(0)
    list(make_ds(files, chat_tok, kind, **kw))
    cache_files = _cache_files(cache)
    assert cache_files
    for p in cache_files:
        if p.stat().st_size:
            DAMAGE[damage](p)
    try:
        got = list(make_ds(files, chat_tok, kind, **kw))
    except Exception as e:  # an error is better than silence, but the contract is a rebuild
        pytest.fail(f"damaged cache ({damage}) raised instead of being rebuilt: {e!r}")
    ref.assert_same_batches(got, exp, f"after {damage}")
    ref.assert_same_batches(list(make_ds(files, chat_tok, kind, **kw)), exp, "rebuilt cache")


def test_skip_counts_survive_a_warm_start(tmp_path, chat_tok, make_ds):
    rng = random.Random(3)
    good = [*ref.text_objs(rng, 20)]
    path = tmp_path / "with_bad.jsonl"
    ref.write_jsonl(path, good)
    with path.open("ab") as f:
        f.write(b'{"text": 1}\n{"text": "\xff"}\n')
    kw = _kw("text", tmp_path / "cache", on_bad_line="skip")
    cold = make_ds([path], chat_tok, "text", **kw)
    list(cold)
    warm = make_ds([path], chat_tok, "text", **kw)
    list(warm)
    for st in (cold.stats(), warm.stats()):
        assert {k: v for k, v in dict(st["skipped"]).items() if v} == {
            "bad_schema": 1,
            "invalid_utf8": 1,
        }
        assert st["documents"] == len(good)


def test_an_error_policy_run_after_a_skip_run_still_raises(tmp_path, chat_tok, make_ds):
    """The cache must not hide bad lines from a later run with the error policy."""
    from spongebob.data import DataFormatError

    rng = random.Random(8)
    path = ref.write_jsonl(tmp_path / "d.jsonl", ref.text_objs(rng, 10))
    with path.open("ab") as f:
        f.write(b"{broken\n")
    cache = tmp_path / "cache"
    list(make_ds([path], chat_tok, "text", **_kw("text", cache, on_bad_line="skip")))
    with pytest.raises(DataFormatError) as err:
        list(make_ds([path], chat_tok, "text", **_kw("text", cache)))
    assert f"{path}:11" in str(err.value)


def test_cache_dir_is_created_if_missing(corpus, tmp_path, chat_tok, make_ds):
    cache = tmp_path / "deep" / "er" / "cache"
    list(make_ds(corpus["text"], chat_tok, "text", **_kw("text", cache)))
    assert cache.is_dir() and _cache_files(cache)
    assert not any(p.name.startswith(".") and p.suffix == ".tmp" for p in _cache_files(cache))
    assert os.access(cache, os.W_OK)
