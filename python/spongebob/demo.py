"""`spongebob demo`: the whole path on generated data, on a CPU, in minutes.

data → tokenizer → pretrain → SFT → long SFT → distill, with an evaluation after every stage
and sample chats at the end. The point is proof, not a good model: the scorecard shows what
each stage taught (facts after SFT, the reasoning format after distillation) on held-out
wordings and unseen numbers from `eval.jsonl`.

The stage settings below are presets as data, sized for a 2-core machine; `--fast` is the
reduced run the CI test uses.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Which demo file each stage trains on.
STAGE_DATA = {
    "pretrain": "pretrain",
    "sft": "sft_512",
    "sft-long": "sft_1024",
    "distill": "r1_1024",
}


@dataclass(frozen=True)
class DemoStage:
    """Overrides of the stage preset for the CPU demo."""

    seq_len: int
    batch_size: int
    lr: float
    epochs: int = 1
    max_steps: int | None = None
    warmup: int = 0


@dataclass(frozen=True)
class DemoPlan:
    scale: float
    vocab_size: int
    preset: str
    stages: dict[str, DemoStage]
    eval_limit: int | None = None  # eval records scored per stage (None = all)
    max_new_tokens: int = 96


PLANS: dict[str, DemoPlan] = {
    "full": DemoPlan(
        scale=1.0,
        vocab_size=2048,
        preset="demo",
        stages={
            "pretrain": DemoStage(seq_len=256, batch_size=16, lr=3e-3, epochs=2, warmup=20),
            "sft": DemoStage(seq_len=256, batch_size=16, lr=2e-3, epochs=2, warmup=10),
            "sft-long": DemoStage(seq_len=512, batch_size=8, lr=3e-4, max_steps=20),
            "distill": DemoStage(seq_len=512, batch_size=8, lr=1e-3, epochs=3, warmup=10),
        },
    ),
    "fast": DemoPlan(
        scale=0.1,
        vocab_size=1024,
        preset="tiny",
        stages={
            "pretrain": DemoStage(seq_len=128, batch_size=8, lr=3e-3, max_steps=30),
            "sft": DemoStage(seq_len=128, batch_size=8, lr=2e-3, max_steps=40),
            "sft-long": DemoStage(seq_len=256, batch_size=4, lr=5e-4, max_steps=5),
            "distill": DemoStage(seq_len=256, batch_size=8, lr=3e-3, max_steps=300, warmup=10),
        },
        max_new_tokens=64,
    ),
}


@dataclass
class StageScore:
    stage: str
    steps: int = 0
    wall_s: float = 0.0
    tokens_per_s: float | None = None
    final_loss: float | None = None
    perplexity: float | None = None
    fact_accuracy: float | None = None
    reasoning_format: float | None = None
    arithmetic_accuracy: float | None = None
    tool_use: float | None = None  # chatml demo: the reply calls calc correctly
    checkpoint: str | None = None
    init: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _metrics(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _score(model, tok, eval_file: Path, plan: DemoPlan) -> dict:
    from spongebob.evaluate import evaluate
    from spongebob.generate import SamplingConfig

    cfg = SamplingConfig(max_new_tokens=plan.max_new_tokens, temperature=0.0)
    result = evaluate(model, tok, [eval_file], cfg, limit=plan.eval_limit)
    entry = next(iter(result["files"].values()))
    by_task = entry.get("answers", {}).get("summary", {}).get("by_task", {})

    def get(task: str, key: str) -> float | None:
        return by_task.get(task, {}).get(key)

    ppl = entry.get("perplexity")
    return {
        "perplexity": ppl.get("ppl") if isinstance(ppl, dict) else ppl,
        "fact_accuracy": get("fact", "contains"),
        "reasoning_format": get("arith", "well_formed"),
        "arithmetic_accuracy": get("arith", "contains"),
        "tool_use": get("tool", "contains"),
        "by_task": by_task,
    }


def _samples(pretrained, model, tok, plan: DemoPlan) -> list[dict]:
    """One sample per chat mode (greedy, so the report is reproducible): raw continuation by
    the pretrained model, chat and reasoning by the final one."""
    from spongebob.generate import Generator, SamplingConfig, parse_reasoning
    from spongebob.tools import CALC_SCHEMA

    cfg = SamplingConfig(max_new_tokens=plan.max_new_tokens, temperature=0.0)
    chatml = tok.template == "chatml"
    out = []
    raw = "法国的首都是"
    ids = [int(i) for i in tok.encode_document(raw)][:-1]  # <s> + text, no </s>
    text = Generator(pretrained, tok).generate([ids], cfg)[0].text
    out.append({"mode": "pretrain", "prompt": raw, "reply": text})
    gen = Generator(model, tok)
    prompts = [
        ("chat", "你是谁？"),
        ("chat", "日本的首都是哪里？"),
        ("reason", "小明有12个苹果，又买了7个，现在一共有几个？"),
    ]
    if chatml:
        prompts.append(("tool", "请用计算器算一下 23×47。"))
    for mode, q in prompts:
        msgs = [{"role": "user", "content": q}]
        opened = chatml and mode == "reason"  # chatml reasons inside an open think block
        kw = {"tools": [CALC_SCHEMA]} if mode == "tool" else {}
        ids = [int(i) for i in tok.encode_prompt(msgs, thinking=opened, **kw)]
        text = gen.generate([ids], cfg)[0].text
        rec: dict[str, Any] = {"mode": mode, "prompt": q, "reply": text}
        if mode == "reason":
            r = parse_reasoning(text, tok.template, opened)
            rec.update(think=r.think, answer=r.answer, well_formed=r.well_formed)
        out.append(rec)
    return out


def run_demo(
    out: Path, plan_name: str = "full", seed: int = 0, template: str = "minimind2"
) -> dict:
    """Run every stage into `out` and return the scorecard (also written as JSON + report).
    `template="chatml"`: the same path on the ChatML family (MiniMind-3's format), with the
    calculator tool-use task added to the data and the scorecard."""
    import torch

    from spongebob import checkpoint, demo_data
    from spongebob.config import stage_config
    from spongebob.tokenizer import load as load_tokenizer
    from spongebob.tokenizer import train_tokenizer
    from spongebob.train import train

    plan = PLANS[plan_name]
    out = Path(out)
    # The demo is one fresh run: a second `spongebob demo` replaces the first one's outputs.
    for old in ("run", "cache"):
        shutil.rmtree(out / old, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    files = demo_data.generate(out / "data", seed=seed, scale=plan.scale, template=template)
    log(f"generated demo data in {time.perf_counter() - t0:.1f}s: {out / 'data'}")

    t0 = time.perf_counter()
    tok_dir = out / "tokenizer"
    train_files = [files[n] for n in ("pretrain", "sft_512", "sft_1024", "r1_1024")]
    train_tokenizer(
        train_files, tok_dir, vocab_size=plan.vocab_size, show_progress=False, template=template
    )
    tok = load_tokenizer(tok_dir)
    tok_s = time.perf_counter() - t0

    run = out / "run"
    scores: list[StageScore] = []
    untrained = None
    for stage, settings in plan.stages.items():
        t0 = time.perf_counter()
        cfg = stage_config(
            stage,
            data=[str(files[STAGE_DATA[stage]])],
            out=str(run),
            tokenizer=str(tok_dir),
            preset=plan.preset,
            device="cpu",
            dtype="fp32",
            kernels="torch",
            seed=seed,
            accum=1,
            save_every=10**9,
            keep=1,
            cache_dir=str(out / "cache"),
            progress=False,
            log_every=5,
            init="none" if stage == "pretrain" else None,
            **asdict(settings),
        )
        if untrained is None:
            # The untrained model's score is the floor every stage is compared with.
            from spongebob.model import SpongeBob, preset

            torch.manual_seed(seed)
            model0 = SpongeBob(preset(plan.preset, vocab_size=tok.vocab_size)).eval()
            untrained = _score(model0, tok, files["eval"], plan)
            log(f"untrained model: {untrained_summary(untrained)}")
        log(f"stage {stage}: {STAGE_DATA[stage]}.jsonl, {settings}")
        result = train(cfg)
        wall = time.perf_counter() - t0
        stage_dir = run / stage
        recs = [r for r in _metrics(stage_dir) if r.get("loss") is not None]
        toks = [r["tokens_per_s"] for r in recs if r.get("tokens_per_s")]
        loaded = checkpoint.load(result.final, "cpu", kernels="torch")
        model, meta = loaded.model, loaded.meta
        if stage == "pretrain":
            pretrained = model
        s = _score(model, tok, files["eval"], plan)
        score = StageScore(
            stage=stage,
            steps=result.step,
            wall_s=round(wall, 1),
            tokens_per_s=round(sum(toks) / len(toks), 1) if toks else None,
            final_loss=result.loss,
            perplexity=s["perplexity"],
            fact_accuracy=s["fact_accuracy"],
            reasoning_format=s["reasoning_format"],
            arithmetic_accuracy=s["arithmetic_accuracy"],
            tool_use=s["tool_use"],
            checkpoint=str(result.final),
            init=meta.get("init"),
            extra={"by_task": s["by_task"]},
        )
        scores.append(score)
        log(f"stage {stage} done in {wall:.0f}s: {untrained_summary(s)}")
    samples = _samples(pretrained, model, tok, plan)
    card = {
        "plan": plan_name,
        "template": template,
        "seed": seed,
        "wall_s": round(time.perf_counter() - t_all, 1),
        "tokenizer": {"vocab_size": tok.vocab_size, "wall_s": round(tok_s, 1)},
        "untrained": {k: v for k, v in untrained.items() if k != "by_task"},
        "stages": [asdict(s) for s in scores],
        "samples": samples,
    }
    (out / "scorecard.json").write_text(json.dumps(card, ensure_ascii=False, indent=2) + "\n")
    write_report(out, card, run)
    return card


def untrained_summary(s: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    ppl = s.get("perplexity")
    tool = "" if s.get("tool_use") is None else f", tool use {pct(s['tool_use'])}"
    return (f"ppl {ppl:.1f} " if isinstance(ppl, (int, float)) else "") + (
        f"facts {pct(s.get('fact_accuracy'))}, reasoning format {pct(s.get('reasoning_format'))}, "
        f"arithmetic {pct(s.get('arithmetic_accuracy'))}{tool}"
    )


def format_scorecard(card: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def num(x, f="{:.3f}"):
        return "-" if x is None else f.format(x)

    tools = any(s.get("tool_use") is not None for s in card["stages"])
    head = (
        "| stage | steps | wall s | tokens/s | final loss | eval ppl | facts | "
        "reasoning format | arithmetic |" + (" tool use |" if tools else "")
    )
    lines = [head, "|" + "---|" * (10 if tools else 9)]

    def tool(x) -> str:
        return f" {pct(x.get('tool_use'))} |" if tools else ""

    u = card["untrained"]
    lines.append(
        f"| (untrained) | 0 | - | - | - | {num(u['perplexity'], '{:.1f}')} | "
        f"{pct(u['fact_accuracy'])} | {pct(u['reasoning_format'])} | "
        f"{pct(u['arithmetic_accuracy'])} |" + tool(u)
    )
    for s in card["stages"]:
        lines.append(
            f"| {s['stage']} | {s['steps']} | {s['wall_s']:.0f} | "
            f"{num(s['tokens_per_s'], '{:.0f}')} | {num(s['final_loss'])} | "
            f"{num(s['perplexity'], '{:.1f}')} | "
            f"{pct(s['fact_accuracy'])} | {pct(s['reasoning_format'])} | "
            f"{pct(s['arithmetic_accuracy'])} |" + tool(s)
        )
    return "\n".join(lines)


def write_report(out: Path, card: dict, run: Path) -> None:
    """report.md with the scorecard, loss curves (PNG) and the sample chats."""
    parts = ["# SpongeBob demo report", "", format_scorecard(card), ""]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for s in card["stages"]:
            recs = [r for r in _metrics(run / s["stage"]) if r.get("loss") is not None]
            if not recs:
                continue
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.set_title(f"{s['stage']} loss")
            fig.tight_layout()
            png = out / f"loss_{s['stage']}.png"
            fig.savefig(png, dpi=100)
            plt.close(fig)
            parts.append(f"![{s['stage']} loss]({png.name})")
        parts.append("")
    except ImportError:
        parts.append("(matplotlib is not installed: no loss curves)\n")
    parts.append("## Samples (greedy; pretrain mode by the pretrained model, the rest final)\n")
    for smp in card["samples"]:
        parts.append(f"**{smp['mode']}** — {smp['prompt']}\n")
        parts.append("```\n" + smp["reply"] + "\n```\n")
    (out / "report.md").write_text("\n".join(parts), encoding="utf-8")


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on generated demo data (CPU, minutes)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR")
    p.add_argument(
        "--plan",
        choices=sorted(PLANS),
        default="full",
        help="full: the README demo; fast: the reduced CI run",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--template",
        choices=["minimind2", "chatml"],
        default="minimind2",
        help="chat template family of the whole run (chatml adds calculator tool use)",
    )
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    card = run_demo(args.out, args.plan, args.seed, args.template)
    print(format_scorecard(card))
    print(
        f"\ntotal {card['wall_s']:.0f}s; scorecard: {args.out / 'scorecard.json'}, "
        f"report: {args.out / 'report.md'}"
    )
    for smp in card["samples"]:
        print(f"\n[{smp['mode']}] {smp['prompt']}\n{smp['reply']}")
    return 0
