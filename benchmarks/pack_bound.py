"""How full can chat rows be? Lower bounds on the row count of any packing that keeps each
conversation whole, to judge the loader's fill against what the corpus allows.

    python benchmarks/pack_bound.py CACHE_DIR [--seq-len 512] [--lp]

Reads the conversation lengths from a token cache (`*.idx`: one little-endian u64 end offset
per document), cuts them at the row length T + 1 as the loader does (docs/architecture.md), and
prints:

* the size bound: ⌈Σ len / (T + 1)⌉;
* Martello and Toth's L2 bound, which also counts conversations longer than half a row (no two
  of them share a row) and the small ones that could fill their gaps;
* with `--lp` (needs scipy; not a project dependency): the Gilmore–Gomory LP bound by column
  generation, which for bin packing is in practice within one row of the optimum.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def lengths_from_cache(cache_dir: Path) -> np.ndarray:
    ends = [np.fromfile(p, dtype="<u8").astype(np.int64) for p in sorted(cache_dir.glob("*.idx"))]
    if not ends:
        raise SystemExit(f"{cache_dir}: no *.idx token cache index found")
    return np.concatenate([np.diff(e, prepend=0) for e in ends])


def size_bound(lengths: np.ndarray, cap: int) -> int:
    return math.ceil(int(np.minimum(lengths, cap).sum()) / cap)


def l2_bound(lengths: np.ndarray, cap: int) -> int:
    s = np.minimum(lengths, cap)
    best = size_bound(lengths, cap)
    for k in range(0, cap // 2 + 1):
        j1 = s > cap - k
        j2 = (s > cap // 2) & ~j1
        j3 = (s >= k) & (s <= cap // 2)
        spare = int(j2.sum()) * cap - int(s[j2].sum())
        extra = max(0, math.ceil((int(s[j3].sum()) - spare) / cap))
        best = max(best, int(j1.sum()) + int(j2.sum()) + extra)
    return best


def lp_bound(lengths: np.ndarray, cap: int, max_iter: int = 20_000) -> float:
    """Column generation: the master LP over packing patterns (scipy's HiGHS), priced by a
    bounded knapsack over the distinct sizes."""
    from scipy.optimize import linprog

    s = np.minimum(lengths, cap)
    count = np.bincount(s, minlength=cap + 1)
    sizes = np.nonzero(count)[0]
    demand = count[sizes].astype(float)
    m = len(sizes)
    patterns = []
    for i, size in enumerate(sizes):
        p = np.zeros(m)
        p[i] = min(cap // size, demand[i])
        patterns.append(p)
    # Binary splitting turns the bounded knapsack into a 0/1 knapsack.
    pieces = []
    for i, size in enumerate(sizes):
        left, chunk = int(min(demand[i], cap // size)), 1
        while left > 0:
            t = min(chunk, left)
            pieces.append((i, int(size) * t, t))
            left -= t
            chunk *= 2
    value = np.inf
    for _ in range(max_iter):
        a = np.array(patterns).T
        res = linprog(np.ones(len(patterns)), A_ub=-a, b_ub=-demand, bounds=(0, None))
        value = res.fun
        duals = -res.ineqlin.marginals
        best = np.zeros(cap + 1)
        took = np.zeros((len(pieces), cap + 1), dtype=bool)
        for j, (i, w, t) in enumerate(pieces):
            cand = np.full(cap + 1, -np.inf)
            cand[w:] = best[: cap + 1 - w] + duals[i] * t
            took[j] = cand > best + 1e-12
            best = np.where(took[j], cand, best)
        if best.max() <= 1 + 1e-9:
            return float(value)
        p, r = np.zeros(m), int(np.argmax(best))
        for j in range(len(pieces) - 1, -1, -1):
            if took[j, r]:
                i, w, t = pieces[j]
                p[i] += t
                r -= w
        patterns.append(p)
    raise RuntimeError(f"column generation did not converge in {max_iter} iterations")


def bounds(lengths: np.ndarray, cap: int, lp: bool = False) -> dict:
    """Bounds on the rows of `cap` tokens; `max_fill` is the fill (real tokens / row slots) of
    a packing with the fewest rows the bounds allow."""
    used = int(np.minimum(lengths, cap).sum())
    out = {"documents": len(lengths), "used_tokens": used, "size_rows": size_bound(lengths, cap)}
    out["l2_rows"] = l2_bound(lengths, cap)
    if lp:
        out["lp_rows"] = lp_bound(lengths, cap)
    best = max(out["l2_rows"], math.ceil(out.get("lp_rows", 0) - 1e-6))
    out["best_rows"] = best
    out["max_fill"] = used / (best * cap)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("cache_dir", type=Path)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lp", action="store_true", help="also the LP bound (needs scipy)")
    args = p.parse_args(argv)
    lengths = lengths_from_cache(args.cache_dir)
    print(json.dumps(bounds(lengths, args.seq_len + 1, args.lp), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
