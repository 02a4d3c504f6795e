"""Test support for the training loop (no tests here).

`FakePacked` has `spongebob.data.PackedDataset`'s interface and batch contract (position ids
restarting per document, −100 labels, weights, the rank/row rule, exact resume state) over
token ids generated from each jsonl line. The loop was first built against it; now it serves
the tests that inject faults the real loader cannot produce: steps without trained tokens
(`empty_batches`) and NaN losses (`nan_batches`), given as global batch indices of epoch 0.
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from pathlib import Path

import numpy as np
import torch

IGNORE = -100


class FakePacked:
    """Generated batches with PackedDataset's interface (see the module docstring)."""

    def __init__(
        self,
        paths,
        tokenizer,
        kind: str = "text",
        seq_len: int = 64,
        batch_size: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        think_weight: float = 1.0,
        cache_dir=None,
        on_bad_line: str = "error",
        empty_batches: tuple[int, ...] = (),
        nan_batches: tuple[int, ...] = (),
    ):
        self.kind, self.seq_len, self.batch_size = kind, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.think_weight = think_weight
        self.vocab = int(tokenizer.vocab_size)
        self.empty_batches, self.nan_batches = set(empty_batches), set(nan_batches)
        self.docs = []  # (ids, classes)
        for p in paths:
            for line in Path(p).read_bytes().splitlines():
                if line.strip():
                    self.docs.append(self._doc(line))
        key = [str(p) for p in paths] + [kind, seq_len, batch_size, seed, rank, world_size]
        key.append(think_weight)
        self.fingerprint = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
        self.epoch, self.batches = 0, 0
        self._rows_cache: dict[int, list] = {}

    def _doc(self, line: bytes):
        rng = random.Random(zlib.crc32(line))
        n = rng.randint(4, 3 * self.seq_len // 4)
        ids = [1] + [rng.randrange(7, self.vocab) for _ in range(n - 2)] + [2]
        if self.kind == "text":
            classes = [0] + [1] * (n - 1)
        else:  # a prompt (untrained), then an answer with a reasoning-tag token (class 2)
            cut = rng.randint(1, n - 2)
            classes = [0] * cut + [1] * (n - cut)
            classes[cut] = 2
            ids[cut] = 3
        return ids, classes

    # -- the epoch plan --

    def _rows(self, epoch: int) -> list:
        if epoch in self._rows_cache:
            return self._rows_cache[epoch]
        order = list(range(len(self.docs)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        T1 = self.seq_len + 1
        rows = []
        if self.kind == "text":
            ids, cls, pos = [], [], []
            for i in order:
                d_ids, d_cls = self.docs[i]
                ids += d_ids
                cls += d_cls
                pos += list(range(len(d_ids)))
            for r in range(len(ids) // T1):
                sl = slice(r * T1, (r + 1) * T1)
                p = pos[sl]
                p = [q - p[0] if j < (p.index(0) if 0 in p else T1) else q for j, q in enumerate(p)]
                rows.append((ids[sl], cls[sl], p))
        else:
            open_rows: list = []
            for i in order:
                d_ids, d_cls = (x[:T1] for x in self.docs[i])
                fits = [r for r in open_rows if T1 - len(r[0]) >= len(d_ids)]
                if fits:
                    row = min(fits, key=lambda r: T1 - len(r[0]))
                else:
                    row = ([], [], [])
                    open_rows.append(row)
                row[0].extend(d_ids)
                row[1].extend(d_cls)
                row[2].extend(range(len(d_ids)))
            for ids, cls, pos in open_rows:
                pad = T1 - len(ids)
                rows.append((ids + [0] * pad, cls + [0] * pad, pos + [0] * pad))
        self._rows_cache = {epoch: rows}
        return rows

    def _row_arrays(self, row):
        T = self.seq_len
        if row is None:
            return (
                np.zeros(T, np.int64),
                np.full(T, IGNORE, np.int64),
                np.zeros(T, np.float32),
                np.zeros(T, np.int64),
            )
        ids, cls, pos = row
        w = {0: 0.0, 1: 1.0, 2: self.think_weight}
        labels = np.array([ids[t + 1] if cls[t + 1] else IGNORE for t in range(T)], np.int64)
        weights = np.array([w[cls[t + 1]] for t in range(T)], np.float32)
        return np.array(ids[:T], np.int64), labels, weights, np.array(pos[:T], np.int64)

    def _batch(self, epoch: int, g: int) -> dict[str, torch.Tensor]:
        rows = self._rows(epoch)
        B, W = self.batch_size, self.world_size
        start = g * B * W + self.rank * B
        arrays = [
            self._row_arrays(rows[i] if i < len(rows) else None) for i in range(start, start + B)
        ]
        ids, labels, weights, pos = (
            torch.from_numpy(np.stack(a)) for a in zip(*arrays, strict=True)
        )
        if epoch == 0 and g in self.empty_batches:
            labels = torch.full_like(labels, IGNORE)
            weights = torch.zeros_like(weights)
        if epoch == 0 and g in self.nan_batches:
            weights = torch.full_like(weights, float("nan"))
        return {"input_ids": ids, "labels": labels, "loss_weights": weights, "position_ids": pos}

    # -- PackedDataset's interface --

    def __len__(self) -> int:
        n_rows = len(self._rows(0))
        per = self.batch_size * self.world_size
        return -(-n_rows // per)

    def __iter__(self):
        n = len(self)
        while self.batches < n:
            g = self.batches
            self.batches += 1
            yield self._batch(self.epoch, g)
        self.epoch, self.batches = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches = epoch, 0

    def state_dict(self) -> dict:
        return {
            "version": 1,
            "epoch": self.epoch,
            "batches": self.batches,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("loader state from a different configuration")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])

    def stats(self) -> dict:
        return {"documents": len(self.docs), "rows": len(self._rows(0))}


def write_lines(path: Path, n: int, seed: int = 0, kind: str = "text") -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            if kind == "text":
                obj = {"text": f"doc {i} {rng.random()}"}
            else:
                obj = {
                    "conversations": [
                        {"role": "system", "content": "s"},
                        {"role": "user", "content": f"q{i} {rng.random()}"},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            f.write(json.dumps(obj) + "\n")
    return path


class Killed(BaseException):
    """What `KillAfter` raises: a process dying in the middle of a run (a BaseException, so
    that no `except Exception` in the product can swallow it)."""


class KillAfter:
    """A loader that dies when asked for batch `n` + 1 (a kill mid-step, in-process)."""

    def __init__(self, ds, n: int):
        self.ds, self.n = ds, n

    def __getattr__(self, name):
        return getattr(self.ds, name)

    def __len__(self):
        return len(self.ds)

    def __iter__(self):
        for b in self.ds:
            if self.n == 0:
                raise Killed
            self.n -= 1
            yield b
