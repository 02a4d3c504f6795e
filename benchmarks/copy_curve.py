"""When does the demo model learn to copy a value out of its context? A score-vs-steps curve.

    python benchmarks/copy_curve.py                        # 1000 steps, a probe every 100
    python benchmarks/copy_curve.py --steps 300 --every 50 --scale 2

Recall ("what number did I tell you?") and arithmetic on unseen numbers both need the model to
copy a value it has just read; the demo's scorecard showed neither. This pretrains the demo
preset on the demo's own pretraining mix (`demo_data`: encyclopedia text, worked problems,
profiles with questions on them, everyday sentences; `--scale` × the demo's record count,
generated with its own seed), with the demo's batch shape and learning rate, saves a checkpoint
every `--every` steps, and asks each one about profiles built from held-out names and numbers
that no training document contains:

    "<name>的小档案：<name>住在<city>。<name>最喜欢的数字是<number>。问：<name>住在哪里？答："

A reply counts when it starts with the stated city (resp. number); cities are capitals, which
the model also knows as facts, so a constant guess scores about 1 in 30. The learning rate
follows the stage's cosine schedule over `--steps`, so a checkpoint at step k is not the same
model as a `--steps k` run's final one. Writes JSON (default benchmarks/results/copy_curve.json)
with the machine.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import machine_info  # noqa: E402


def probes(n: int, seed: int = 7) -> list[tuple[str, str, str]]:
    """(prompt, expected reply start, kind) on held-out names and numbers."""
    from spongebob import demo_data

    rng = random.Random(seed)
    names = demo_data.recall_values("name", True)
    numbers = demo_data.recall_values("number", True)
    cities = [f.answer for f in demo_data.FACTS if f.kind == "capital"]
    out = []
    for _ in range(n):
        name, city, number = rng.choice(names), rng.choice(cities), rng.choice(numbers)
        ctx = f"{name}的小档案：{name}住在{city}。{name}最喜欢的数字是{number}。"
        out.append((ctx + f"问：{name}住在哪里？答：", city, "city"))
        out.append((ctx + f"问：{name}最喜欢的数字是多少？答：", number, "number"))
    return out


def score(ckpt: Path, tok, items: list[tuple[str, str, str]]) -> dict:
    from spongebob import checkpoint
    from spongebob.generate import Generator, SamplingConfig

    model = checkpoint.load(ckpt, "cpu", kernels="torch").model.eval()
    ids = [[int(i) for i in tok.encode_document(p)][:-1] for p, _, _ in items]  # no </s>
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    replies = [r.text for r in Generator(model, tok).generate(ids, greedy)]
    out: dict = {}
    for kind in ("city", "number"):
        hits = [r.startswith(a) for (_, a, k), r in zip(items, replies, strict=True) if k == kind]
        out[kind] = round(sum(hits) / len(hits), 4)
    out["examples"] = replies[:4]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--scale", type=float, default=6.0, help="× the demo's pretraining records")
    ap.add_argument("--probes", type=int, default=40, help="profiles asked (two questions each)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--work", type=Path, default=Path("runs/copy_curve"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "copy_curve.json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from spongebob import demo_data
    from spongebob.checkpoint import list_step_checkpoints
    from spongebob.config import stage_config
    from spongebob.demo import PLANS
    from spongebob.tokenizer import load as load_tokenizer
    from spongebob.tokenizer import train_tokenizer
    from spongebob.train import train

    plan = PLANS["full"]
    stage = plan.stages["pretrain"]
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "pretrain.jsonl"
    gen = demo_data._Gen(random.Random(1), demo_data.all_pairs())
    n_docs = round(demo_data.SIZES["pretrain"] * args.scale)
    with data.open("w", encoding="utf-8") as f:
        for _ in range(n_docs):
            f.write(json.dumps(gen.pretrain(), ensure_ascii=False) + "\n")
    tok_dir = args.work / "tokenizer"
    train_tokenizer([data], tok_dir, vocab_size=plan.vocab_size, show_progress=False)
    tok = load_tokenizer(tok_dir)
    cfg = stage_config(
        "pretrain",
        data=[str(data)],
        out=str(args.work / "run"),
        tokenizer=str(tok_dir),
        preset=plan.preset,
        device="cpu",
        dtype="fp32",
        kernels="torch",
        seed=0,
        accum=1,
        init="none",
        seq_len=stage.seq_len,
        batch_size=stage.batch_size,
        lr=stage.lr,
        warmup=stage.warmup,
        epochs=100,
        max_steps=args.steps,
        save_every=args.every,
        keep=0,
        cache_dir=str(args.work / "cache"),
        progress=False,
        log_every=20,
    )
    t0 = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - t0
    items = probes(args.probes)
    rows = []
    for step, ckpt in list_step_checkpoints(args.work / "run" / "pretrain" / "checkpoints"):
        if step < result.step:  # the last one is `final`, scored below
            rows.append({"step": step, **score(ckpt, tok, items)})
            print(rows[-1], flush=True)
    rows.append({"step": result.step, **score(result.final, tok, items)})
    print(rows[-1], flush=True)
    report = {
        "what": "copy probe vs pretraining steps (demo preset, demo pretraining mix)",
        "command": " ".join(sys.argv),
        "docs": n_docs,
        "tokens_per_step": stage.seq_len * stage.batch_size,
        "train_s": round(train_s, 1),
        "threads": args.threads,
        "probes_per_kind": args.probes,
        "curve": rows,
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    print("| step | city | number |\n|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['city']:.0%} | {r['number']:.0%} |")


if __name__ == "__main__":
    main()
