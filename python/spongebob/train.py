"""One training loop for every stage: `spongebob train {pretrain,sft,sft-long,distill}`.

The loop, in the order it happens each optimizer step:

1. Fetch all `accum` micro-batches of the step from the loader first, count their trained
   tokens (labels ≠ −100) and all-reduce the count over ranks: that is the normalizer Σ mᵢ of
   contracts.md §2, known before any backward pass. Accumulation 4 × B/4 and 2 ranks × B/2 therefore
   give the same update as one batch of B.
2. A step whose micro-batches hold no trained token at all is skipped (counted, no NaN).
3. Forward/backward each micro-batch (bf16 autocast on CUDA, fp32 on CPU), with DDP gradient
   sync only on the last one. DDP averages gradients over ranks, so the loss is multiplied by
   the world size to turn that average back into the sum the global normalizer expects.
4. Clip to 1.0; if the loss or the gradient norm is not finite, skip the update and count it;
   `max_bad_steps` such steps in a row stop the run (the last good checkpoint stays).
5. AdamW step with the learning rate of the cosine schedule (optional linear warm-up).

Checkpoints (atomic, keep-last-K) carry the optimizer, step, RNG and every rank's loader state,
so `--resume` continues bit for bit. Only rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from spongebob.config import STAGE_ORDER, STAGES, TrainConfig, stage_config
from spongebob.errors import UserError

LOADER_STATE_VERSION = 1


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


# --------------------------------------------------------------------------------------------
# distributed set-up


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """DDP from torchrun's environment (NCCL on CUDA, gloo on CPU); a no-op otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        initialized=True,
    )


def all_reduce_sum(t, d: Dist):
    if d.initialized:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj, d: Dist) -> list:
    if not d.initialized:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.initialized:
        import torch.distributed as dist

        dist.barrier()


# --------------------------------------------------------------------------------------------
# helpers


def resolve_device(name: str, d: Dist):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but CUDA is not available here")
        if name == "cuda":
            name = f"cuda:{d.local_rank}"
        torch.cuda.set_device(torch.device(name))
    elif name not in ("cpu", "mps"):
        raise UserError(f"unknown --device {name!r} (auto, cpu, cuda, cuda:N)")
    return torch.device(name)


def resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    return torch.float32


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr × min_lr_ratio` at the last step."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, total_steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _plain(obj):
    """Loader states as plain Python (numpy scalars → int/float), for weights_only loading."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return obj.item()
    return obj


def rng_state() -> dict:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def log(msg: str, d: Dist | None = None) -> None:
    if d is None or d.is_main:
        print(f"[spongebob] {msg}", file=sys.stderr, flush=True)


def _check_files(paths: list[str], what: str) -> list[str]:
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"{what} file {p}: no such file")
    return [str(p) for p in paths]


def split_validation(
    paths: list[str], fraction: float, seed: int, out_dir: Path
) -> tuple[list[str], list[str]]:
    """Hold out ~`fraction` of the non-blank lines of `paths` (chosen by a seeded hash of the
    line number) into `val.jsonl`; the rest go to `train.jsonl`. The loader takes files, so the
    split is written once and reused while the sources (size, mtime), fraction and seed match."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key = {
        "sources": [
            [str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths
        ],
        "fraction": fraction,
        "seed": seed,
    }
    train_f, val_f, key_f = out_dir / "train.jsonl", out_dir / "val.jsonl", out_dir / "split.json"
    if key_f.is_file() and json.loads(key_f.read_text()) == key:
        return [str(train_f)], [str(val_f)]
    threshold = int(fraction * 2**64)
    mask64 = 2**64 - 1
    n_val = n_train = 0
    with open(train_f, "wb") as ft, open(val_f, "wb") as fv:
        i = 0
        for p in paths:
            with open(p, "rb") as src:
                for line in src:
                    if not line.endswith(b"\n"):
                        line += b"\n"
                    if not line.strip():
                        continue
                    z = (seed * 0x9E3779B97F4A7C15 + (i + 1) * 0xBF58476D1CE4E5B9) & mask64
                    z = ((z ^ (z >> 31)) * 0x94D049BB133111EB) & mask64
                    z ^= z >> 29
                    if z < threshold:
                        fv.write(line)
                        n_val += 1
                    else:
                        ft.write(line)
                        n_train += 1
                    i += 1
    if n_val == 0 or n_train == 0:
        raise UserError(
            f"--val-split {fraction} leaves {n_train} training and {n_val} validation lines; "
            "use a larger fraction or more data"
        )
    key_f.write_text(json.dumps(key))
    return [str(train_f)], [str(val_f)]


def default_dataset_factory(paths, tokenizer, **kw):
    from spongebob.data import PackedDataset

    return PackedDataset(paths, tokenizer, **kw)


def find_init(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint this stage starts from: --init, else the previous stage's final in the
    same run folder (falling back to earlier stages), else random weights for pretraining."""
    from spongebob.checkpoint import is_checkpoint, resolve_checkpoint

    if cfg.init is not None:
        if cfg.init.lower() in ("none", "scratch", "random"):
            return None
        return resolve_checkpoint(cfg.init)
    prev = STAGES[cfg.stage].init_from
    if prev is None:
        return None
    earlier = STAGE_ORDER[: STAGE_ORDER.index(prev) + 1]
    for stage in reversed(earlier):
        if is_checkpoint(run_dir / stage / "final"):
            return run_dir / stage / "final"
    raise UserError(
        f"stage {cfg.stage} starts from the {prev} stage, but {run_dir} has no "
        f"{'/'.join(reversed(earlier))} final checkpoint; pass --init CKPT, or --init none to "
        "start from random weights"
    )


class MetricsLog:
    """`metrics.jsonl` (always) and wandb (when asked), rank 0 only."""

    def __init__(self, path: Path, cfg: TrainConfig, d: Dist, start_step: int, run_meta: dict):
        self.enabled = d.is_main
        self.path = path
        self.wandb = None
        if not self.enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if start_step > 0 and path.is_file():
            # Drop records of steps after the resumed checkpoint: they are about to be redone.
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    pass
            path.write_text("".join(k + "\n" for k in kept))
        elif start_step == 0 and path.exists():
            path.unlink()
        if cfg.wandb:
            try:
                import wandb
            except ImportError as e:
                raise UserError("--wandb needs the wandb package (pip install wandb)") from e
            id_file = path.parent / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.is_file() else None
            run_name = cfg.wandb_run or f"{Path(cfg.out).resolve().name}-{cfg.stage}"
            self.wandb = wandb.init(
                project=cfg.wandb_project,
                name=run_name,
                group=Path(cfg.out).resolve().name,
                job_type=cfg.stage,
                config={**cfg.to_dict(), **run_meta},
                dir=str(path.parent),
                id=run_id,
                resume="allow",
            )
            id_file.write_text(self.wandb.id)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            step = record.get("step")
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


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


def forward_backward(model, batches: list[dict], normalizer, device, autocast, d: Dist):
    """Accumulate the gradients of one optimizer step; return this rank's summed loss.

    Each micro-batch's loss is Σ w·ce / normalizer with the step's global normalizer, so the
    accumulated gradient is that of the whole step. Under DDP, gradients are synchronised only
    on the last micro-batch, and the loss is scaled by the world size because DDP averages.
    """
    import torch

    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    for i, b in enumerate(batches):
        last = i == len(batches) - 1
        sync = model.no_sync() if d.initialized and not last else contextlib.nullcontext()
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with sync:
            with autocast():
                loss = model(
                    b["input_ids"],
                    b["position_ids"],
                    labels=b["labels"],
                    loss_weights=b["loss_weights"],
                    normalizer=normalizer,
                )
            (loss * d.world_size).backward()
        loss_sum += loss.detach().float()
    return loss_sum


def evaluate(model, ds, state0: dict, device, autocast, max_batches: int, d: Dist) -> dict:
    """Weighted validation loss Σ w·ce / Σ m over the eval set (all ranks) and its perplexity."""
    import torch

    was_training = model.training
    model.eval()
    ds.load_state_dict(state0)
    num = torch.zeros((), dtype=torch.float64, device=device)
    den = torch.zeros((), dtype=torch.float64, device=device)
    one = torch.ones((), dtype=torch.float32, device=device)
    n = 0
    with torch.no_grad():
        for batch in ds:
            b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast():
                num += model(
                    b["input_ids"],
                    b["position_ids"],
                    labels=b["labels"],
                    loss_weights=b["loss_weights"],
                    normalizer=one,
                ).double()
            den += (b["labels"] != -100).sum()
            n += 1
            if max_batches and n >= max_batches:
                break
    all_reduce_sum(num, d)
    all_reduce_sum(den, d)
    model.train(was_training)
    loss = (num / den.clamp_min(1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(den)}


# --------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig, dataset_factory: Callable | None = None) -> TrainResult:
    """Run one stage. `dataset_factory(paths, tokenizer, **kw)` builds loaders (tests pass a
    fake with PackedDataset's interface); the default is `spongebob.data.PackedDataset`."""
    import torch

    cfg.validate()
    factory = dataset_factory or default_dataset_factory
    device_kind = (
        "cuda"
        if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    d = init_distributed(device_kind)
    try:
        return _train(cfg, factory, d)
    finally:
        if d.initialized:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _train(cfg: TrainConfig, factory: Callable, d: Dist) -> TrainResult:
    import torch
    from tqdm import tqdm

    from spongebob import checkpoint as ck
    from spongebob.model import PRESETS, ModelConfig, SpongeBob, format_params
    from spongebob.tokenizer import load as load_tokenizer

    device = resolve_device(cfg.device, d)
    dtype = resolve_dtype(cfg.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_dir = Path(cfg.out)
    stage_dir = run_dir / cfg.stage
    ckpt_root = stage_dir / "checkpoints"
    data = _check_files(cfg.data, "training")
    eval_paths = _check_files(cfg.eval_data, "eval")

    # -- where the weights come from: resume > init > random --
    resume_ckpt = None
    if cfg.resume:
        if (stage_dir / "final").exists() and ck.is_checkpoint(stage_dir / "final"):
            raise UserError(f"{stage_dir} already finished (final/ exists); nothing to resume")
        resume_ckpt = ck.latest_checkpoint(stage_dir)
        if resume_ckpt is None:
            raise UserError(f"--resume: no checkpoint in {ckpt_root} to resume from")
    elif ck.list_step_checkpoints(ckpt_root) or ck.is_checkpoint(stage_dir / "final"):
        raise UserError(
            f"{stage_dir} already holds checkpoints; pass --resume to continue that run, or "
            "choose another --out"
        )
    init_ckpt = None if resume_ckpt is not None else find_init(cfg, run_dir)
    src_ckpt = resume_ckpt or init_ckpt

    # -- tokenizer --
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else src_ckpt
    if tok_dir is None:
        raise UserError("--tokenizer DIR is required when not starting from a checkpoint")
    if not (tok_dir / "tokenizer.json").is_file():
        raise UserError(f"{tok_dir}: no tokenizer.json")
    if src_ckpt is not None and cfg.tokenizer and (src_ckpt / "tokenizer.json").is_file():
        if (src_ckpt / "tokenizer.json").read_bytes() != (tok_dir / "tokenizer.json").read_bytes():
            raise UserError(f"--tokenizer {tok_dir} differs from the tokenizer of {src_ckpt}")
    tokenizer = load_tokenizer(tok_dir)

    # -- model --
    if src_ckpt is not None:
        meta = ck.read_meta(src_ckpt)
        mcfg = ModelConfig.from_dict(meta["model"])
    else:
        if cfg.preset not in PRESETS:
            raise UserError(f"unknown --preset {cfg.preset!r}; known: {', '.join(PRESETS)}")
        mcfg = ModelConfig.from_dict(
            {**asdict(PRESETS[cfg.preset]), "vocab_size": tokenizer.vocab_size}
        )
    mcfg.kernels, mcfg.attention = cfg.kernels, cfg.attention
    mcfg.max_seq_len = max(mcfg.max_seq_len, cfg.seq_len)
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {mcfg.vocab_size}"
        )
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = SpongeBob(mcfg)
    if src_ckpt is not None:
        ck.load_weights(model, src_ckpt)
    model.to(device)
    model.train()
    if init_ckpt is not None:
        log(f"initialised from {init_ckpt}", d)
    log(
        f"stage {cfg.stage}: model {format_params(model.num_parameters())} parameters "
        f"({mcfg.n_layers} layers, dim {mcfg.dim}, {mcfg.n_heads}/{mcfg.n_kv_heads} heads, vocab "
        f"{mcfg.vocab_size}), {device}, {str(dtype).removeprefix('torch.')}, world size "
        f"{d.world_size}, kernels {model.ops.name}",
        d,
    )

    # -- data --
    if cfg.val_split:
        # One folder per (sources, fraction, seed): stages and runs sharing a cache dir must
        # not rewrite each other's split (that would change the files under a resume state).
        split_id = hashlib.sha256(
            json.dumps([sorted(map(str, data)), cfg.val_split, cfg.seed]).encode()
        ).hexdigest()[:16]
        split_dir = Path(cfg.cache_dir or stage_dir) / "val_split" / split_id
        if d.is_main:
            split_validation(data, cfg.val_split, cfg.seed, split_dir)
        barrier(d)
        data, eval_paths = split_validation(data, cfg.val_split, cfg.seed, split_dir)
    loader_kw = dict(
        kind=cfg.kind,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=d.rank,
        world_size=d.world_size,
        think_weight=cfg.think_weight,
        cache_dir=cfg.cache_dir,
        on_bad_line=cfg.on_bad_line,
    )
    # With a shared cache dir, rank 0 builds the token cache first; the others then open it.
    if d.initialized and not d.is_main and cfg.cache_dir:
        barrier(d)
    ds = factory(data, tokenizer, **loader_kw)
    if d.initialized and d.is_main and cfg.cache_dir:
        barrier(d)
    stats = ds.stats() if hasattr(ds, "stats") else {}
    if stats.get("skipped") or stats.get("truncated"):
        log(
            f"data: skipped bad lines {dict(stats.get('skipped') or {})}, "
            f"{stats.get('truncated', 0)} conversation(s) truncated at {cfg.seq_len + 1} tokens",
            d,
        )
    batches_per_epoch = len(ds)
    if batches_per_epoch == 0:
        raise UserError("the training data gives no batches (too little data for one row?)")
    total_steps = cfg.max_steps or max(1, cfg.epochs * batches_per_epoch // cfg.accum)
    eval_ds = eval_state0 = None
    if eval_paths:
        eval_ds = factory(eval_paths, tokenizer, **loader_kw)
        eval_state0 = eval_ds.state_dict()
    elif cfg.eval_every:
        raise UserError("--eval-every needs --eval-data FILE or --val-split F")

    # -- optimizer --
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda",
    )

    # -- resume --
    start_step = 0
    counters = {"skipped_nonfinite": 0, "skipped_empty": 0, "tokens": 0, "trained_tokens": 0}
    if resume_ckpt is not None:
        st = ck.load_train_state(resume_ckpt)
        if st.get("world_size", 1) != d.world_size:
            raise UserError(
                f"{resume_ckpt} was written by {st.get('world_size')} process(es); resume it with "
                f"the same number (now {d.world_size})"
            )
        saved = st.get("train", {})
        for key in ("kind", "seq_len", "batch_size", "accum", "seed", "think_weight"):
            if key in saved and saved[key] != getattr(cfg, key):
                raise UserError(
                    f"--resume with a different {key} ({getattr(cfg, key)} vs {saved[key]} in "
                    f"{resume_ckpt}); rerun the original command with --resume"
                )
        opt.load_state_dict(st["optimizer"])
        try:
            ds.load_state_dict(st["loader"][d.rank])
        except ValueError as e:
            raise UserError(f"cannot resume from {resume_ckpt}: {e}") from None
        set_rng_state(st["rng"][d.rank])
        start_step = int(st["step"])
        counters.update({k: int(v) for k, v in st.get("counters", {}).items()})
        log(f"resumed from {resume_ckpt} at step {start_step}", d)
    if d.is_main:
        ck.clean_stale_temps(ckpt_root)
        ck.clean_stale_temps(stage_dir)

    # -- wrap --
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if d.initialized:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    use_autocast = dtype != torch.float32

    def autocast():
        if use_autocast:
            return torch.autocast(device_type=device.type, dtype=dtype)
        return contextlib.nullcontext()

    run_meta = {
        "parameters": raw_model.num_parameters(),
        "world_size": d.world_size,
        "total_steps": total_steps,
        "batches_per_epoch": batches_per_epoch,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "data_skipped": dict(stats.get("skipped") or {}),
        "data_truncated": int(stats.get("truncated", 0)),
    }
    metrics = MetricsLog(stage_dir / "metrics.jsonl", cfg, d, start_step, run_meta)

    def save(path: Path, step: int, train_state: bool = True) -> None:
        gathered = all_gather_object({"loader": _plain(ds.state_dict()), "rng": rng_state()}, d)
        if not d.is_main:
            return
        meta = {
            "model": asdict(raw_model.config),
            "stage": cfg.stage,
            "step": step,
            "total_steps": total_steps,
            "train": cfg.to_dict(),
            "init": str(init_ckpt) if init_ckpt else None,
            "parameters": raw_model.num_parameters(),
            "counters": dict(counters),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        state = None
        if train_state:
            state = {
                "optimizer": opt.state_dict(),
                "step": step,
                "world_size": d.world_size,
                "loader": [g["loader"] for g in gathered],
                "rng": [g["rng"] for g in gathered],
                "counters": dict(counters),
                "train": cfg.to_dict(),
                "loader_state_version": LOADER_STATE_VERSION,
            }
        ck.save_checkpoint(path, raw_model, meta, tok_dir, state)

    # -- loop --
    log(
        f"{total_steps} optimizer steps ({batches_per_epoch} batches/epoch/rank, batch "
        f"{cfg.batch_size} × accum {cfg.accum} × {d.world_size} rank(s), seq {cfg.seq_len}, "
        f"lr {cfg.lr:g})",
        d,
    )
    stream = micro_batches(ds)
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        disable=not (d.is_main and cfg.progress),
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    step = start_step
    bad_in_row = 0
    last_loss: float | None = None
    eval_out: dict | None = None
    win_loss, win_steps, win_tokens, win_trained = 0.0, 0, 0, 0
    win_t0 = time.perf_counter()
    t_start = time.perf_counter()
    try:
        while step < total_steps:
            batches = [next(stream) for _ in range(cfg.accum)]
            local = torch.tensor(
                [
                    sum(int((b["labels"] != -100).sum()) for b in batches),
                    sum(b["input_ids"].numel() for b in batches),
                ],
                dtype=torch.float64,
            )
            counts = all_reduce_sum(local.to(device), d).cpu()
            n_trained, n_tokens = int(counts[0]), int(counts[1])
            lr = lr_at(step, cfg, total_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            counters["tokens"] += n_tokens
            counters["trained_tokens"] += n_trained
            step_loss = grad_norm = None
            if n_trained == 0:
                counters["skipped_empty"] += 1
            else:
                normalizer = torch.tensor(float(n_trained), dtype=torch.float32, device=device)
                loss_sum = forward_backward(model, batches, normalizer, device, autocast, d)
                all_reduce_sum(loss_sum, d)
                gn = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
                ok = bool(torch.isfinite(loss_sum) & torch.isfinite(gn))
                if ok:
                    opt.step()
                    bad_in_row = 0
                    step_loss, grad_norm = loss_sum.item(), gn.item()
                    last_loss = step_loss
                    win_loss += step_loss
                    win_steps += 1
                else:
                    counters["skipped_nonfinite"] += 1
                    bad_in_row += 1
                opt.zero_grad(set_to_none=True)
            step += 1
            win_tokens += n_tokens
            win_trained += n_trained
            bar.update(1)

            if bad_in_row:
                log(
                    f"step {step}: non-finite loss or gradient, update skipped "
                    f"({bad_in_row} in a row)",
                    d,
                )
                metrics.write(
                    {"stage": cfg.stage, "step": step, "event": "nonfinite", "in_a_row": bad_in_row}
                )
                if bad_in_row >= cfg.max_bad_steps:
                    good = ck.latest_checkpoint(stage_dir)
                    where = (
                        f"the last good checkpoint is {good}"
                        if good
                        else "no checkpoint was saved yet"
                    )
                    raise TrainingDiverged(
                        f"stopped at step {step}: the loss or gradient was not finite for "
                        f"{bad_in_row} optimizer steps in a row; {where} (try --resume with a "
                        "lower --lr or more --warmup)"
                    )

            if step % cfg.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                dt = max(now - win_t0, 1e-9)
                rec = {
                    "stage": cfg.stage,
                    "step": step,
                    "epoch": _plain(ds.state_dict()).get("epoch"),
                    "loss": (win_loss / win_steps) if win_steps else None,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": win_tokens / dt,
                    "trained_tokens_per_s": win_trained / dt,
                    "tokens": counters["tokens"],
                    "trained_tokens": counters["trained_tokens"],
                    "skipped_nonfinite": counters["skipped_nonfinite"],
                    "skipped_empty": counters["skipped_empty"],
                    "elapsed_s": now - t_start,
                }
                metrics.write(rec)
                if rec["loss"] is not None:
                    bar.set_postfix(
                        loss=f"{rec['loss']:.4f}",
                        lr=f"{lr:.2e}",
                        tok_s=f"{rec['tokens_per_s']:.0f}",
                        refresh=False,
                    )
                win_loss, win_steps, win_tokens, win_trained = 0.0, 0, 0, 0
                win_t0 = now

            if (
                eval_ds is not None
                and cfg.eval_every
                and step % cfg.eval_every == 0
                and step < total_steps
            ):
                eval_out = evaluate(
                    raw_model, eval_ds, eval_state0, device, autocast, cfg.eval_batches, d
                )
                metrics.write({"stage": cfg.stage, "step": step, **eval_out})
                log(
                    f"step {step}: eval loss {eval_out['eval_loss']:.4f}, "
                    f"ppl {eval_out['eval_ppl']:.2f}",
                    d,
                )

            # No checkpoint in the middle of a non-finite streak: the last one stays the good one.
            if step % cfg.save_every == 0 and step < total_steps and not bad_in_row:
                path = ckpt_root / ck.step_dir_name(step)
                save(path, step)
                if d.is_main:
                    ck.prune_checkpoints(ckpt_root, cfg.keep)
                    ck._test_hang("SPONGEBOB_TEST_HANG_AFTER_SAVE", step)
        bar.close()
        if eval_ds is not None:
            eval_out = evaluate(
                raw_model, eval_ds, eval_state0, device, autocast, cfg.eval_batches, d
            )
            metrics.write({"stage": cfg.stage, "step": step, **eval_out})
            log(f"final eval loss {eval_out['eval_loss']:.4f}, ppl {eval_out['eval_ppl']:.2f}", d)
        final = stage_dir / "final"
        save(final, step)
        barrier(d)
        if counters["skipped_nonfinite"] or counters["skipped_empty"]:
            log(
                f"skipped steps: {counters['skipped_nonfinite']} non-finite, "
                f"{counters['skipped_empty']} without trained tokens",
                d,
            )
        log(f"done: {step} steps, last loss {last_loss}, saved {final}", d)
        return TrainResult(
            step=step,
            loss=last_loss,
            final=final,
            skipped_nonfinite=counters["skipped_nonfinite"],
            skipped_empty=counters["skipped_empty"],
            eval_loss=eval_out["eval_loss"] if eval_out else None,
        )
    finally:
        bar.close()
        metrics.close()


# --------------------------------------------------------------------------------------------
# CLI


def _add_stage_args(p, stage: str) -> None:
    s = STAGES[stage]
    a = p.add_argument
    a("--data", nargs="+", required=True, metavar="FILE", help="training jsonl file(s)")
    a("--out", required=True, metavar="DIR", help="run folder; this stage writes OUT/" + stage)
    a("--tokenizer", metavar="DIR", help="tokenizer folder (default: the init checkpoint's)")
    a("--preset", help="model preset for a fresh model: spongebob (default), minimind2-small, tiny")
    a(
        "--init",
        metavar="CKPT",
        help="checkpoint, stage or run folder to start from; 'none' = random weights "
        f"(default: {s.init_from + ' final in OUT' if s.init_from else 'random'})",
    )
    a("--epochs", type=int, help=f"epochs (default {s.epochs})")
    a("--max-steps", type=int, help="optimizer steps (default: from epochs)")
    a(
        "--batch-size",
        type=int,
        help=f"sequences per micro-batch per process (default {s.batch_size})",
    )
    a("--accum", type=int, help=f"micro-batches per optimizer step (default {s.accum})")
    a("--lr", type=float, help=f"peak learning rate (default {s.lr:g})")
    a("--min-lr-ratio", type=float, help="final lr as a fraction of --lr (default 0.1)")
    a("--warmup", type=int, help="linear warm-up steps (default 0)")
    a("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    a("--grad-clip", type=float, help="gradient-norm clip (default 1.0)")
    a(
        "--max-bad-steps",
        type=int,
        help="stop after this many non-finite steps in a row (default 5)",
    )
    a("--seq-len", type=int, help=f"tokens per row (default {s.seq_len})")
    a(
        "--think-weight",
        type=float,
        help=f"weight of reasoning-tag tokens (default {s.think_weight:g})",
    )
    a("--device", help="auto (default), cpu, cuda, cuda:N")
    a("--dtype", help="auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32")
    a("--compile", action="store_true", default=None, help="torch.compile the model")
    a("--kernels", help="auto (Triton on CUDA), torch or triton")
    a("--attention", help="auto (FlexAttention on CUDA), sdpa or flex")
    a("--seed", type=int, help="seed for init and data order (default 42)")
    a("--save-every", type=int, help="checkpoint every N optimizer steps (default 500)")
    a("--keep", type=int, help="step checkpoints to keep, 0 = all (default 3)")
    a("--resume", action="store_true", default=None, help="continue the run in --out exactly")
    a("--eval-data", nargs="+", metavar="FILE", help="held-out jsonl file(s) for eval loss")
    a("--eval-every", type=int, help="eval every N steps (default: only at the end)")
    a("--eval-batches", type=int, help="max eval batches per process, 0 = all (default 100)")
    a("--val-split", type=float, help="hold out this fraction of the training lines for eval")
    a("--log-every", type=int, help="metrics every N steps (default 10)")
    a("--wandb", action="store_true", default=None, help="log to Weights & Biases")
    a("--wandb-project", help="wandb project (default spongebob)")
    a("--wandb-run", help="wandb run name (default <out>-<stage>)")
    a("--cache-dir", metavar="DIR", help="token cache folder")
    a("--on-bad-line", choices=["error", "skip"], help="bad jsonl lines: error (default) or skip")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def config_from_args(args) -> TrainConfig:
    names = [
        "data",
        "out",
        "tokenizer",
        "preset",
        "init",
        "epochs",
        "max_steps",
        "batch_size",
        "accum",
        "lr",
        "min_lr_ratio",
        "warmup",
        "weight_decay",
        "grad_clip",
        "max_bad_steps",
        "seq_len",
        "think_weight",
        "device",
        "dtype",
        "compile",
        "kernels",
        "attention",
        "seed",
        "save_every",
        "keep",
        "resume",
        "eval_data",
        "eval_every",
        "eval_batches",
        "val_split",
        "log_every",
        "wandb",
        "wandb_project",
        "wandb_run",
        "cache_dir",
        "on_bad_line",
        "progress",
    ]
    return stage_config(args.stage, **{n: getattr(args, n, None) for n in names})


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
        _add_stage_args(sp, name)
        sp.set_defaults(func=_cmd_train)


def _cmd_train(args, dataset_factory: Callable | None = None) -> int:
    train(config_from_args(args), dataset_factory)
    return 0
