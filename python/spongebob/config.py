"""Typed training configuration and the four stage presets (contracts.md §5).

A stage is data, not a script: `STAGES` holds what differs between pretraining, SFT, long SFT and
reasoning distillation (data kind, sequence length, epochs, batch, accumulation, learning rate,
think weight, which stage it starts from). `stage_config(stage, **overrides)` turns a preset plus
the user's flags into one `TrainConfig`, which is stored in every checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from spongebob.errors import UserError

STAGE_ORDER: tuple[str, ...] = ("pretrain", "sft", "sft-long", "distill")


@dataclass(frozen=True)
class StagePreset:
    """The tutorial's settings for one stage (RTX 4090, 24 GB)."""

    kind: str  # "text" (pretraining documents) or "chat" (conversations)
    seq_len: int
    epochs: int
    batch_size: int
    accum: int
    lr: float
    think_weight: float = 1.0
    init_from: str | None = None  # the stage whose final checkpoint this one starts from
    description: str = ""


STAGES: dict[str, StagePreset] = {
    "pretrain": StagePreset(
        kind="text", seq_len=512, epochs=2, batch_size=84, accum=2, lr=5e-4,
        description="next-token pretraining on {'text': ...} documents",
    ),
    "sft": StagePreset(
        kind="chat", seq_len=512, epochs=2, batch_size=84, accum=8, lr=5e-4,
        init_from="pretrain",
        description="supervised fine-tuning on conversations (sft_mini_512)",
    ),
    "sft-long": StagePreset(
        kind="chat", seq_len=1024, epochs=1, batch_size=28, accum=8, lr=5e-5,
        init_from="sft",
        description="long-context SFT at 1024 tokens",
    ),
    "distill": StagePreset(
        # Effective batch 24 × 25 = 600 sequences (the tutorial's ~600).
        kind="chat", seq_len=1024, epochs=1, batch_size=24, accum=25, lr=1e-6,
        think_weight=10.0, init_from="sft-long",
        description="R1-style reasoning distillation (<think>/<answer> tags weigh 10)",
    ),
}  # fmt: skip


@dataclass
class TrainConfig:
    """Everything one `spongebob train <stage>` run needs. Defaults come from the stage preset."""

    stage: str
    data: list[str]
    out: str
    tokenizer: str | None = None  # defaults to the init/resume checkpoint's tokenizer
    # data
    kind: str = "text"
    seq_len: int = 512
    think_weight: float = 1.0
    cache_dir: str | None = None
    on_bad_line: str = "error"
    # optimisation
    epochs: int = 1
    max_steps: int | None = None  # overrides the epoch-derived number of optimizer steps
    batch_size: int = 84  # sequences per micro-batch per rank
    accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr × this (MiniMind decays to lr/10)
    warmup: int = 0  # linear warm-up steps
    weight_decay: float = 0.1  # on matrices only, never on norms
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_bad_steps: int = 5  # this many non-finite steps in a row stop the run
    # model
    preset: str = "spongebob"
    init: str | None = None  # a checkpoint path, "none", or None = the previous stage's final
    kernels: str = "auto"
    attention: str = "auto"
    # runtime
    device: str = "auto"
    dtype: str = "auto"  # auto | bf16 | fp32 (fp16 is refused: it needs a scaler)
    compile: bool = False
    seed: int = 42
    # checkpoints
    save_every: int = 500
    keep: int = 3  # step checkpoints kept (0 = all); `final/` is always kept
    resume: bool = False
    # eval
    eval_data: list[str] = field(default_factory=list)
    eval_every: int = 0  # 0 = only at the end (when there is eval data)
    eval_batches: int = 100  # cap on eval batches per rank (0 = the whole eval set)
    val_split: float = 0.0
    # logging
    log_every: int = 10
    wandb: bool = False
    wandb_project: str = "spongebob"
    wandb_run: str | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise UserError(f"unknown stage {self.stage!r}; choose from {', '.join(STAGES)}")
        if self.kind not in ("text", "chat"):
            raise UserError(f"data kind must be text or chat, not {self.kind!r}")
        positive = ("seq_len", "epochs", "batch_size", "accum", "save_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError("--max-steps must be at least 1")
        if self.lr <= 0:
            raise UserError("--lr must be positive")
        if self.warmup < 0 or self.keep < 0 or self.eval_every < 0 or self.eval_batches < 0:
            raise UserError("--warmup, --keep, --eval-every and --eval-batches cannot be negative")
        if not 0.0 <= self.val_split < 1.0:
            raise UserError(f"--val-split must be in [0, 1), not {self.val_split}")
        if self.val_split and self.eval_data:
            raise UserError("give either --eval-data or --val-split, not both")
        if self.dtype not in ("auto", "bf16", "fp32"):
            hint = " (fp16 would need a loss scaler; use bf16)" if self.dtype == "fp16" else ""
            raise UserError(f"--dtype must be auto, bf16 or fp32, not {self.dtype!r}{hint}")
        if self.kernels not in ("auto", "torch", "triton"):
            raise UserError(f"--kernels must be auto, torch or triton, not {self.kernels!r}")
        if self.on_bad_line not in ("error", "skip"):
            raise UserError(f"--on-bad-line must be error or skip, not {self.on_bad_line!r}")
        if not self.data:
            raise UserError("no training data: pass --data FILE...")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def stage_config(stage: str, **overrides) -> TrainConfig:
    """The preset of `stage` with `overrides` (None values mean "keep the preset")."""
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    p = STAGES[stage]
    base = TrainConfig(
        stage=stage,
        data=[],
        out="",
        kind=p.kind,
        seq_len=p.seq_len,
        think_weight=p.think_weight,
        epochs=p.epochs,
        batch_size=p.batch_size,
        accum=p.accum,
        lr=p.lr,
    )
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown TrainConfig fields: {sorted(unknown)}")
    cfg = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    return cfg
