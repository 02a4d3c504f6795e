"""Training-step throughput of the product against a plain PyTorch loop on padded batches.

What is timed is the product's own step: `spongebob.train.train` (the real loop, the Rust
loader packing a generated chat corpus, the model with the chosen kernels and attention) runs
for a few windows of `--window` steps, and tokens/s come from the `metrics.jsonl` it writes (the
first window, which holds the warm-up and any compilation, is dropped). The baseline is the
tutorial's (MiniMind's) way: one conversation per row padded to `seq_len`, plain causal
attention, full `[B, T, vocab]` logits into `F.cross_entropy`, AdamW, eager PyTorch ops, on
the same conversations with the same loss mask (pre-tokenized before timing, which favours
the baseline: MiniMind tokenizes in `__getitem__`).

    python benchmarks/bench_train.py                          # CPU: spongebob preset, 4 × 512
    python benchmarks/bench_train.py --device cuda --shapes 84x512 28x1024 \
        --variants torch-sdpa torch-compile triton-flex padded

Variants (each run in its own subprocess, so peak memory is its own):

* `torch-sdpa`    train(): PyTorch reference ops, SDPA with the block-diagonal boolean mask
* `torch-compile` train(): the same under `torch.compile`
* `triton-flex`   train(): the Triton kernels and FlexAttention (the CUDA default)
* `triton-sdpa`   train(): the Triton kernels with SDPA (FlexAttention has no backward on CPU)
* `padded`        the MiniMind-style eager loop

Reported per shape and variant: tokens/s (all B·T positions), trained tokens/s (labels ≠
−100), fill, MFU (from metrics.jsonl when the trainer reports it, else 6·N + 12·L·dim·T FLOPs
per token over the GPU's dense bf16 peak; none on CPU), peak memory (CUDA allocator peak, or
the process's peak RSS on CPU), and the ratios against `padded` and `torch-sdpa` within the
same run (these machines are noisy: compare within a run). Prints a table and writes JSON
with machine info (default benchmarks/results/bench_train-<device>.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import machine_info, peak_mb, rss_mb  # noqa: E402

# Dense bf16 tensor-core peak TFLOP/s by GPU name fragment (no sparsity); fp32 runs use TF32,
# counted as half of it. Only a fallback: the trainer's own "mfu" is used when it has one.
VARIANTS = {
    "torch-sdpa": {"kernels": "torch", "attention": "sdpa", "compile": False},
    "torch-compile": {"kernels": "torch", "attention": "sdpa", "compile": True},
    "triton-flex": {"kernels": "triton", "attention": "flex", "compile": False},
    "triton-sdpa": {"kernels": "triton", "attention": "sdpa", "compile": False},
    "padded": None,
}
PADDED_RUNTIME = {"kernels": "torch", "attention": "sdpa", "compile": False}  # (eager PyTorch)


# --- data --------------------------------------------------------------------------------------


def prepare_data(work: Path, corpus_mb: float, vocab: int, tokenizer: str | None) -> dict:
    """A generated Chinese-heavy chat corpus (benchmarks/corpus.py) and a tokenizer trained on
    it (or the one given). Reused when already in `work`."""
    from corpus import ChineseCorpus, write_jsonl

    work.mkdir(parents=True, exist_ok=True)
    data = work / f"chat-{corpus_mb:g}mb.jsonl"
    if not data.is_file():
        write_jsonl(data, corpus_mb, ChineseCorpus(1).conversation)
    if tokenizer is None:
        tok_dir = work / f"tok-{vocab}"
        if not (tok_dir / "tokenizer.json").is_file():
            from spongebob.tokenizer import train_tokenizer

            train_tokenizer([data], tok_dir, vocab_size=vocab, show_progress=False)
        tokenizer = str(tok_dir)
    return {"data": str(data), "tokenizer": str(tokenizer)}


# --- workers (one subprocess per measurement) -------------------------------------------------


def _device_and_dtype(spec):
    import torch

    name = spec["device"]
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    dtype = spec["dtype"]
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return device, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def _windows(records: list[dict], tokens_per_window: int) -> list[dict]:
    """Per logged window: its seconds, tokens, trained tokens and MFU (when logged)."""
    out = []
    for r in records:
        seconds = tokens_per_window / r["tokens_per_s"]
        out.append(
            {
                "step": r["step"],
                "seconds": seconds,
                "tokens": tokens_per_window,
                "trained": r["trained_tokens_per_s"] * seconds,
                "mfu": r.get("mfu"),
                "loss": r.get("loss"),
            }
        )
    return out


def _throughput(windows: list[dict], steps_per_window: int) -> dict:
    """Tokens/s over the timed windows (the first one is warm-up), and the loss curve's ends."""
    timed = windows[1:]
    secs = sum(w["seconds"] for w in timed)
    return {
        "tokens_per_s": sum(w["tokens"] for w in timed) / secs,
        "trained_tokens_per_s": sum(w["trained"] for w in timed) / secs,
        "timed_steps": steps_per_window * len(timed),
        "timed_seconds": secs,
        "warmup_seconds": windows[0]["seconds"],
        "loss_first_window": windows[0]["loss"],
        "loss_last_window": windows[-1]["loss"],
        "windows": windows,
    }


def worker_product(spec: dict) -> dict:
    """train() for warm-up + timed windows; throughput read back from metrics.jsonl."""
    import torch

    import spongebob.model as model_mod
    from spongebob.config import stage_config
    from spongebob.train import train

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device, _ = _device_and_dtype(spec)
    # Which op set and attention path the trainer really ran (a runtime choice that is easy
    # to lose on the way from the config to the model): record what the model asked for.
    seen = {"ops": [], "flex_masks": 0, "dense_masks": 0}
    get_ops, flex_mask, dense_mask = (
        model_mod.get_ops,
        model_mod.flex_block_mask,
        model_mod.block_causal_mask,
    )

    def get_ops_spy(*a, **k):
        ops = get_ops(*a, **k)
        seen["ops"].append(ops.name)
        return ops

    def flex_spy(*a, **k):
        seen["flex_masks"] += 1
        return flex_mask(*a, **k)

    def dense_spy(*a, **k):
        seen["dense_masks"] += 1
        return dense_mask(*a, **k)

    model_mod.get_ops = get_ops_spy
    if not spec["compile"]:  # (under torch.compile the spies would be traced, not called)
        model_mod.flex_block_mask, model_mod.block_causal_mask = flex_spy, dense_spy
    K, R = spec["window"], spec["windows"]
    out_dir = Path(spec["run_dir"])
    cfg = stage_config(
        "sft",
        data=[spec["data"]],
        out=str(out_dir),
        tokenizer=spec["tokenizer"],
        preset=spec["preset"],
        init="none",
        max_steps=K * (R + 1),
        batch_size=spec["batch"],
        accum=1,
        seq_len=spec["seq_len"],
        device=spec["device"],
        dtype=spec["dtype"],
        kernels=spec["kernels"],
        attention=spec["attention"],
        compile=spec["compile"],
        seed=0,
        save_every=10**9,
        log_every=K,
        progress=False,
        cache_dir=spec["cache_dir"],
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    peak_cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    records = [
        json.loads(line)
        for line in (out_dir / "sft" / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    records = [r for r in records if r.get("tokens_per_s") and "event" not in r]
    windows = _windows(records, K * spec["batch"] * spec["seq_len"])
    res = {
        **_throughput(windows, K),
        "wall_s": wall,
        "peak_mem_mb": peak_cuda,
        "peak_rss_mb": peak_mb(rss_mb()),
        "kernels_used": seen["ops"][-1] if seen["ops"] else None,
        "attention_used": (
            None
            if spec["compile"]
            else "flex"
            if seen["flex_masks"] and not seen["dense_masks"]
            else "sdpa"
            if seen["dense_masks"] and not seen["flex_masks"]
            else f"flex {seen['flex_masks']} / sdpa {seen['dense_masks']} masks"
        ),
    }
    res["fill"] = res["trained_tokens_per_s"] / res["tokens_per_s"]
    timed = windows[1:]
    if all(w["mfu"] is not None for w in timed):
        res["mfu"] = sum(w["mfu"] * w["seconds"] for w in timed) / res["timed_seconds"]
        res["mfu_source"] = "metrics.jsonl"
    shutil.rmtree(out_dir, ignore_errors=True)  # the checkpoint (weights + optimizer) is large
    return res


def padded_rows(data: str, tokenizer, seq_len: int, n_rows: int, seed: int) -> list:
    """One conversation per row (shuffled, as MiniMind's DataLoader does), truncated to
    seq_len + 1 tokens and padded with 0; labels are the next token where it is trained
    (the same mask the loader builds, contracts.md §2), else −100."""
    convs = [json.loads(line)["conversations"] for line in open(data, encoding="utf-8")]
    random.Random(seed).shuffle(convs)
    rows = []
    for i in range(n_rows):
        ids, weights = tokenizer.encode_conversation(convs[i % len(convs)])
        ids, weights = list(ids[: seq_len + 1]), list(weights[: seq_len + 1])
        n = len(ids)
        x = ids[:seq_len] + [0] * (seq_len - min(n, seq_len))
        y = [ids[t + 1] if t + 1 < n and weights[t + 1] > 0 else -100 for t in range(seq_len)]
        rows.append((x, y))
    return rows


def worker_padded(spec: dict) -> dict:
    """The MiniMind-style step: padded rows, full logits, F.cross_entropy, AdamW, eager."""
    import torch
    import torch.nn.functional as F

    from spongebob.model import PRESETS, SpongeBob
    from spongebob.tokenizer import load

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device, dtype = _device_and_dtype(spec)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer does
        torch.backends.cudnn.allow_tf32 = True
    tok = load(spec["tokenizer"])
    K, R, B, T = spec["window"], spec["windows"], spec["batch"], spec["seq_len"]
    n_steps = K * (R + 1)
    rows = padded_rows(spec["data"], tok, T, n_steps * B, seed=0)
    batches = []
    for s in range(n_steps):
        chunk = rows[s * B : (s + 1) * B]
        batches.append((torch.tensor([r[0] for r in chunk]), torch.tensor([r[1] for r in chunk])))
    cfg = replace(PRESETS[spec["preset"]], vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = SpongeBob(cfg, kernels="torch", attention="sdpa").to(device).train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=5e-4,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        fused=device.type == "cuda",
    )
    amp = dtype != torch.float32

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    windows = []
    losses = []
    t_all = time.perf_counter()
    for w in range(R + 1):
        sync()
        t0 = time.perf_counter()
        trained = 0
        for x, y in batches[w * K : (w + 1) * K]:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                logits = model(x)  # [B, T, V], fp32
            # MiniMind's (ce · mask).sum() / mask.sum(); a row set with no trained token
            # gives 0, not NaN.
            ce = F.cross_entropy(
                logits.view(-1, logits.shape[-1]), y.view(-1), ignore_index=-100, reduction="sum"
            )
            loss = ce / (y != -100).sum().clamp_min(1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            trained += int((y != -100).sum())
            losses.append(loss.detach())
        sync()
        seconds = time.perf_counter() - t0
        windows.append(
            {
                "step": (w + 1) * K,
                "seconds": seconds,
                "tokens": K * B * T,
                "trained": trained,
                "loss": float(torch.stack(losses[-K:]).mean()),
            }
        )
    res = {
        **_throughput(windows, K),
        "wall_s": time.perf_counter() - t_all,
        "peak_mem_mb": (
            torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        ),
        "peak_rss_mb": peak_mb(rss_mb()),
        "kernels_used": model.ops.name,
        "attention_used": "sdpa (causal, no mask)",
    }
    res["fill"] = res["trained_tokens_per_s"] / res["tokens_per_s"]
    return res


def worker(spec: dict) -> dict:
    import torch

    res = worker_padded(spec) if spec["variant"] == "padded" else worker_product(spec)
    device, dtype = _device_and_dtype(spec)
    from spongebob.model import PRESETS, SpongeBob
    from spongebob.runtime import peak_flops
    from spongebob.tokenizer import load

    vocab = load(spec["tokenizer"]).vocab_size
    model = SpongeBob(replace(PRESETS[spec["preset"]], vocab_size=vocab)).to("meta")
    res["parameters"] = model.num_parameters()
    res["flops_per_token"] = model.flops_per_token(spec["seq_len"])
    peak = peak_flops(device, dtype)
    res["peak_flops"] = peak
    if res.get("mfu") is None:
        res["mfu"] = res["tokens_per_s"] * res["flops_per_token"] / peak if peak else None
        res["mfu_source"] = "SpongeBob.flops_per_token, runtime.peak_flops" if peak else None
    res["device"] = str(device)
    res["dtype"] = str(dtype).removeprefix("torch.")
    res["threads"] = torch.get_num_threads()
    return res


def run_worker(spec: dict, timeout: float | None) -> dict:
    """One measurement in a fresh process; its failure is recorded, not raised."""
    env = dict(os.environ)
    if spec["device"] == "cpu" and spec.get("kernels") == "triton":
        env["TRITON_INTERPRET"] = "1"  # Triton kernels on CPU run in the interpreter
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"error": f"timed out after {timeout:.0f} s", "stderr_tail": tail}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {
            "error": f"worker exited {proc.returncode}: "
            + (proc.stderr.strip().splitlines() or ["?"])[-1][:300],
            "stderr_tail": proc.stderr[-3000:],
            "process_wall_s": wall,
        }
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    return res


# --- report ------------------------------------------------------------------------------------


def _fmt(v, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def ratios(results: list[dict]) -> dict:
    """Per shape: each variant against `padded` and against `torch-sdpa` (same run)."""
    out: dict = {}
    for shape in dict.fromkeys(r["shape"] for r in results):
        rows = {r["variant"]: r for r in results if r["shape"] == shape and "error" not in r}
        entry = {}
        for base in ("padded", "torch-sdpa"):
            b = rows.get(base)
            if b is None or not b["trained_tokens_per_s"]:
                continue
            for name, r in rows.items():
                if name == base:
                    continue
                entry[f"{name} / {base} trained tokens/s"] = (
                    r["trained_tokens_per_s"] / b["trained_tokens_per_s"]
                )
                entry[f"{name} / {base} tokens/s"] = r["tokens_per_s"] / b["tokens_per_s"]
        out[shape] = entry
    return out


def print_table(results: list[dict], ratio: dict) -> None:
    head = (
        f"{'shape':<10}{'variant':<15}{'tokens/s':>11}{'trained tok/s':>15}{'fill':>7}"
        f"{'MFU':>7}{'peak MB':>9}{'final loss':>11}  kernels/attention used"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['shape']:<10}{r['variant']:<15} FAILED: {r['error']}")
            continue
        mem = r["peak_mem_mb"] if r.get("peak_mem_mb") is not None else r.get("peak_rss_mb")
        used = f"{r.get('kernels_used')}/{r.get('attention_used') or '(compiled)'}"
        print(
            f"{r['shape']:<10}{r['variant']:<15}{r['tokens_per_s']:>11,.0f}"
            f"{r['trained_tokens_per_s']:>15,.0f}{r['fill']:>7.1%}"
            f"{_fmt(r.get('mfu'), '6.1%'):>7}{_fmt(mem, '9.0f'):>9}"
            f"{_fmt(r.get('loss_last_window'), '11.3f'):>11}  {used}"
            + (f"  WARNING: {r['warning']}" if r.get("warning") else "")
        )
    for shape, entry in ratio.items():
        for k, v in entry.items():
            # Against the padded loop: useful (trained) tokens; between product variants,
            # which train the same rows: all tokens.
            if k.endswith("/ padded trained tokens/s") or (
                k.endswith("/ torch-sdpa tokens/s") and not k.startswith("padded")
            ):
                print(f"  {shape}: {k} = {v:.2f}×")
    if any(r.get("peak_mem_mb") is None and "error" not in r for r in results):
        print("  (peak MB on CPU: the process's peak RSS)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="spongebob")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--shapes", nargs="+", default=None, help="BATCHxSEQ (default 4x512 on CPU)")
    ap.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=list(VARIANTS),
        help="default: torch-sdpa padded (CPU); torch-sdpa torch-compile triton-flex padded (CUDA)",
    )
    ap.add_argument("--window", type=int, default=3, help="optimizer steps per logged window")
    ap.add_argument("--windows", type=int, default=2, help="timed windows after the warm-up one")
    ap.add_argument("--corpus-mb", type=float, default=1.0, help="generated chat corpus size")
    ap.add_argument("--vocab", type=int, default=6400, help="tokenizer trained on the corpus")
    ap.add_argument("--data", help="a chat jsonl instead of the generated corpus")
    ap.add_argument("--tokenizer", help="a tokenizer folder instead of training one")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per measurement")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))))
        return 0

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = device.startswith("cuda")
    shapes = args.shapes or (["84x512", "28x1024"] if on_cuda else ["4x512"])
    variants = args.variants or (
        ["torch-sdpa", "torch-compile", "triton-flex", "padded"]
        if on_cuda
        else ["torch-sdpa", "padded"]
    )
    tmp = None
    work = args.work
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_train-")
        work = Path(tmp.name)
    t_prep = time.perf_counter()
    if args.data:
        files = {"data": args.data, "tokenizer": args.tokenizer}
        if args.tokenizer is None:
            ap.error("--data needs --tokenizer")
    else:
        files = prepare_data(work, args.corpus_mb, args.vocab, args.tokenizer)
    prep_s = time.perf_counter() - t_prep

    results = []
    for shape in shapes:
        B, T = (int(x) for x in shape.lower().split("x"))
        for variant in variants:
            print(f"... {shape} {variant}", file=sys.stderr, flush=True)
            spec = {
                "variant": variant,
                "shape": shape,
                "batch": B,
                "seq_len": T,
                "preset": args.preset,
                "device": device,
                "dtype": args.dtype,
                "window": args.window,
                "windows": args.windows,
                "threads": args.threads,
                "run_dir": str(work / f"run-{shape}-{variant}"),
                "cache_dir": str(work / "cache"),
                **files,
                **(VARIANTS[variant] or PADDED_RUNTIME),
            }
            r = {**spec, **run_worker(spec, args.timeout)}
            used = r.get("kernels_used")
            if "error" not in r and variant != "padded" and used and used != spec["kernels"]:
                r["warning"] = f"asked for kernels={spec['kernels']}, the model ran {used}"
            att = r.get("attention_used")
            if "error" not in r and variant != "padded" and att and att != spec["attention"]:
                r["warning"] = (r.get("warning", "") + "; " if r.get("warning") else "") + (
                    f"asked for attention={spec['attention']}, the model ran {att}"
                )
            results.append(r)
    ratio = ratios(results)
    first = next((r for r in results if "error" not in r), {})
    print(
        f"\nbench_train: preset {args.preset} ({first.get('parameters', 0) / 1e6:.2f}M params), "
        f"{device}, {first.get('dtype', '?')}, {first.get('threads', '?')} thread(s), "
        f"window {args.window} steps × {args.windows} timed (+1 warm-up)\n"
    )
    print_table(results, ratio)
    out = {
        "benchmark": "bench_train",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "gpu": torch.cuda.get_device_name(0) if on_cuda else None,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data_prep_s": prep_s,
        "results": results,
        "ratios": ratio,
    }
    path = args.json or HERE / "results" / f"bench_train-{'cuda' if on_cuda else 'cpu'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
