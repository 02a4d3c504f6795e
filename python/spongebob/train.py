"""One training loop for every stage: `spongebob train {pretrain,sft,sft-long,distill}`.

The loop reads top to bottom: set-up (`stage.prepare`: weights, tokenizer, loaders, optimizer,
resume), then per optimizer step: draw `accum` micro-batches, `step.optimizer_step` (global
token normalisation, skips of empty and non-finite steps), bookkeeping and logging
(`metrics`), validation (`evaluate.score_batches`, the same numbers as `spongebob eval`), and
atomic checkpoints (`Stage.save`) that `--resume` continues bit for bit. Only rank 0 logs and
writes (contracts.md §2, §5).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from spongebob.config import STAGES, TrainConfig, add_config_args, config_from_args
from spongebob.errors import UserError

__all__ = ["TrainResult", "TrainingDiverged", "add_commands", "config_from_args", "train"]


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row."""


@dataclass
class TrainResult:
    step: int
    loss: float | None
    final: Path | None
    skipped_nonfinite: int
    skipped_empty: int
    eval_loss: float | None = None


def micro_batches(ds) -> Iterator[dict]:
    """An endless stream of the loader's batches. When an epoch is exhausted the loader moves
    its own state to the next epoch and iterating it again continues there; a pass that yields
    nothing is fine once (a state saved right after an epoch's last batch), twice means the
    data gives no batches at all."""
    empty_passes = 0
    while True:
        n = 0
        for batch in ds:
            n += 1
            yield batch
        empty_passes = 0 if n else empty_passes + 1
        if empty_passes >= 2:
            raise UserError("the training data gave no batches (too little data?)")


def train(cfg: TrainConfig, dataset_factory: Callable | None = None) -> TrainResult:
    """Run one stage. `dataset_factory(paths, tokenizer, **kw)` builds loaders (tests pass a
    fake with PackedDataset's interface); the default is `spongebob.data.PackedDataset`."""
    from spongebob import runtime

    cfg.validate()
    rt = runtime.start(cfg.device, cfg.dtype)
    try:
        runtime.check_training_attention(cfg.attention, rt.device)
        return _run(cfg, rt, dataset_factory)
    finally:
        rt.close()


def _run(cfg: TrainConfig, rt, factory: Callable | None) -> TrainResult:
    from tqdm import tqdm

    from spongebob import checkpoint as ck
    from spongebob.evaluate import token_byte_lengths
    from spongebob.metrics import MetricsLog, Window
    from spongebob.runtime import peak_flops
    from spongebob.stage import prepare
    from spongebob.step import lr_at, optimizer_step

    st = prepare(cfg, rt, factory)
    metrics = MetricsLog(st.dir / "metrics.jsonl", rt.is_main, st.start_step, _wandb_args(st))
    lm_val = st.val is not None and cfg.kind in ("text", "chat")  # else dpo/grpo evaluate
    token_bytes = token_byte_lengths(st.tokenizer) if lm_val else None
    val_state0 = st.val.state_dict() if st.val is not None else None
    window = Window(st.model.flops_per_token(cfg.seq_len), peak_flops(rt.device, rt.dtype))
    rt.log(
        f"{st.total_steps} optimizer steps ({len(st.data)} batches/epoch/rank, batch "
        f"{cfg.batch_size} × accum {cfg.accum} × {rt.world_size} rank(s), seq {cfg.seq_len}, "
        f"lr {cfg.lr:g})"
    )
    bar = tqdm(
        total=st.total_steps,
        initial=st.start_step,
        disable=not (rt.is_main and cfg.progress),
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    params = list(st.model.parameters())
    stream = micro_batches(st.data)
    step, bad_in_row, last_loss, val_out = st.start_step, 0, None, None
    try:
        while step < st.total_steps:
            batches = [next(stream) for _ in range(cfg.accum)]
            lr = lr_at(step, cfg, st.total_steps)
            res = optimizer_step(
                st.train_model, params, st.opt, batches, lr, cfg.grad_clip, rt,
                loss_fn=st.loss_fn, count_fn=st.count_fn,
            )  # fmt: skip
            step += 1
            bar.update(1)
            st.counters["tokens"] += res.tokens
            st.counters["trained_tokens"] += res.trained_tokens
            if res.skipped:
                st.counters[f"skipped_{res.skipped}"] += 1
            bad_in_row = bad_in_row + 1 if res.skipped == "nonfinite" else 0
            if res.loss is not None:
                last_loss = res.loss
            window.add(res.tokens, res.trained_tokens, res.loss)
            if bad_in_row:
                _nonfinite(st, metrics, step, bad_in_row)

            if step % cfg.log_every == 0 or step == st.total_steps:
                rec = {
                    "stage": cfg.stage,
                    "step": step,
                    "epoch": st.data.state_dict().get("epoch"),
                    "lr": lr,
                    "grad_norm": res.grad_norm,
                    **_units(window.flush(), st.unit),
                    "tokens": st.counters["tokens"],
                    st.unit: st.counters["trained_tokens"],
                    "skipped_nonfinite": st.counters["skipped_nonfinite"],
                    "skipped_empty": st.counters["skipped_empty"],
                    **_loss_metrics(st.loss_fn),
                    **(st.data.pop_metrics() if hasattr(st.data, "pop_metrics") else {}),
                }
                metrics.write(rec)
                if rec["loss"] is not None:
                    bar.set_postfix(_postfix(rec), refresh=False)

            if st.val is not None and cfg.eval_every and step % cfg.eval_every == 0:
                if step < st.total_steps:
                    val_out = _validate(st, metrics, step, token_bytes, val_state0)

            # No checkpoint in the middle of a non-finite streak: the last one stays the good one.
            if step % cfg.save_every == 0 and step < st.total_steps and not bad_in_row:
                st.save(st.ckpt_root / ck.step_dir_name(step), step)
                if rt.is_main:
                    ck.prune_checkpoints(st.ckpt_root, cfg.keep)
        bar.close()
        if st.val is not None:
            val_out = _validate(st, metrics, step, token_bytes, val_state0)
        final = st.dir / "final"
        st.save(final, step)
        rt.barrier()
        c = st.counters
        if c["skipped_nonfinite"] or c["skipped_empty"]:
            rt.log(
                f"skipped steps: {c['skipped_nonfinite']} non-finite, "
                f"{c['skipped_empty']} without trained tokens"
            )
        rt.log(f"done: {step} steps, last loss {last_loss}, saved {final}")
        return TrainResult(
            step=step,
            loss=last_loss,
            final=final,
            skipped_nonfinite=c["skipped_nonfinite"],
            skipped_empty=c["skipped_empty"],
            eval_loss=val_out["eval_loss"] if val_out else None,
        )
    finally:
        bar.close()
        metrics.close()


# --- the loop's helpers ----------------------------------------------------------------------


def _loss_metrics(loss_fn) -> dict:
    """What a stage's loss reports besides its value (DPO: rewards, margin, accuracy, log-probs),
    averaged over the window; its own count of pairs is the record's `pairs` already."""
    if not hasattr(loss_fn, "pop_metrics"):
        return {}
    skip = ("pairs", "loss", "tokens")  # the record has them already
    return {k: v for k, v in loss_fn.pop_metrics().items() if k not in skip}


def _units(window: dict, unit: str) -> dict:
    """The window's counts under the stage's unit (`pairs_per_s` for DPO)."""
    if unit != "trained_tokens":
        window[f"{unit}_per_s"] = window.pop("trained_tokens_per_s")
    return window


def _postfix(rec: dict) -> dict:
    out = {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}"}
    out["tok_s"] = f"{rec['tokens_per_s']:.0f}"
    if rec.get("mfu") is not None:
        out["mfu"] = f"{100 * rec['mfu']:.1f}%"
    return out


def _nonfinite(st, metrics, step: int, in_a_row: int) -> None:
    """Log a skipped non-finite step; stop the run after `max_bad_steps` in a row."""
    from spongebob import checkpoint as ck

    st.rt.log(f"step {step}: non-finite loss or gradient, update skipped ({in_a_row} in a row)")
    metrics.write({"stage": st.cfg.stage, "step": step, "event": "nonfinite", "in_a_row": in_a_row})
    if in_a_row >= st.cfg.max_bad_steps:
        good = ck.latest_checkpoint(st.dir)
        where = f"the last good checkpoint is {good}" if good else "no checkpoint was saved yet"
        raise TrainingDiverged(
            f"stopped at step {step}: the loss or gradient was not finite for {in_a_row} "
            f"optimizer steps in a row; {where} (try --resume with a lower --lr or more --warmup)"
        )


def _validate(st, metrics, step: int, token_bytes, state0: dict) -> dict:
    """Score the validation loader from its start (contracts.md §6; preference accuracy and
    reward margin for DPO) and log it."""
    from spongebob.evaluate import score_batches

    st.val.load_state_dict(state0)
    if st.cfg.kind == "prompts":
        from spongebob.grpo import evaluate_prompts

        out = evaluate_prompts(st.val, st.rt, st.cfg.eval_batches)
        metrics.write({"stage": st.cfg.stage, "step": step, **out})
        st.rt.log(f"step {step}: eval reward {out['eval_reward']:.3f} (greedy, one per prompt)")
        return out
    if st.cfg.kind == "pairs":
        from spongebob.dpo import evaluate_pairs

        out = evaluate_pairs(st.model, st.val, st.rt, st.cfg.dpo_beta, st.cfg.eval_batches)
        metrics.write({"stage": st.cfg.stage, "step": step, **out})
        st.rt.log(
            f"step {step}: eval DPO loss {out['eval_loss']:.4f}, preference accuracy "
            f"{100 * out['eval_accuracy']:.1f} %, margin {out['eval_margin']:.3f}"
        )
        return out
    s = score_batches(st.model, st.val, st.rt, token_bytes, st.cfg.eval_batches)
    out = {
        "eval_loss": s["loss"],
        "eval_ppl": s["ppl"],
        "eval_bpb": s["bpb"],
        "eval_tokens": s["tokens"],
    }
    metrics.write({"stage": st.cfg.stage, "step": step, **out})
    if s["loss"] is not None:
        st.rt.log(f"step {step}: eval loss {s['loss']:.4f}, ppl {s['ppl']:.2f}, bpb {s['bpb']:.3f}")
    return out


def _wandb_args(st) -> dict | None:
    if not st.cfg.wandb:
        return None
    cfg, run = st.cfg, Path(st.cfg.out).resolve().name
    return {
        "project": cfg.wandb_project,
        "name": cfg.wandb_run or f"{run}-{cfg.stage}",
        "group": run,
        "job_type": cfg.stage,
        "config": {
            **cfg.to_dict(),
            "parameters": st.model.num_parameters(),
            "world_size": st.rt.world_size,
            "total_steps": st.total_steps,
            "device": str(st.rt.device),
            "dtype": str(st.rt.dtype).removeprefix("torch."),
        },
    }


# --- CLI ---------------------------------------------------------------------------------------


def add_commands(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a stage: pretrain, sft, sft-long, distill",
        description="One training loop for every stage; each stage's defaults are the "
        "tutorial's presets. Run under torchrun for several GPUs (or CPU processes).",
    )
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, s in STAGES.items():
        sp = stages.add_parser(
            name,
            help=s.description,
            description=f"{s.description}. Defaults: {s.kind} data, seq {s.seq_len}, "
            f"{s.epochs} epoch(s), batch {s.batch_size} × accum {s.accum}, lr {s.lr:g}, "
            f"think weight {s.think_weight:g}.",
        )
        add_config_args(sp, name)
        sp.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    train(config_from_args(args))
    return 0
