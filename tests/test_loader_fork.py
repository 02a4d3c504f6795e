"""Issue 3: the loader survives a fork (torch DataLoader workers fork; rayon #708).

The parent iterates first (so any thread pool and prefetch thread exist), then a forked child
iterates. The child must finish within a timeout and produce the reference batches.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
from collections import Counter

import pytest

import reference as ref

TIMEOUT = 90


def _digests_in_child(make, q) -> None:
    try:
        ds = make()
        q.put(("ok", [ref.batch_digest(b) for b in ds]))
    except BaseException as e:
        q.put(("error", repr(e)))


def _inherited_in_child(ds, epoch, q) -> None:
    try:
        ds.set_epoch(epoch)
        q.put(("ok", [ref.batch_digest(b) for b in ds]))
    except BaseException as e:
        q.put(("error", repr(e)))


def _run_forked(target, *args) -> list[bytes]:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q), daemon=True)
    p.start()
    try:
        status, payload = q.get(timeout=TIMEOUT)
    except queue.Empty:
        p.kill()
        p.join(5)
        pytest.fail(f"forked child produced nothing within {TIMEOUT}s (hang?)")
    p.join(TIMEOUT)
    if p.is_alive():
        p.kill()
        pytest.fail("forked child did not exit")
    assert status == "ok", payload
    assert p.exitcode == 0
    return payload


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_forked_child_iterates_after_the_parent_started_iterating(
    loader_files, chat_tok, tok_dir, make_ds, make_ref, tmp_path, kind
):
    files = loader_files[kind]
    kw = dict(seq_len=32 if kind == "text" else 160, batch_size=2, seed=2)
    exp = [ref.batch_digest(b) for b in make_ref(files, tok_dir, kind, **kw).batches(0)]
    exp1 = [ref.batch_digest(b) for b in make_ref(files, tok_dir, kind, **kw).batches(1)]

    parent = make_ds(files, chat_tok, kind, cache_dir=str(tmp_path / "cache"), **kw)
    assert [ref.batch_digest(b) for b in parent] == exp
    it = iter(parent)  # epoch 1 in flight: a prefetch thread is running while we fork
    next(it)

    # A fresh dataset built in the child.
    got = _run_forked(
        _digests_in_child,
        lambda: make_ds(files, chat_tok, kind, cache_dir=str(tmp_path / "cache"), **kw),
    )
    assert got == exp, "fresh dataset in a forked child"
    # The parent's own dataset object, inherited by the child.
    got = _run_forked(_inherited_in_child, parent, 1)
    assert got == exp1, "inherited dataset in a forked child"
    # The parent still works afterwards.
    rest = [ref.batch_digest(b) for b in it]
    assert rest == exp1[1:]


class _Iterable:
    """Minimal torch IterableDataset around a PackedDataset (if it is not one already)."""

    def __new__(cls, ds):
        import torch.utils.data

        if isinstance(ds, torch.utils.data.IterableDataset):
            return ds

        class Wrapped(torch.utils.data.IterableDataset):
            def __iter__(self):
                return iter(ds)

        return Wrapped()


def test_torch_dataloader_with_two_fork_workers_does_not_hang_and_yields_reference_batches(
    loader_files, chat_tok, tok_dir, make_ds, make_ref
):
    import torch.utils.data

    files = loader_files["chat"]
    kw = dict(seq_len=160, batch_size=2, seed=6)
    ds = make_ds(files, chat_tok, "chat", **kw)
    list(ds)  # the parent has iterated (threads exist) before the workers fork
    ds.set_epoch(0)
    dl = torch.utils.data.DataLoader(
        _Iterable(ds),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="fork",
        timeout=TIMEOUT,
    )
    got = Counter(ref.batch_digest(b) for b in dl)
    whole = Counter(ref.batch_digest(b) for b in make_ref(files, tok_dir, "chat", **kw).batches(0))
    shared = Counter()
    for r in range(2):  # each worker taking its own share of the rows (rank r of 2)
        shared.update(
            ref.batch_digest(b)
            for b in make_ref(files, tok_dir, "chat", **kw, rank=r, world_size=2).batches(0)
        )
    # The spec doesn't say whether DataLoader workers split the rows or each yield all of them.
    doubled = Counter({k: 2 * v for k, v in whole.items()})
    assert got in (shared, doubled), f"{sum(got.values())} batches, neither split nor doubled"


def test_dataloader_workers_follow_the_epoch_and_refuse_a_mid_epoch_position(
    loader_files, chat_tok, tok_dir, make_ds, make_ref
):
    import torch.utils.data

    files = loader_files["chat"]
    kw = dict(seq_len=160, batch_size=2, seed=6)
    ds = make_ds(files, chat_tok, "chat", **kw)
    ds.set_epoch(1)
    dl = torch.utils.data.DataLoader(
        _Iterable(ds),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="fork",
        timeout=TIMEOUT,
    )
    got = Counter(ref.batch_digest(b) for b in dl)
    want = Counter()
    for r in range(2):  # worker w of 2 is rank w of 2, in epoch 1 (not epoch 0)
        want.update(
            ref.batch_digest(b)
            for b in make_ref(files, tok_dir, "chat", **kw, rank=r, world_size=2).batches(1)
        )
    assert got == want

    next(iter(ds))  # one batch handed out: a position inside the epoch
    dl = torch.utils.data.DataLoader(
        _Iterable(ds),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="fork",
        timeout=TIMEOUT,
    )
    with pytest.raises(ValueError, match="mid-epoch position"):
        list(dl)
