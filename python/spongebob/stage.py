"""Everything a training stage needs before its first step, and its checkpoints.

`prepare(cfg, rt)` resolves where the weights come from (resume > init > random), loads the
tokenizer and the model through `checkpoint.load`, builds the training and validation loaders,
the optimizer, and restores the exact state of a resumed run. `Stage.save` writes a checkpoint
that `--resume` continues bit for bit (contracts.md §5). Every stage (pretrain, SFT, long SFT,
distillation, and later DPO or GRPO) shares this; only its loss and its data differ.

With `--lora-rank R` the stage freezes the weights it starts from and trains LoRA adapters on
the `--lora-targets` projections (spongebob.lora); its checkpoints hold only the adapters and a
reference to that base checkpoint (checkpoint.py), and a resumed run reloads the same base.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spongebob import checkpoint as ck
from spongebob.config import STAGE_ORDER, STAGES, TrainConfig
from spongebob.errors import UserError
from spongebob.runtime import Runtime, check_kernels, rng_state, seed_everything, set_rng_state
from spongebob.step import count_trained, lm_loss

if TYPE_CHECKING:
    import torch

    from spongebob.data import ChatTokenizer
    from spongebob.model import SpongeBob

# Settings a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = (
    "kind", "seq_len", "batch_size", "accum", "seed", "think_weight", "val_split", "dpo_beta",
    "grpo_group", "grpo_max_new_tokens", "grpo_temperature", "grpo_top_p",
    "grpo_beta", "grpo_clip", "rewards",
    "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
)  # fmt: skip


@dataclass
class Stage:
    cfg: TrainConfig
    rt: Runtime
    dir: Path  # OUT/<stage>
    tokenizer: ChatTokenizer
    tokenizer_dir: Path
    model: SpongeBob  # the raw model (checkpoints, clipping, evaluation)
    train_model: torch.nn.Module  # what the step calls: compiled and/or DDP-wrapped
    opt: Any
    data: Any  # the training loader (PackedDataset interface)
    val: Any | None  # the validation loader, or None
    total_steps: int
    init: Path | None  # the checkpoint this stage started from (None: random or resumed)
    start_step: int = 0
    counters: dict = field(
        default_factory=lambda: dict.fromkeys(
            ("skipped_nonfinite", "skipped_empty", "tokens", "trained_tokens"), 0
        )
    )
    lora_base: dict | None = None  # LoRA: checkpoint.base_reference of the frozen weights
    # What the step minimises and counts (step.optimizer_step): the LM loss over trained tokens,
    # or the DPO loss over pairs; `unit` names what count_fn counts, for the metrics.
    loss_fn: Callable = field(default_factory=lambda: lm_loss)
    count_fn: Callable = field(default_factory=lambda: count_trained)
    unit: str = "trained_tokens"

    @property
    def ckpt_root(self) -> Path:
        return self.dir / "checkpoints"

    def save(self, path: Path, step: int) -> None:
        """A checkpoint with every rank's loader and RNG state (all ranks call this; rank 0
        writes)."""
        gathered = self.rt.all_gather_object(
            {"loader": _plain(self.data.state_dict()), "rng": rng_state()}
        )
        if not self.rt.is_main:
            return
        from spongebob import lora

        spec = lora.lora_spec(self.model)
        meta = {
            "model": asdict(self.model.config),
            "stage": self.cfg.stage,
            "step": step,
            "total_steps": self.total_steps,
            "train": self.cfg.to_dict(),
            "init": str(self.init) if self.init else None,
            "parameters": self.model.num_parameters() - lora.adapter_parameters(self.model),
            "counters": dict(self.counters),
        }
        if spec is not None:
            meta["lora"] = {
                **spec.to_dict(),
                "parameters": lora.adapter_parameters(self.model),
                "base": self.lora_base,
            }
        state = {
            "optimizer": self.opt.state_dict(),
            "step": step,
            "world_size": self.rt.world_size,
            "loader": [g["loader"] for g in gathered],
            "rng": [g["rng"] for g in gathered],
            "counters": dict(self.counters),
            "train": self.cfg.to_dict(),
        }
        # The family goes with the checkpoint (its tokenizer_config's chat_template), so chat,
        # eval, export and the next stage use the template this stage trained on.
        ck.save_checkpoint(
            path, self.model, meta, self.tokenizer_dir, state, self.tokenizer.chat_template
        )


def _plain(obj):
    """Loader states as plain Python (numpy scalars → int/float), for weights_only loading."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return obj.item()
    return obj


def default_dataset_factory(paths, tokenizer, kind: str = "text", **kw):
    """The loader of a data kind: packed token rows (text, chat) or preference pairs."""
    if kind == "pairs":
        from spongebob.dpo import PairDataset

        return PairDataset(paths, tokenizer, **kw)
    if kind == "prompts":
        from spongebob.grpo import RolloutDataset

        return RolloutDataset(paths, tokenizer, **kw)
    from spongebob.data import PackedDataset

    return PackedDataset(paths, tokenizer, kind=kind, **kw)


# --- where the weights come from -----------------------------------------------------------


def find_init(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint this stage starts from: --init, else the previous stage's final in the
    same run folder (falling back to earlier stages), else random weights for pretraining."""
    if cfg.init is not None:
        if cfg.init.lower() in ("none", "scratch", "random"):
            return None
        return ck.resolve_checkpoint(cfg.init)  # a run, stage or checkpoint dir, or an HF folder
    prev = STAGES[cfg.stage].init_from
    if prev is None:
        return None
    earlier = STAGE_ORDER[: STAGE_ORDER.index(prev) + 1]
    for stage in reversed(earlier):
        if ck.is_checkpoint(run_dir / stage / "final"):
            return run_dir / stage / "final"
    raise UserError(
        f"stage {cfg.stage} starts from the {prev} stage, but {run_dir} has no "
        f"{'/'.join(reversed(earlier))} final checkpoint; pass --init CKPT, or --init none to "
        "start from random weights"
    )


def _weights_source(cfg: TrainConfig, stage_dir: Path) -> tuple[Path | None, Path | None]:
    """(checkpoint to resume, checkpoint to initialise from); at most one is set."""
    if cfg.resume:
        if ck.is_checkpoint(stage_dir / "final"):
            raise UserError(f"{stage_dir} already finished (final/ exists); nothing to resume")
        resume = ck.latest_checkpoint(stage_dir)
        if resume is None:
            raise UserError(
                f"--resume: no checkpoint in {stage_dir / 'checkpoints'} to resume from"
            )
        return resume, None
    if ck.list_step_checkpoints(stage_dir / "checkpoints") or ck.is_checkpoint(stage_dir / "final"):
        raise UserError(
            f"{stage_dir} already holds checkpoints; pass --resume to continue that run, or "
            "choose another --out"
        )
    return None, find_init(cfg, stage_dir.parent)


def _tokenizer_dir(cfg: TrainConfig, src: Path | None) -> Path:
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else src
    if tok_dir is None:
        raise UserError("--tokenizer DIR is required when not starting from a checkpoint")
    if not (tok_dir / "tokenizer.json").is_file():
        raise UserError(f"{tok_dir}: no tokenizer.json")
    if src is not None and cfg.tokenizer and (src / "tokenizer.json").is_file():
        if (src / "tokenizer.json").read_bytes() != (tok_dir / "tokenizer.json").read_bytes():
            raise UserError(f"--tokenizer {tok_dir} differs from the tokenizer of {src}")
    return tok_dir


def _template(cfg: TrainConfig) -> str | None:
    return None if cfg.template == "auto" else cfg.template


def _model(cfg: TrainConfig, rt: Runtime, src: Path | None, tok_dir: Path, resumed: bool):
    """(model on the device in train mode, tokenizer, LoRA base reference or None): from `src`,
    or fresh from the preset. With --lora-rank, the weights of `src` are frozen and adapters
    added; resuming a LoRA checkpoint brings back its base and its (unmerged) adapters."""
    from spongebob import lora
    from spongebob.model import PRESETS, SpongeBob, preset
    from spongebob.tokenizer import load as load_tokenizer

    check_kernels(cfg.kernels, rt.device)
    seed_everything(cfg.seed)
    if cfg.lora_rank and src is None:
        raise UserError(
            f"--lora-rank trains adapters on existing weights, but stage {cfg.stage} starts from "
            "random ones here; pass --init CKPT"
        )
    if src is not None:
        loaded = ck.load(
            src,
            rt.device,
            tokenizer=tok_dir,
            template=_template(cfg),
            empty_think=cfg.empty_think,
            kernels=cfg.kernels,
            attention=cfg.attention,
            max_seq_len=cfg.seq_len,
            merge_lora=not resumed,
        )
        model, base = loaded.model, None
        if resumed:
            if lora.has_lora(model) != bool(cfg.lora_rank):
                was = "a LoRA" if lora.has_lora(model) else "a full-training"
                raise UserError(
                    f"--resume: {src} is {was} checkpoint; rerun the original command with "
                    "--resume (the same --lora-* flags)"
                )
            if cfg.lora_rank:
                ref = loaded.meta["lora"]["base"]
                base = {"path": ref["path"], "sha256": ref["sha256"]}
        elif cfg.lora_rank:
            base = ck.base_reference(loaded.path)
            lora.apply_lora(
                model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets
            )
        return model.train(), loaded.tokenizer, base
    if cfg.preset not in PRESETS:
        raise UserError(f"unknown --preset {cfg.preset!r}; known: {', '.join(PRESETS)}")
    tok = load_tokenizer(tok_dir, _template(cfg), cfg.empty_think)
    mcfg = preset(cfg.preset, vocab_size=tok.vocab_size)
    mcfg.max_seq_len = max(mcfg.max_seq_len, cfg.seq_len)
    model = SpongeBob(mcfg, kernels=cfg.kernels, attention=cfg.attention)
    return model.to(rt.device).train(), tok, None


# --- data ------------------------------------------------------------------------------------


def _check_files(paths: list[str], what: str) -> list[str]:
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"{what} file {p}: no such file")
    return [str(p) for p in paths]


def _loaders(cfg: TrainConfig, rt: Runtime, tok, factory: Callable):
    """(training loader, validation loader or None). `--val-split F` holds out documents inside
    the loader by a seeded hash of their index (contracts.md §3): nothing is written."""
    data = _check_files(cfg.data, "training")
    eval_paths = _check_files(cfg.eval_data, "eval")
    kw = dict(
        kind=cfg.kind,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=rt.rank,
        world_size=rt.world_size,
        think_weight=cfg.think_weight,
        cache_dir=cfg.cache_dir,
        on_bad_line=cfg.on_bad_line,
    )
    split = {"holdout": cfg.val_split} if cfg.val_split else {}
    # With a shared cache dir, rank 0 builds the token cache first; the others then open it.
    if rt.distributed and not rt.is_main and cfg.cache_dir:
        rt.barrier()
    ds = _build(factory, data, tok, **kw, **split)
    if rt.distributed and rt.is_main and cfg.cache_dir:
        rt.barrier()
    stats = ds.stats() if hasattr(ds, "stats") else {}
    if any((stats.get("skipped") or {}).values()) or stats.get("truncated"):
        rt.log(
            f"data: skipped bad lines {dict(stats.get('skipped') or {})}, "
            f"{stats.get('truncated', 0)} record(s) truncated at {cfg.seq_len + 1} tokens"
        )
    if len(ds) == 0:
        raise UserError("the training data gives no batches (too little data for one row?)")
    if cfg.val_split:
        val = _build(factory, data, tok, **kw, holdout=cfg.val_split, split="val")
    elif eval_paths:
        # Seed 0: the same rows as `spongebob eval` of that file (contracts.md §6).
        val = _build(factory, eval_paths, tok, **{**kw, "seed": 0})
    elif cfg.eval_every:
        raise UserError("--eval-every needs --eval-data FILE or --val-split F")
    else:
        val = None
    return ds, val


def _build(factory: Callable, paths: list[str], tok, **kw):
    """A loader; its refusals (bad data, a split without documents) become one-line errors."""
    from spongebob.data import DataFormatError

    try:
        return factory(paths, tok, **kw)
    except DataFormatError:
        raise
    except ValueError as e:
        raise UserError(str(e)) from None


# --- set-up ----------------------------------------------------------------------------------


def prepare(cfg: TrainConfig, rt: Runtime, factory: Callable | None = None) -> Stage:
    """Build (or restore) everything stage `cfg.stage` needs to run its first step."""
    import torch

    from spongebob import lora
    from spongebob.model import format_params
    from spongebob.step import build_optimizer

    stage_dir = Path(cfg.out) / cfg.stage
    resume, init = _weights_source(cfg, stage_dir)
    src = resume or init
    if cfg.kind in ("pairs", "prompts") and src is None:
        raise UserError(f"{cfg.stage} starts from a trained model: pass --init CKPT (not 'none')")
    tok_dir = _tokenizer_dir(cfg, src)
    model, tok, lora_base = _model(cfg, rt, src, tok_dir, resumed=resume is not None)
    if init is not None:
        rt.log(f"initialised from {init}")
    c = model.config
    n_adapter = lora.adapter_parameters(model)
    rt.log(
        f"stage {cfg.stage}: model {format_params(model.num_parameters() - n_adapter)} "
        f"parameters ({c.n_layers} layers, dim {c.dim}, {c.n_heads}/{c.n_kv_heads} heads, vocab "
        f"{c.vocab_size}), {rt.device}, {str(rt.dtype).removeprefix('torch.')}, world size "
        f"{rt.world_size}, kernels {model.ops.name}"
    )
    spec = lora.lora_spec(model)
    if spec is not None:
        rt.log(
            f"LoRA rank {spec.rank}, alpha {spec.alpha:g} on "
            f"{','.join(spec.targets)}: {format_params(n_adapter)} trainable parameters "
            f"({100 * n_adapter / model.num_parameters():.2f} %), base {lora_base['path']} frozen"
        )
    ds, val = _loaders(cfg, rt, tok, factory or default_dataset_factory)
    total = cfg.max_steps or max(1, cfg.epochs * len(ds) // cfg.accum)
    train_model: torch.nn.Module = torch.compile(model) if cfg.compile else model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [rt.device.index] if rt.device.type == "cuda" else None
        train_model = DDP(train_model, device_ids=ids)
    opt = build_optimizer(model, cfg, rt.device)
    st = Stage(cfg, rt, stage_dir, tok, tok_dir, model, train_model, opt, ds, val, total, init)
    st.lora_base = lora_base
    if cfg.kind == "pairs":
        _preferences(st, resume)
    elif cfg.kind == "prompts":
        _rollouts(st, resume)
    if resume is not None:
        _restore(st, resume)
    if rt.is_main:
        ck.clean_stale_temps(st.ckpt_root)
        ck.clean_stale_temps(stage_dir)
    return st


def _preferences(st: Stage, resume: Path | None) -> None:
    """DPO: the frozen reference is the model this stage started from. Its log-probs of every
    pair are computed once, before the first step (or read from OUT/dpo/reference_logps.pt), so
    no second model is held while training."""
    from spongebob.dpo import DPOLoss, count_pairs

    if resume is None:
        ref = st.model  # not trained yet: it is the starting model
    else:
        init = ck.read_meta(resume).get("init")
        if not init:
            raise UserError(f"{resume}: no starting checkpoint recorded, so no DPO reference")
        ref = ck.load(init, st.rt.device, kernels=st.cfg.kernels).model
    cache = st.dir / "reference_logps.pt" if st.rt.is_main else None
    for ds in (st.data, st.val):
        if ds is not None:
            n = ds.attach_reference(ref, cache)
            st.rt.log(f"DPO reference log-probs: {n} computed, {len(ds.pairs) - n} from the cache")
    st.loss_fn, st.count_fn, st.unit = (
        DPOLoss(st.cfg.dpo_beta, sft_weight=st.cfg.dpo_sft_weight),
        count_pairs,
        "pairs",
    )


def _starting_model(st: Stage, resume: Path | None):
    """A frozen copy of the weights this stage started from (for DPO and GRPO references)."""
    import copy

    if resume is None:
        ref = copy.deepcopy(st.model)
    else:
        init = ck.read_meta(resume).get("init")
        if not init:
            raise UserError(f"{resume}: no starting checkpoint recorded, so no reference model")
        ref = ck.load(init, st.rt.device, kernels=st.cfg.kernels).model
    return ref.eval().requires_grad_(False)


def _rollouts(st: Stage, resume: Path | None) -> None:
    """GRPO: the loaders sample from the policy being trained; with β > 0 a frozen copy of the
    starting model is the KL reference (a second model in memory, small next to the rollouts)."""
    from spongebob.grpo import GRPOLoss, RolloutConfig

    c = st.cfg
    ref = _starting_model(st, resume) if c.grpo_beta > 0 else None
    rc = RolloutConfig(
        group=c.grpo_group, max_new_tokens=c.grpo_max_new_tokens, temperature=c.grpo_temperature,
        top_p=c.grpo_top_p, beta=c.grpo_beta, rewards=tuple(c.rewards),
    )  # fmt: skip
    for ds in (st.data, st.val):
        if ds is not None:
            ds.bind(st.model, ref, rc)
    loss = GRPOLoss(clip_eps=c.grpo_clip, beta=c.grpo_beta)
    st.loss_fn, st.count_fn, st.unit = loss, loss.count, "completion_tokens"


def _restore(st: Stage, ckpt: Path) -> None:
    """Optimizer, loader position, RNG and counters of `ckpt`, refused if the run differs."""
    state = ck.load_train_state(ckpt)
    if state.get("world_size", 1) != st.rt.world_size:
        raise UserError(
            f"{ckpt} was written by {state.get('world_size')} process(es); resume it with "
            f"the same number (now {st.rt.world_size})"
        )
    saved = state.get("train", {})
    for key in RESUME_KEYS:
        if key in saved and saved[key] != getattr(st.cfg, key):
            raise UserError(
                f"--resume with a different {key} ({getattr(st.cfg, key)} vs {saved[key]} in "
                f"{ckpt}); rerun the original command with --resume"
            )
    st.opt.load_state_dict(state["optimizer"])
    try:
        st.data.load_state_dict(state["loader"][st.rt.rank])
    except ValueError as e:
        raise UserError(f"cannot resume from {ckpt}: {e}") from None
    set_rng_state(state["rng"][st.rt.rank])
    st.start_step = int(state["step"])
    st.counters.update({k: int(v) for k, v in state.get("counters", {}).items()})
    st.rt.log(f"resumed from {ckpt} at step {st.start_step}")
