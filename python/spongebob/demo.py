"""`spongebob demo`: the whole path on generated data, on a CPU, in minutes.

data → tokenizer → pretrain → SFT → long SFT → distill → DPO → GRPO, with an evaluation after
every stage (the chatml demo stops after distill: GRPO's built-in rewards read `<answer>` tags,
which a chatml reply does not have).
The point is proof: the scorecard shows what each stage taught, on held-out items of
`eval.jsonl` (facts and identity in unseen wording families and as new pairings, arithmetic on
unseen number pairs and stories, multi-turn recall of held-out names and numbers), each score
next to the previous stage's; report.md shows the first eval items of every task, right or
wrong, and eval_<stage>.json every reply.

The stage settings below are presets as data, sized for a 2-core machine; `--plan fast` is the
reduced run the CI test uses.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from spongebob.errors import UserError

# Which demo file each stage trains on.
STAGE_DATA = {
    "pretrain": "pretrain",
    "sft": "sft_512",
    "sft-long": "sft_1024",
    "distill": "r1_1024",
    "dpo": "dpo",
    "grpo": "grpo",
}
POST_TRAINING = ("dpo", "grpo")  # minimind2 demo only (module docstring)


@dataclass(frozen=True)
class DemoStage:
    """Overrides of the stage preset for the CPU demo."""

    seq_len: int
    batch_size: int
    lr: float
    epochs: int = 1
    max_steps: int | None = None
    warmup: int = 0
    dpo_beta: float | None = None
    dpo_sft_weight: float | None = None
    grpo_group: int | None = None
    grpo_max_new_tokens: int | None = None
    eval_file: str | None = None  # a demo file the stage validates on
    # torch.compile fuses the element-wise ops between the matmuls; each new batch shape costs
    # ~20 s of compilation on 2 cores, so only the long stages with fixed shapes use it.
    compile: bool = False


@dataclass(frozen=True)
class DemoPlan:
    scale: float
    vocab_size: int
    preset: str
    stages: dict[str, DemoStage]
    eval_limit: int | None = None  # eval records scored per stage (None = all)
    # bf16 autocast where the CPU multiplies bf16 in hardware (`cpu_has_native_bf16`): pretraining
    # ran 1.6x as fast as fp32 with torch.compile on this project's 2-core test machine.
    cpu_bf16: bool = False
    max_new_tokens: int = 160  # the longest trace (8 × 9) is ~110 tokens
    # Facts, identity and recall: their longest right reply (reasoning format and sign-off) is
    # ~70 tokens, and a base model that never stops would run every batch to the cap.
    short_reply_tokens: int = 96


PLANS: dict[str, DemoPlan] = {
    "full": DemoPlan(
        scale=1.0,
        vocab_size=2048,
        preset="demo",
        cpu_bf16=True,
        stages={
            "pretrain": DemoStage(
                seq_len=256, batch_size=16, lr=3e-3, epochs=2, warmup=20, compile=True
            ),
            "sft": DemoStage(
                seq_len=256, batch_size=16, lr=2e-3, epochs=2, warmup=10, compile=True
            ),
            # Two epochs: recall copies a value across a list answer; from two SFT checkpoints,
            # one epoch left it at 16.7 and 20.0 %, two reached 40.0 and 60.0 % (README: recall).
            "sft-long": DemoStage(seq_len=1024, batch_size=4, lr=3e-4, epochs=2, warmup=10),
            # Rows of 256 as in pretraining and SFT: every reasoning record is under 200 tokens,
            # so the rows hold the same records, the compiled graph is reused and attention is
            # half as long (165 s against 209 s for 2 epochs here).
            "distill": DemoStage(
                seq_len=256, batch_size=16, lr=1e-3, epochs=2, warmup=10, compile=True
            ),
            "dpo": DemoStage(
                seq_len=256,
                batch_size=8,
                lr=1e-4,
                epochs=2,
                warmup=5,
                dpo_beta=0.1,
                dpo_sft_weight=1.0,
                eval_file="dpo_eval",
            ),
            "grpo": DemoStage(
                seq_len=512,
                batch_size=4,
                lr=5e-5,
                max_steps=20,
                grpo_group=8,
                grpo_max_new_tokens=160,
            ),
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
            "dpo": DemoStage(
                seq_len=256,
                batch_size=4,
                lr=1e-4,
                max_steps=10,
                dpo_beta=0.1,
                dpo_sft_weight=1.0,
                eval_file="dpo_eval",
            ),
            "grpo": DemoStage(
                seq_len=256,
                batch_size=2,
                lr=5e-5,
                max_steps=2,
                grpo_group=4,
                grpo_max_new_tokens=64,
            ),
        },
        max_new_tokens=128,
    ),
}


# Scorecard columns: (StageScore field, eval task, split, heading). A split of None reads the
# task as a whole. Generalisation is scored on wording families no training file contains.
COLUMNS = [
    ("fact_accuracy", "fact", "unseen_family", "facts"),
    ("fact_new_pairing", "fact", "new_pairing", "facts (new pairing)"),
    ("identity", "identity", None, "identity"),
    ("reasoning_format", "arith", None, "reasoning format"),
    ("arithmetic_accuracy", "arith", "unseen_family", "arithmetic"),
    ("recall", "recall", "unseen_family", "recall"),
    ("tool_use", "tool", None, "tool use"),
    ("preference", "dpo", None, "prefers chosen"),
    ("sign_off", "dpo", None, "sign-off"),
]
SAMPLES_PER_TASK = 3  # report.md shows the first N eval items of each task, right or wrong


@dataclass
class StageScore:
    stage: str
    steps: int = 0
    wall_s: float = 0.0
    eval_s: float = 0.0
    tokens_per_s: float | None = None
    final_loss: float | None = None
    perplexity: float | None = None
    fact_accuracy: float | None = None  # unseen wording families
    fact_new_pairing: float | None = None  # a known wording with a fact it never asked
    identity: float | None = None
    reasoning_format: float | None = None
    arithmetic_accuracy: float | None = None  # unseen number pairs in unseen stories
    recall: float | None = None  # multi-turn: a later turn needs an earlier one
    tool_use: float | None = None  # chatml demo: the reply calls calc correctly
    preference: float | None = None  # held-out DPO pairs: log p(chosen) > log p(rejected)
    sign_off: float | None = None  # fact replies (unseen family) that end with the DPO style
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


def _stage_metrics(stage_dir: Path) -> dict:
    """The post-training stages' own numbers: the last validation record (DPO: reward
    accuracy and margin on the held-out pairs) and each logged step's mean rollout reward
    (GRPO)."""
    recs = _metrics(stage_dir)
    out: dict[str, Any] = {}
    evals = [r for r in recs if any(k.startswith("eval_") for k in r)]
    if evals:
        out["validation"] = {k: v for k, v in evals[-1].items() if k.startswith("eval_")}
    rewards = [r["reward_mean"] for r in recs if r.get("reward_mean") is not None]
    if rewards:
        out["reward_mean_by_step"] = [round(x, 4) for x in rewards]
    return out


def _score(model, tok, eval_file: Path, plan: DemoPlan, pairs_file: Path | None = None) -> dict:
    """Every scorecard column of one model, plus its eval rows (each reply, scored). With
    `pairs_file`, also the preference columns of the held-out DPO pairs."""
    from spongebob.evaluate import evaluate
    from spongebob.generate import SamplingConfig

    cfg = SamplingConfig(max_new_tokens=plan.max_new_tokens, temperature=0.0)
    short = dict.fromkeys(("fact", "identity", "recall"), plan.short_reply_tokens)
    result = evaluate(model, tok, [eval_file], cfg, limit=plan.eval_limit, task_tokens=short)
    entry = next(iter(result["files"].values()))
    summary = entry.get("answers", {}).get("summary", {})
    by_task, by_split = summary.get("by_task", {}), summary.get("by_split", {})

    def get(task: str, split: str | None, key: str) -> float | None:
        scores = by_task.get(task, {}) if split is None else by_split.get(task, {}).get(split, {})
        return scores.get(key)

    ppl = entry.get("perplexity")
    out: dict[str, Any] = {"perplexity": ppl.get("ppl") if isinstance(ppl, dict) else ppl}
    for name, task, split, _ in COLUMNS:
        if task != "dpo":
            out[name] = get(
                task, split, "well_formed" if name == "reasoning_format" else "contains"
            )
    out["by_task"], out["by_split"] = by_task, by_split
    out["rows"] = entry.get("answers", {}).get("rows", [])
    if pairs_file is not None:
        from spongebob.demo_data import SIGN_OFF

        out["preference"] = _preference(model, tok, pairs_file)
        facts = [
            r for r in out["rows"] if r["task"] == "fact" and r.get("split") == "unseen_family"
        ]
        signed = [any(v in r["reply"] for v in SIGN_OFF.values()) for r in facts]
        out["sign_off"] = sum(signed) / len(signed) if signed else None
    return out


def _preference(model, tok, pairs_file: Path) -> float:
    """The share of held-out pairs whose chosen reply the model itself gives more probability
    (summed over the reply's trained tokens, as DPO scores them): reference-free, so every
    stage's row is comparable; DPO's own reward accuracy (against its starting model) is in
    the dpo stage's metrics.jsonl."""
    import torch

    from spongebob.dpo import PairReader, collate_pairs, sequence_logps

    pairs = list(PairReader([pairs_file], tok))
    wins = 0
    with torch.no_grad():
        for i in range(0, len(pairs), 16):
            b = collate_pairs(pairs[i : i + 16])
            chosen, rejected = sequence_logps(model, b["input_ids"], b["labels"]).chunk(2)
            wins += int((chosen > rejected).sum())
    return wins / len(pairs)


def _continuation(pretrained, tok, plan: DemoPlan) -> dict:
    """The pretrained model continuing raw text (greedy): what pretraining alone teaches."""
    from spongebob.generate import Generator, SamplingConfig

    cfg = SamplingConfig(max_new_tokens=plan.max_new_tokens, temperature=0.0)
    raw = "法国的首都是"
    ids = [int(i) for i in tok.encode_document(raw)][:-1]  # <s> + text, no </s>
    return {"prompt": raw, "reply": Generator(pretrained, tok).generate([ids], cfg)[0].text}


def first_rows(rows: list[dict], n: int = SAMPLES_PER_TASK) -> list[dict]:
    """The first `n` eval rows of each task and split, in file order: samples nobody picked."""
    out: list[dict] = []
    seen: dict[tuple, int] = {}
    for r in sorted(rows, key=lambda r: r["line"]):
        key = (r["task"], r.get("split"))
        if seen.get(key, 0) < n:
            seen[key] = seen.get(key, 0) + 1
            out.append({k: r[k] for k in ("task", "split", "prompt", "reply", "contains")})
    return out


def run_demo(
    out: Path,
    plan_name: str = "full",
    seed: int = 0,
    template: str = "minimind2",
    model_preset: str | None = None,
) -> dict:
    """Run every stage into `out` and return the scorecard (also written as JSON + report).
    `template="chatml"`: the same path on the ChatML family (MiniMind-3's format), with the
    calculator tool-use task added to the data and the scorecard. `model_preset` replaces the
    plan's model (same stage plans), to measure what model size buys."""
    import torch

    from spongebob import checkpoint, demo_data
    from spongebob.config import stage_config
    from spongebob.model import SpongeBob, preset
    from spongebob.runtime import cpu_has_native_bf16
    from spongebob.tokenizer import load as load_tokenizer
    from spongebob.tokenizer import train_tokenizer
    from spongebob.train import train

    plan = PLANS[plan_name]
    if model_preset is not None:
        try:
            preset(model_preset)  # the preset table's owner names the known ones
        except KeyError as e:
            raise UserError(e.args[0]) from None
        plan = replace(plan, preset=model_preset)
    dtype = "bf16" if plan.cpu_bf16 and cpu_has_native_bf16() else "fp32"
    # torch.compile on a CPU builds C++ kernels: without a compiler the stages run eagerly.
    can_compile = shutil.which(os.environ.get("CXX", "g++")) is not None
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
    stages = {
        k: v for k, v in plan.stages.items() if template == "minimind2" or k not in POST_TRAINING
    }
    compiled = [k for k, v in stages.items() if v.compile and can_compile]
    pairs_file = files["dpo_eval"] if "dpo" in stages else None
    # The untrained model's score is the floor every stage is compared with.
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model0 = SpongeBob(preset(plan.preset, vocab_size=tok.vocab_size)).eval()
    untrained = _score(model0, tok, files["eval"], plan, pairs_file)
    untrained["eval_s"] = round(time.perf_counter() - t0, 1)
    log(f"untrained model, eval {untrained['eval_s']:.0f}s: {untrained_summary(untrained)}")
    for stage, settings in stages.items():
        t0 = time.perf_counter()
        overrides = asdict(settings)
        eval_file = overrides.pop("eval_file")
        overrides["compile"] = stage in compiled
        cfg = stage_config(
            stage,
            data=[str(files[STAGE_DATA[stage]])],
            out=str(run),
            tokenizer=str(tok_dir),
            preset=plan.preset,
            device="cpu",
            dtype=dtype,
            kernels="torch",
            seed=seed,
            accum=1,
            save_every=10**9,
            keep=1,
            cache_dir=str(out / "cache"),
            progress=False,
            log_every=5,
            init="none" if stage == "pretrain" else None,
            eval_data=[str(files[eval_file])] if eval_file else None,
            **overrides,
        )
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
        t_eval = time.perf_counter()
        s = _score(model, tok, files["eval"], plan, pairs_file)
        (out / f"eval_{stage}.json").write_text(
            json.dumps(s["rows"], ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
        )
        score = StageScore(
            stage=stage,
            steps=result.step,
            wall_s=round(wall, 1),
            eval_s=round(time.perf_counter() - t_eval, 1),
            tokens_per_s=round(sum(toks) / len(toks), 1) if toks else None,
            final_loss=result.loss,
            checkpoint=str(result.final),
            init=meta.get("init"),
            extra={"by_task": s["by_task"], "by_split": s["by_split"], **_stage_metrics(stage_dir)},
            **{k: s.get(k) for k in ("perplexity", *(c[0] for c in COLUMNS))},
        )
        scores.append(score)
        log(f"stage {stage}: trained {wall:.0f}s, eval {score.eval_s:.0f}s: {untrained_summary(s)}")
    samples = first_rows(s["rows"])
    card = {
        "plan": plan_name,
        "template": template,
        "seed": seed,
        "preset": plan.preset,
        "dtype": dtype,
        "compiled": compiled,
        "wall_s": round(time.perf_counter() - t_all, 1),
        "tokenizer": {"vocab_size": tok.vocab_size, "wall_s": round(tok_s, 1)},
        "untrained": {
            k: v for k, v in untrained.items() if k not in ("by_task", "by_split", "rows")
        },
        "stages": [asdict(s) for s in scores],
        "continuation": _continuation(pretrained, tok, plan),
        "samples": samples,
    }
    (out / "scorecard.json").write_text(json.dumps(card, ensure_ascii=False, indent=2) + "\n")
    write_report(out, card, run)
    return card


def _columns(card_or_scores) -> list[tuple]:
    """The columns that have a score somewhere (tool use only in the chatml demo)."""
    return [c for c in COLUMNS if any(s.get(c[0]) is not None for s in card_or_scores)]


def untrained_summary(s: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    ppl = s.get("perplexity")
    head = f"ppl {ppl:.1f}, " if isinstance(ppl, (int, float)) else ""
    return head + ", ".join(f"{c[3]} {pct(s.get(c[0]))}" for c in _columns([s]))


def format_scorecard(card: dict) -> str:
    """The markdown table: one row a stage, each score with its change from the row above."""

    def pct(x, prev=None):
        if x is None:
            return "-"
        if prev is None:
            return f"{100 * x:.1f}%"
        return f"{100 * x:.1f}% ({100 * (x - prev):+.1f})"

    def num(x, f="{:.3f}"):
        return "-" if x is None else f.format(x)

    rows = [{"stage": "(untrained)", "steps": 0, **card["untrained"]}, *card["stages"]]
    cols = _columns(rows)
    head = "| stage | steps | train s | eval s | final loss | eval ppl | "
    lines = [head + " | ".join(c[3] for c in cols) + " |", "|" + "---|" * (6 + len(cols))]
    prev: dict = {}
    for s in rows:
        wall = "-" if "wall_s" not in s else f"{s['wall_s']:.0f}"
        ev = "-" if "eval_s" not in s else f"{s['eval_s']:.0f}"
        cells = [pct(s.get(c[0]), prev.get(c[0])) for c in cols]
        lines.append(
            f"| {s['stage']} | {s['steps']} | {wall} | {ev} | {num(s.get('final_loss'))} | "
            f"{num(s.get('perplexity'), '{:.1f}')} | " + " | ".join(cells) + " |"
        )
        prev = s
    return "\n".join(lines)


def write_report(out: Path, card: dict, run: Path) -> None:
    """report.md: the scorecard, loss curves (PNG), and the first eval items of each task as
    the final model answered them, marked right or wrong."""
    parts = ["# SpongeBob demo report", "", format_scorecard(card), ""]
    parts.append(
        "Scores are on held-out items: *facts*, *arithmetic* and *recall* in wording families "
        "no training file contains (*facts (new pairing)*: a training wording with a fact it "
        "never asks), on number pairs and names never trained. In brackets: the change from "
        "the stage above.\n"
    )
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
    final = card["stages"][-1]["stage"]
    parts.append(
        f"## Samples: the first {SAMPLES_PER_TASK} eval items of each task and split, "
        f"answered greedily by the {final} model (all replies: `eval_{final}.json`)\n"
    )
    for smp in card["samples"]:
        mark = "✓" if smp["contains"] else "✗"
        split = f", {smp['split']}" if smp.get("split") else ""
        parts.append(f"**{mark} {smp['task']}{split}** — {smp['prompt']}\n")
        parts.append("```\n" + smp["reply"] + "\n```\n")
    c = card["continuation"]
    parts.append(f"**pretrained model, raw continuation** — {c['prompt']}\n")
    parts.append("```\n" + c["reply"] + "\n```\n")
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
        "--preset",
        default=None,
        help="model preset instead of the plan's (full: demo, fast: tiny); demo-wide has 2.4x "
        "the demo's parameters",
    )
    p.add_argument(
        "--template",
        choices=["minimind2", "chatml"],
        default="minimind2",
        help="chat template family of the whole run (chatml adds calculator tool use)",
    )
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    card = run_demo(args.out, args.plan, args.seed, args.template, args.preset)
    print(format_scorecard(card))
    print(
        f"\ntotal {card['wall_s']:.0f}s; scorecard: {args.out / 'scorecard.json'}, "
        f"report: {args.out / 'report.md'}"
    )
    for smp in card["samples"]:
        mark = "✓" if smp["contains"] else "✗"
        print(f"\n{mark} [{smp['task']}] {smp['prompt']}\n{smp['reply']}")
    return 0
