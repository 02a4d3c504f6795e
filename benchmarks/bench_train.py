"""Training throughput: packed batches (ours) vs the tutorial's padded batches, same model.

The tutorial puts one document (or conversation) per row and pads it to `seq_len`; we pack
several into a row with block-diagonal attention. Both runs below train the same model on the
same synthetic documents (lengths drawn like SFT conversations: log-normal, most far shorter
than `seq_len`) with the same batch shape, so the difference is how many *trained* tokens each
step carries. We report tokens/s (all positions), trained tokens/s and their ratio, and on CUDA
the model FLOPs utilisation (MFU) from the PaLM formula 6·N + 12·L·dim·T per token.

    python benchmarks/bench_train.py                       # tiny preset on CPU
    python benchmarks/bench_train.py --preset spongebob --device cuda --seq-len 512 --batch-size 84

Prints a table and writes JSON (default benchmarks/results/bench_train-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from spongebob.model import PRESETS, SpongeBob, format_params

# Peak dense bf16 TFLOP/s by GPU name fragment (for MFU).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "4090": 165.2,
    "L40S": 362.0,
    "A10": 125.0,
    "L4": 121.0,
    "3090": 71.0,
    "V100": 125.0,
}


def synthetic_docs(n: int, seq_len: int, vocab: int, seed: int, median_frac: float) -> list:
    """Token lists with log-normal lengths (median `median_frac`·seq_len, capped at seq_len+1)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        length = int(rng.lognormvariate(math.log(median_frac * seq_len), 0.6))
        length = max(8, min(seq_len + 1, length))
        docs.append([1] + [rng.randrange(7, vocab) for _ in range(length - 2)] + [2])
    return docs


def padded_batches(docs, seq_len: int, batch: int):
    """The tutorial's layout: one document per row, padded with 0, plain causal attention."""
    rows = []
    for d in docs:
        ids = d[: seq_len + 1] + [0] * (seq_len + 1 - min(len(d), seq_len + 1))
        n = min(len(d), seq_len + 1)
        labels = [ids[t + 1] if t + 1 < n else -100 for t in range(seq_len)]
        rows.append((ids[:seq_len], labels, None))
    return _stack(rows, batch)


def packed_batches(docs, seq_len: int, batch: int):
    """Our layout: best-fit packing into rows of seq_len+1, positions restart per document."""
    T1 = seq_len + 1
    open_rows: list = []
    for d in docs:
        d = d[:T1]
        fits = [r for r in open_rows if T1 - len(r[0]) >= len(d)]
        row = min(fits, key=lambda r: T1 - len(r[0])) if fits else None
        if row is None:
            row = ([], [])
            open_rows.append(row)
        row[0].extend(d)
        row[1].extend(range(len(d)))
    rows = []
    for ids, pos in open_rows:
        real = len(ids)
        ids = ids + [0] * (T1 - real)
        pos = pos + [0] * (T1 - real)
        labels = [ids[t + 1] if t + 1 < real and pos[t + 1] != 0 else -100 for t in range(seq_len)]
        rows.append((ids[:seq_len], labels, pos[:seq_len]))
    return _stack(rows, batch)


def _stack(rows, batch: int):
    out = []
    for i in range(0, len(rows) - batch + 1, batch):
        chunk = rows[i : i + batch]
        ids = torch.tensor([r[0] for r in chunk])
        labels = torch.tensor([r[1] for r in chunk])
        pos = None if chunk[0][2] is None else torch.tensor([r[2] for r in chunk])
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "position_ids": pos,
                "loss_weights": (labels != -100).float(),
            }
        )
    return out


def run(model, opt, batches, steps: int, device, dtype) -> dict:
    """Time `steps` optimizer steps (one micro-batch each) after one warm-up step."""
    ac = (
        torch.autocast(device.type, dtype=dtype)
        if dtype != torch.float32
        else torch.autocast(device.type, enabled=False)
    )
    tokens = trained = 0

    def step(b):
        b = {k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in b.items()}
        n = (b["labels"] != -100).sum().clamp_min(1).float()
        with ac:
            loss = model(
                b["input_ids"],
                b["position_ids"],
                labels=b["labels"],
                loss_weights=b["loss_weights"],
                normalizer=n,
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step(batches[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        b = batches[(i + 1) % len(batches)]
        step(b)
        tokens += b["input_ids"].numel()
        trained += int((b["labels"] != -100).sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {
        "seconds": dt,
        "tokens_per_s": tokens / dt,
        "trained_tokens_per_s": trained / dt,
        "fill": trained / tokens,
    }
    if device.type == "cuda":
        out["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2, help="alternate padded/packed this often")
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument(
        "--median-frac",
        type=float,
        default=0.25,
        help="median document length as a fraction of seq_len",
    )
    ap.add_argument("--vocab", type=int, default=6400)
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    cfg = PRESETS[args.preset]
    cfg = type(cfg)(
        **{
            **asdict(cfg),
            "vocab_size": args.vocab,
            "kernels": args.kernels,
            "attention": args.attention,
        }
    )
    docs = synthetic_docs(args.docs, args.seq_len, args.vocab, 0, args.median_frac)
    layouts = {
        "padded (tutorial)": padded_batches(docs, args.seq_len, args.batch_size),
        "packed (ours)": packed_batches(docs, args.seq_len, args.batch_size),
    }
    results: dict[str, list] = {k: [] for k in layouts}
    n_params = None
    for rep in range(args.repeats + 1):  # round 0 warms the process up and is discarded
        for name, batches in layouts.items():
            torch.manual_seed(0)
            model = SpongeBob(cfg).to(device).train()
            n_params = model.num_parameters()
            fwd = torch.compile(model) if args.compile else model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            r = run(fwd, opt, batches, args.steps if rep else 2, device, dtype)
            if rep:
                results[name].append(r)

    def med(name, key):
        vals = [r[key] for r in results[name] if key in r]
        return statistics.median(vals) if vals else None

    flops_per_token = 6 * n_params + 12 * cfg.n_layers * cfg.dim * args.seq_len
    peak = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    if gpu:
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    rows = []
    for name in layouts:
        row = {
            "layout": name,
            "tokens_per_s": med(name, "tokens_per_s"),
            "trained_tokens_per_s": med(name, "trained_tokens_per_s"),
            "fill": med(name, "fill"),
            "max_memory_gb": med(name, "max_memory_gb"),
        }
        if peak:
            row["mfu"] = row["tokens_per_s"] * flops_per_token / (peak * 1e12)
        rows.append(row)
    ratio = rows[1]["trained_tokens_per_s"] / rows[0]["trained_tokens_per_s"]

    print(
        f"\nmodel {args.preset} ({format_params(n_params)}), {device}"
        f"{' (' + gpu + ')' if gpu else ''}, {str(dtype).removeprefix('torch.')}, "
        f"batch {args.batch_size} × seq {args.seq_len}, {args.steps} steps × {args.repeats}"
    )
    hdr = f"{'layout':<20}{'tokens/s':>12}{'trained tok/s':>15}{'fill':>8}"
    hdr += f"{'MFU':>8}" if peak else ""
    print(hdr)
    for r in rows:
        line = (
            f"{r['layout']:<20}{r['tokens_per_s']:>12,.0f}{r['trained_tokens_per_s']:>15,.0f}"
            f"{r['fill']:>8.1%}"
        )
        line += f"{r['mfu']:>8.1%}" if peak else ""
        print(line)
    print(f"packed / padded trained tokens/s: {ratio:.2f}×")

    out = {
        "benchmark": "bench_train",
        "date": time.strftime("%Y-%m-%d"),
        "device": str(device),
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": n_params,
        "flops_per_token": flops_per_token,
        "peak_tflops": peak,
        "results": rows,
        "raw": results,
        "packed_over_padded_trained_tokens_per_s": ratio,
    }
    path = args.json or Path(__file__).parent / "results" / f"bench_train-{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
