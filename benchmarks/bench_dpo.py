"""DPO training throughput: `spongebob train dpo` against TRL's `DPOTrainer` on the same model
(exported with `spongebob.export.export_hf`), the same pairs in the same order, the same math.

    python benchmarks/bench_dpo.py                  # demo preset, 128 pairs, batch 8, 16 steps
    python benchmarks/bench_dpo.py --preset tiny --pairs 64 --steps 8

What is timed is the product: `spongebob.train.train(stage_config("dpo", ...))` from a
checkpoint of random (seeded) weights, pairs/s read back from OUT/dpo/metrics.jsonl (logged
every step). Ours computes the frozen reference's log-probs once, at set-up, before the first
step: that pass is timed separately (`reference_s`) and is not in pairs/s. TRL runs two ways:
`trl` computes the reference per batch (its default: a second model forward every step), and
`trl-precompute` with `precompute_ref_log_probs=True` (a pass over the data in the trainer's
constructor, timed separately, like ours).

Both sides: fp32 on the CPU, `--threads` torch threads (default 1), sigmoid loss with the same
β, batch `--batch` pairs, accumulation 1, `--steps` optimizer steps, the same AdamW (betas
0.9/0.95, eps 1e-8, no weight decay, clip 1.0) at a constant lr (ours: `min_lr_ratio` 1, no
warm-up; TRL: `lr_scheduler_type="constant"`). TRL gets the pairs already tokenized (prompt,
chosen and rejected reply ids, exactly the tokens ours scores) in our loader's epoch order,
with `train_sampling_strategy="sequential"`, so step k sees the same pairs on both sides and
the loss curves should agree (the first loss is ln 2 on both: policy = reference).

Timing per step is from one step's end to the next (ours: metrics.jsonl windows of one step;
TRL: `on_step_end` of a callback), so both include loading, the step and the logging; the
first step (warm-up) is dropped. Each variant runs in its own subprocess, so its peak RSS is
its own; `import_rss_mb` is that process's RSS once its libraries are imported (torch alone
holds some 650 MB), before any model or data. The load average before and after each variant
is recorded (the CPU numbers mean little on a loaded machine). Prints a table and writes JSON
with machine info (default benchmarks/results/bench_dpo-cpu.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import machine_info, peak_mb, rss_mb  # noqa: E402

VARIANTS = ("spongebob", "trl", "trl-precompute")


# --- set-up (shared with bench_rollout) --------------------------------------------------------


def make_tokenizer(work: Path, corpus_mb: float, vocab: int) -> Path:
    """A tokenizer trained on a generated Chinese-heavy chat corpus (benchmarks/corpus.py)."""
    from corpus import ChineseCorpus, write_jsonl

    tok_dir = work / f"tok-{vocab}"
    if (tok_dir / "tokenizer.json").is_file():
        return tok_dir
    data = work / f"chat-{corpus_mb:g}mb.jsonl"
    if not data.is_file():
        write_jsonl(data, corpus_mb, ChineseCorpus(1).conversation)
    from spongebob.tokenizer import train_tokenizer

    train_tokenizer([data], tok_dir, vocab_size=vocab, show_progress=False)
    return tok_dir


def make_checkpoint(path: Path, tok_dir: Path, preset: str, seed: int, max_seq_len: int) -> Path:
    """A checkpoint in the trainer's layout holding a seeded random model of `preset` (the
    tokenizer's vocab). As tests/test_generate.py's `tiny_model`: a larger embedding and a
    random signed final norm, so logits are far apart and greedy choices are not decided by
    float rounding (speed does not depend on the weights)."""
    import torch

    from spongebob.checkpoint import save_checkpoint
    from spongebob.model import PRESETS, SpongeBob
    from spongebob.tokenizer import load

    if path.is_dir():
        return path
    vocab = load(str(tok_dir)).vocab_size
    cfg = replace(PRESETS[preset], vocab_size=vocab, max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    model = SpongeBob(cfg, kernels="torch", attention="sdpa").eval()
    with torch.no_grad():
        model.embed_tokens.weight.mul_(30.0)
        model.norm.weight.normal_()
    meta = {"model": asdict(model.config), "stage": "sft", "step": 0}
    return save_checkpoint(path, model, meta, tokenizer_dir=tok_dir)


def write_pairs(path: Path, n: int, seed: int) -> Path:
    """n MiniMind-format preference pairs: a user question, two different assistant replies."""
    from corpus import ChineseCorpus

    c, rng = ChineseCorpus(seed), random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            prompt = [{"role": "user", "content": c.paragraph(20, 80)}]
            chosen = c.paragraph(30, rng.randint(40, 120))
            rejected = c.paragraph(30, rng.randint(40, 120))
            rec = {
                "chosen": [*prompt, {"role": "assistant", "content": chosen}],
                "rejected": [*prompt, {"role": "assistant", "content": rejected}],
            }
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def trl_examples(pairs_file: Path, tok_dir: Path, seq_len: int, batch: int, seed: int) -> dict:
    """Our pairs as TRL's tokenized examples (prompt ids, then each side's scored reply tokens:
    the content and its </s>) in the order our loader hands them out (epoch 0 of
    `PairDataset`, batch by batch), and the token counts."""
    import numpy as np

    from spongebob.data import ChatTokenizer
    from spongebob.dpo import PairDataset, collate_pairs

    tok = ChatTokenizer.from_dir(str(tok_dir))
    ds = PairDataset([str(pairs_file)], tok, seq_len=seq_len, batch_size=batch, seed=seed)

    # The loader's order, read from its own batches (its public interface): each batch's
    # first `batch` rows are the chosen sides, keyed by their ids up to the last trained label.
    def key(b, row):
        n = int((b["labels"][row] != -100).nonzero().max()) + 1
        return b["input_ids"][row, :n].numpy().tobytes()

    by_tokens = {key(collate_pairs([p]), 0): i for i, p in enumerate(ds.pairs)}
    if len(by_tokens) != len(ds.pairs):
        raise SystemExit("two pairs share a chosen side")
    order = [by_tokens[key(b, r)] for b in ds for r in range(b["input_ids"].shape[0] // 2)]
    examples, lens = [], []
    for i in order:
        p = ds.pairs[i]
        s = int(np.flatnonzero(p.chosen_mask)[0])
        if p.truncated or p.chosen_ids[:s].tolist() != p.rejected_ids[:s].tolist():
            raise SystemExit("a pair was truncated or its sides do not share the prompt")
        # TRL scores prompt + reply: the reply is our trained run (content and </s>); a token
        # after it (the template's newline) is not scored and, causally, changes nothing.
        for side in ("chosen", "rejected"):
            m = getattr(p, f"{side}_mask")
            if m[:s].any() or not m[s : s + int(m.sum())].all():
                raise SystemExit(
                    f"a {side} reply is not one run of trained tokens after the prompt"
                )
        examples.append(
            {
                "prompt_ids": p.chosen_ids[:s].tolist(),
                "chosen_ids": p.chosen_ids[p.chosen_mask].tolist(),
                "rejected_ids": p.rejected_ids[p.rejected_mask].tolist(),
            }
        )
        lens.append((s, int(p.chosen_mask.sum()), int(p.rejected_mask.sum())))
    a = np.array(lens)
    return {
        "examples": examples,
        "tokens": {
            "prompt_mean": float(a[:, 0].mean()),
            "chosen_mean": float(a[:, 1].mean()),
            "rejected_mean": float(a[:, 2].mean()),
            "longest_side": int((a[:, 0] + a[:, 1:].max(1)).max()),
        },
    }


# --- workers (one subprocess per measurement) -------------------------------------------------


def _summary(step_s: list[float], losses: list[float], batch: int) -> dict:
    timed = step_s[1:]
    return {
        "pairs_per_s": batch * len(timed) / sum(timed),
        "s_per_step": sum(timed) / len(timed),
        "timed_steps": len(timed),
        "warmup_step_s": step_s[0],
        "step_s": step_s,
        "losses": losses,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def worker_spongebob(spec: dict) -> dict:
    """The product: train() from the checkpoint; per-step times and losses from metrics.jsonl."""
    import torch

    import spongebob.dpo as dpo_mod
    from spongebob.config import stage_config
    from spongebob.train import train

    import_rss = rss_mb().get("vmrss_mb")
    torch.set_num_threads(spec["threads"])
    ref_s: list[float] = []
    attach = dpo_mod.PairDataset.attach_reference

    def attach_timed(self, *a, **k):  # the reference pass at set-up, timed apart
        t0 = time.perf_counter()
        try:
            return attach(self, *a, **k)
        finally:
            ref_s.append(time.perf_counter() - t0)

    dpo_mod.PairDataset.attach_reference = attach_timed
    out = Path(spec["run_dir"])
    cfg = stage_config(
        "dpo",
        data=[spec["pairs_file"]],
        out=str(out),
        init=spec["ckpt"],
        max_steps=spec["steps"],
        batch_size=spec["batch"],
        accum=1,
        seq_len=spec["seq_len"],
        lr=spec["lr"],
        min_lr_ratio=1.0,
        warmup=0,
        weight_decay=0.0,
        beta1=0.9,
        beta2=0.95,
        grad_clip=1.0,
        dpo_beta=spec["beta"],
        device="cpu",
        dtype="fp32",
        kernels="torch",
        attention="sdpa",
        seed=spec["seed"],
        save_every=10**9,
        log_every=1,
        progress=False,
    )
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "dpo" / "metrics.jsonl").read_text().splitlines() if x]
    recs = [r for r in recs if r.get("pairs_per_s") and "event" not in r]
    if len(recs) != spec["steps"]:
        raise SystemExit(f"expected {spec['steps']} step records, got {len(recs)}")
    # the window of one step holds one batch of pairs (accumulation 1, one process)
    step_s = [spec["batch"] / r["pairs_per_s"] for r in recs]
    res = _summary(step_s, [r["loss"] for r in recs], spec["batch"])
    res["pairs_per_s_logged_mean"] = sum(r["pairs_per_s"] for r in recs[1:]) / (len(recs) - 1)
    res.update(
        reference_s=sum(ref_s),
        wall_s=wall,
        setup_s=wall - sum(step_s),  # prepare() incl. the reference pass, and the final save
        peak_rss_mb=peak_mb(rss_mb()),
        import_rss_mb=import_rss,
        threads=torch.get_num_threads(),
        last_metrics={k: recs[-1].get(k) for k in ("rewards/margin", "rewards/accuracy", "lr")},
    )
    return res


def worker_trl(spec: dict) -> dict:
    """TRL's DPOTrainer on the exported model, the same tokenized pairs in the same order."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.base_trainer import _BaseTrainer

    import_rss = rss_mb().get("vmrss_mb")
    torch.set_num_threads(spec["threads"])
    precompute = spec["variant"] == "trl-precompute"
    _BaseTrainer._send_telemetry = lambda self: None  # no network
    ref_s: list[float] = []
    orig = DPOTrainer._precompute_ref_logps

    def precompute_timed(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return orig(self, *a, **k)
        finally:
            ref_s.append(time.perf_counter() - t0)

    DPOTrainer._precompute_ref_logps = precompute_timed

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.ends, self.losses = None, [], []

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    examples = json.loads(Path(spec["examples_file"]).read_text())["examples"]
    n = spec["steps"] * spec["batch"]
    examples = examples[:n]  # exactly the pairs ours trains on (one epoch, no repeat needed)
    t_setup = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=torch.float32)
    ref = (
        None
        if precompute
        else AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=torch.float32)
    )
    tok = AutoTokenizer.from_pretrained(spec["hf"])
    args = DPOConfig(
        output_dir=str(Path(spec["run_dir"]) / "trl"),
        beta=spec["beta"],
        loss_type=["sigmoid"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        train_sampling_strategy="sequential",
        precompute_ref_log_probs=precompute,
        max_length=None,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=spec["seed"],
        disable_tqdm=True,
    )

    class Tokenized(DPOTrainer):
        """The pairs come tokenized already (prompt_ids, chosen_ids, rejected_ids)."""

        def _prepare_dataset(self, dataset, *a, **k):
            return dataset

    clock = Clock()
    trainer = Tokenized(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tok,
        callbacks=[clock],
    )
    setup = time.perf_counter() - t_setup
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    ends = [clock.begin, *clock.ends]
    step_s = [b - a for a, b in itertools.pairwise(ends)]
    if len(step_s) != spec["steps"] or len(clock.losses) != spec["steps"]:
        raise SystemExit(f"TRL ran {len(step_s)} steps, logged {len(clock.losses)} losses")
    res = _summary(step_s, clock.losses, spec["batch"])
    res.update(
        reference_s=sum(ref_s) if precompute else None,
        setup_s=setup,
        train_s=train_s,
        wall_s=setup + train_s,
        peak_rss_mb=peak_mb(rss_mb()),
        import_rss_mb=import_rss,
        threads=torch.get_num_threads(),
        tied_embeddings=model.lm_head.weight is model.model.embed_tokens.weight,
        last_metrics={
            k: trainer.state.log_history[-2].get(k)
            for k in ("rewards/margins", "rewards/accuracies", "learning_rate")
        },
    )
    return res


def worker(spec: dict) -> dict:
    return worker_spongebob(spec) if spec["variant"] == "spongebob" else worker_trl(spec)


def run_worker(spec: dict, timeout: float | None) -> dict:
    """One measurement in a fresh process; its failure is recorded, not raised."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    t0, load0 = time.perf_counter(), os.getloadavg()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    load = {"loadavg_before": load0, "loadavg_after": os.getloadavg()}
    if proc.returncode != 0:
        return {
            "error": f"worker exited {proc.returncode}: "
            + (proc.stderr.strip().splitlines() or ["?"])[-1][:300],
            "stderr_tail": proc.stderr[-3000:],
            **load,
        }
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = time.perf_counter() - t0
    return {**res, **load}


# --- report ------------------------------------------------------------------------------------


def compare_losses(a: list[float], b: list[float]) -> dict:
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
    return {
        "max_abs_diff": max(diffs),
        "max_rel_diff": max(d / max(abs(y), 1e-12) for d, y in zip(diffs, b, strict=True)),
        "last_abs_diff": diffs[-1],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--pairs", type=int, default=128, help="pairs generated (and trained on)")
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--steps", type=int, default=None, help="default: one epoch (pairs / batch)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1, help="DPO β (sigmoid loss)")
    ap.add_argument("--seq-len", type=int, default=512, help="ours: the longest side kept")
    ap.add_argument("--vocab", type=int, default=6400)
    ap.add_argument("--corpus-mb", type=float, default=0.5, help="tokenizer training corpus")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of each worker")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))))
        return 0

    from spongebob.export import export_hf

    steps = args.steps or args.pairs // args.batch
    if steps * args.batch > args.pairs or steps < 2:
        ap.error("need 2 ≤ steps ≤ pairs / batch (one epoch: every step sees new pairs)")
    tmp = None
    work = args.work
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_dpo-")
        work = Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t_prep = time.perf_counter()
    tok_dir = make_tokenizer(work, args.corpus_mb, args.vocab)
    ckpt = make_checkpoint(work / f"ckpt-{args.preset}", tok_dir, args.preset, args.seed, 1024)
    hf = work / f"hf-{args.preset}"
    if not hf.is_dir():
        export_hf(ckpt, hf)
    pairs_file = write_pairs(work / "dpo.jsonl", args.pairs, args.seed + 1)
    ex = trl_examples(pairs_file, tok_dir, args.seq_len, args.batch, args.seed)
    examples_file = work / "trl_examples.json"
    examples_file.write_text(json.dumps(ex))
    prep_s = time.perf_counter() - t_prep

    results: dict[str, dict] = {}
    for v in args.variants:
        print(f"... {v}", file=sys.stderr, flush=True)
        spec = {
            "variant": v,
            "ckpt": str(ckpt),
            "hf": str(hf),
            "pairs_file": str(pairs_file),
            "examples_file": str(examples_file),
            "run_dir": str(work / f"run-{v}"),
            "steps": steps,
            "batch": args.batch,
            "lr": args.lr,
            "beta": args.beta,
            "seq_len": args.seq_len,
            "threads": args.threads,
            "seed": args.seed,
        }
        results[v] = run_worker(spec, args.timeout)
        if "error" in results[v]:
            print(f"    FAILED: {results[v]['error']}", file=sys.stderr)

    from spongebob.checkpoint import load
    from spongebob.model import PRESETS

    n_params = load(ckpt, "cpu", kernels="torch").model.num_parameters()
    cfg = PRESETS[args.preset]
    ours = results.get("spongebob", {})
    ratios, loss_match = {}, {}
    for v in ("trl", "trl-precompute"):
        r = results.get(v, {})
        if "error" in ours or "error" in r or not r or not ours:
            continue
        ratios[f"spongebob / {v} pairs/s"] = ours["pairs_per_s"] / r["pairs_per_s"]
        loss_match[v] = compare_losses(ours["losses"], r["losses"])

    tk = ex["tokens"]
    print(
        f"\nbench_dpo: preset {args.preset} (dim {cfg.dim}, {cfg.n_layers} layers, vocab "
        f"{args.vocab}, random weights), cpu, fp32, {args.threads} thread(s), {steps} steps × "
        f"{args.batch} pairs, β {args.beta:g}, lr {args.lr:g} constant; tokens per pair: prompt "
        f"{tk['prompt_mean']:.0f}, chosen {tk['chosen_mean']:.0f}, rejected "
        f"{tk['rejected_mean']:.0f} (mean)\n"
    )
    head = (
        f"{'variant':<16}{'pairs/s':>9}{'s/step':>8}{'ref pass s':>11}{'setup s':>9}"
        f"{'peak RSS MB':>13}{'loss first':>12}{'loss last':>11}{'load 1m':>9}"
    )
    print(head)
    print("-" * len(head))
    for v, r in results.items():
        if "error" in r:
            print(f"{v:<16} FAILED: {r['error']}")
            continue
        ref = "per step" if r.get("reference_s") is None else f"{r['reference_s']:.2f}"
        print(
            f"{v:<16}{r['pairs_per_s']:>9.2f}{r['s_per_step']:>8.2f}{ref:>11}{r['setup_s']:>9.1f}"
            f"{r['peak_rss_mb']:>13.0f}{r['loss_first']:>12.6f}{r['loss_last']:>11.6f}"
            f"{r['loadavg_after'][0]:>9.2f}"
        )
    for k, x in ratios.items():
        print(f"  {k}: {x:.2f}×  (target ≥ 2×: {'met' if x >= 2 else 'NOT met'})")
    for v, m in loss_match.items():
        print(
            f"  loss curves, spongebob vs {v}: max |Δ| {m['max_abs_diff']:.2e} (relative "
            f"{m['max_rel_diff']:.2e}) over {steps} steps"
        )
    print(
        "  (setup s: ours = train() wall − the timed steps: load, the pair loader, the "
        "reference pass, the final save; TRL = model loads + DPOTrainer(), incl. its precompute; "
        "peak RSS includes the imports: "
        + ", ".join(
            f"{v} {r['import_rss_mb']:.0f} MB"
            for v, r in results.items()
            if r.get("import_rss_mb") is not None
        )
        + "; load 1m: the 1-minute load average after the variant)"
    )
    out = {
        "benchmark": "bench_dpo",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(("torch", "transformers", "trl", "datasets", "spongebob")),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "steps": steps,
        "model": {"preset": args.preset, **asdict(cfg), "parameters": n_params},
        "pair_tokens": tk,
        "data_prep_s": prep_s,
        "results": results,
        "ratios": ratios,
        "loss_match": loss_match,
        "targets": {"spongebob / trl pairs/s >= 2": {k: x >= 2 for k, x in ratios.items()}},
    }
    path = args.json or HERE / "results" / "bench_dpo-cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")
    ok = all("error" not in r for r in results.values())
    return 0 if ok and not math.isnan(sum(ratios.values() or [0.0])) else 1


if __name__ == "__main__":
    sys.exit(main())
