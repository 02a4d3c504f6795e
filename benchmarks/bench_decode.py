"""Decoding throughput: the KV cache (`spongebob.generate.Generator`) against recomputing the
whole sequence for every new token (the tutorial's way: a full forward over prompt + tokens so
far, argmax of the last position's logits).

    python benchmarks/bench_decode.py                       # spongebob preset, 512 new tokens
    python benchmarks/bench_decode.py --device cuda --dtype bf16

Random weights (seeded; speed does not depend on them), greedy decoding, batch 1, a random
prompt of `--prompt-len` tokens, no stop token, so both produce exactly `--new-tokens` tokens.
As a sanity check both decoders first generate `--check-tokens` tokens from the same prompt
and must agree token for token. Each timing is preceded by an untimed warm-up of 8 tokens.
Reported: new tokens per second of each and their ratio, the time of the first and the last
few tokens of the recompute run (it slows down as the sequence grows; the cached one does not).
Prints a table and writes JSON with machine info (default
benchmarks/results/bench_decode-<device>.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import machine_info  # noqa: E402


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_cached(model, prompt: list[int], n: int) -> list[int]:
    """The product's decoder: prompt once, then one token per step through the KV cache."""
    from spongebob.generate import Generator, SamplingConfig

    cfg = SamplingConfig(max_new_tokens=n, temperature=0.0, stop_ids=[-1])
    return Generator(model).generate([prompt], cfg)[0].ids


def decode_recompute(model, prompt: list[int], n: int, times: list | None = None) -> list[int]:
    """The tutorial's decoder: a full forward (all positions' logits) per new token."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        for _ in range(n):
            t0 = time.perf_counter() if times is not None else 0.0
            logits = model(ids)[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            if times is not None:
                _sync(device)
                times.append(time.perf_counter() - t0)
    return ids[0, len(prompt) :].tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="spongebob")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="weights (fp32 = chat's default)"
    )
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--check-tokens", type=int, default=64, help="tokens compared for equality")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from spongebob.model import PRESETS, SpongeBob

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = PRESETS[args.preset]
    cfg = replace(cfg, max_seq_len=max(cfg.max_seq_len, args.prompt_len + args.new_tokens + 1))
    torch.manual_seed(args.seed)
    model = SpongeBob(cfg).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(7, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()

    # Sanity: same greedy tokens from both decoders.
    check = min(args.check_tokens, args.new_tokens)
    a = decode_cached(model, prompt, check)
    b = decode_recompute(model, prompt, check)
    first_diff = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
    match = first_diff is None and len(a) == len(b) == check

    results = {}
    for name_, fn in (("kv_cache", decode_cached), ("recompute", decode_recompute)):
        fn(model, prompt, 8)  # warm-up
        times: list[float] = []
        _sync(device)
        t0 = time.perf_counter()
        if fn is decode_recompute:
            out = fn(model, prompt, args.new_tokens, times)
        else:
            out = fn(model, prompt, args.new_tokens)
        _sync(device)
        seconds = time.perf_counter() - t0
        results[name_] = {
            "new_tokens": len(out),
            "seconds": seconds,
            "tokens_per_s": len(out) / seconds,
            "ms_per_token": 1e3 * seconds / len(out),
        }
        if times:
            k = min(16, len(times))
            results[name_]["first_tokens_ms"] = 1e3 * sum(times[:k]) / k
            results[name_]["last_tokens_ms"] = 1e3 * sum(times[-k:]) / k
    ratio = results["kv_cache"]["tokens_per_s"] / results["recompute"]["tokens_per_s"]

    print(
        f"\nbench_decode: preset {args.preset} ({model.num_parameters() / 1e6:.2f}M params, random "
        f"weights), {device}, {args.dtype}, {torch.get_num_threads()} thread(s), prompt "
        f"{args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, batch 1\n"
    )
    print(f"{'decoder':<12}{'tokens/s':>10}{'ms/token':>10}{'seconds':>9}")
    for k, r in results.items():
        print(f"{k:<12}{r['tokens_per_s']:>10.1f}{r['ms_per_token']:>10.2f}{r['seconds']:>9.1f}")
    rc = results["recompute"]
    print(
        f"recompute: {rc['first_tokens_ms']:.1f} ms/token for the first 16 tokens, "
        f"{rc['last_tokens_ms']:.1f} ms for the last 16"
    )
    print(f"KV cache / recompute tokens/s: {ratio:.2f}×")
    print(
        f"sanity: the first {check} greedy tokens "
        + ("match" if match else f"DIFFER (first difference at token {first_diff})")
    )
    out = {
        "benchmark": "bench_decode",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": str(device),
        "threads": torch.get_num_threads(),
        "parameters": model.num_parameters(),
        "results": results,
        "kv_cache_over_recompute": ratio,
        "sanity": {"tokens": check, "match": match, "first_difference": first_diff},
    }
    path = args.json or HERE / "results" / f"bench_decode-{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0 if match else 1


if __name__ == "__main__":
    sys.exit(main())
