"""Rollout throughput: our engine (`spongebob.generate.Generator`) against transformers'
`generate` on the same model exported with `spongebob.export.export_hf` (LlamaForCausalLM).

    python benchmarks/bench_rollout.py              # demo preset, batch 16, 96 new tokens

Random (seeded) weights, the same 16 chat prompts of different lengths (left-padded with an
attention mask for transformers; ours left-pads itself), sampling at the same temperature and
top-p (top-k off), a fixed number of new tokens with no early stop (ours: `stop_ids=[]`;
transformers: `min_new_tokens = max_new_tokens`), KV cache on both, fp32, `--threads` torch
threads (default 1). Each is warmed up with a short run first; then `--repeats` timed runs
of each, interleaved (ours, transformers, ours, ...) so a change in the machine's load hits
both alike, and tokens/s is the median run's (every run is in the JSON, with the load average
before and after). Sanity: greedy decoding of a few prompts (batched, left-padded) must give
identical tokens. Prints a table and writes JSON with machine info (default
benchmarks/results/bench_rollout-cpu.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_dpo import make_checkpoint, make_tokenizer  # noqa: E402
from machine import machine_info  # noqa: E402


def prompts(tok_dir: Path, n: int, seed: int) -> list[list[int]]:
    """n chat prompts (the template with the default system turn), 20–120 characters each."""
    from corpus import ChineseCorpus
    from spongebob.data import ChatTokenizer

    tok, c = ChatTokenizer.from_dir(str(tok_dir)), ChineseCorpus(seed)
    out = []
    for _ in range(n):
        out.append(list(tok.encode_prompt([{"role": "user", "content": c.paragraph(20, 120)}])))
    return out


def ours(model, batch: list[list[int]], n: int, temperature: float, top_p: float, seed: int):
    from spongebob.generate import Generator, SamplingConfig

    cfg = SamplingConfig(
        max_new_tokens=n, temperature=temperature, top_p=top_p, top_k=0, seed=seed, stop_ids=[]
    )
    return [g.ids for g in Generator(model).generate(batch, cfg)]


def hf(model, batch: list[list[int]], n: int, temperature: float, top_p: float, seed: int):
    import torch

    L = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in batch])
    torch.manual_seed(seed)
    kw = {"do_sample": False}
    if temperature > 0:
        kw = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            use_cache=True,
            pad_token_id=0,
            **kw,
        )
    return out[:, L:].tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--check-prompts", type=int, default=4, help="greedy sanity: prompts")
    ap.add_argument("--check-tokens", type=int, default=24, help="greedy sanity: new tokens")
    ap.add_argument("--vocab", type=int, default=6400)
    ap.add_argument("--corpus-mb", type=float, default=0.5, help="tokenizer training corpus")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    import torch
    from transformers import LlamaForCausalLM

    from spongebob.checkpoint import load
    from spongebob.export import export_hf

    torch.set_num_threads(args.threads)
    tmp = None
    work = args.work
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_rollout-")
        work = Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = make_tokenizer(work, args.corpus_mb, args.vocab)
    ckpt = make_checkpoint(work / f"ckpt-{args.preset}", tok_dir, args.preset, args.seed, 1024)
    hf_dir = work / f"hf-{args.preset}"
    if not hf_dir.is_dir():
        export_hf(ckpt, hf_dir)
    model = load(ckpt, "cpu", kernels="torch").model.eval()
    ref = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    batch = prompts(tok_dir, args.batch, args.seed + 1)

    # Sanity: the same greedy tokens (a batch of a few prompts of different lengths).
    few = batch[: args.check_prompts]
    a = ours(model, few, args.check_tokens, 0.0, 1.0, 0)
    b = hf(ref, few, args.check_tokens, 0.0, 1.0, 0)
    match = a == b
    first_diff = None
    if not match:
        first_diff = next(
            (r, next(i for i, (x, y) in enumerate(zip(ra, rb, strict=False)) if x != y))
            for r, (ra, rb) in enumerate(zip(a, b, strict=True))
            if ra != rb
        )

    engines = (("spongebob", ours, model), ("transformers", hf, ref))
    for _, fn, m in engines:
        fn(m, batch, 8, args.temperature, args.top_p, args.seed)  # warm-up
    runs: dict[str, list[float]] = {name: [] for name, _, _ in engines}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for name, fn, m in engines:
            t0 = time.perf_counter()
            out = fn(m, batch, args.new_tokens, args.temperature, args.top_p, args.seed)
            runs[name].append(time.perf_counter() - t0)
            n = sum(len(r) for r in out)
            if n != args.batch * args.new_tokens:
                raise SystemExit(f"{name} generated {n} tokens, not {args.batch * args.new_tokens}")
    load_after = os.getloadavg()
    results = {}
    for name, secs in runs.items():
        seconds = statistics.median(secs)
        n = args.batch * args.new_tokens
        results[name] = {
            "new_tokens": n,
            "seconds": seconds,
            "tokens_per_s": n / seconds,
            "ms_per_step": 1e3 * seconds / args.new_tokens,
            "runs_s": secs,
            "tokens_per_s_best": n / min(secs),
        }
    ratio = results["spongebob"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
    lens = [len(p) for p in batch]
    print(
        f"\nbench_rollout: preset {args.preset} ({model.num_parameters() / 1e6:.2f}M params, "
        f"random weights), cpu, fp32, {torch.get_num_threads()} thread(s), batch {args.batch}, "
        f"prompts {min(lens)}–{max(lens)} tokens, {args.new_tokens} new tokens, sampling "
        f"T={args.temperature:g} top-p {args.top_p:g}\n"
    )
    print(f"{'engine':<14}{'tokens/s':>10}{'ms/step':>9}{'seconds':>9}  runs s ({args.repeats})")
    for k, r in results.items():
        print(
            f"{k:<14}{r['tokens_per_s']:>10.1f}{r['ms_per_step']:>9.1f}{r['seconds']:>9.2f}  "
            + " ".join(f"{x:.2f}" for x in r["runs_s"])
        )
    print(f"spongebob / transformers tokens/s: {ratio:.2f}× (medians; target ≥ 2×: "
          f"{'met' if ratio >= 2 else 'NOT met'}); load average {load_before[0]:.2f} → "
          f"{load_after[0]:.2f}")  # fmt: skip
    print(
        f"sanity: greedy, {len(few)} prompts × {args.check_tokens} tokens: "
        + ("identical" if match else f"DIFFER (row, token) {first_diff}")
    )
    out = {
        "benchmark": "bench_rollout",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(("torch", "transformers", "spongebob")),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": model.num_parameters(),
        "prompt_tokens": lens,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "results": results,
        "spongebob_over_transformers": ratio,
        "target_2x_met": ratio >= 2,
        "sanity": {
            "prompts": len(few),
            "tokens": args.check_tokens,
            "match": match,
            "first_difference": first_diff,
        },
    }
    path = args.json or HERE / "results" / "bench_rollout-cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0 if match else 1


if __name__ == "__main__":
    sys.exit(main())
