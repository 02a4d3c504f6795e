"""Typed training configuration and the four stage presets (contracts.md §5).

A stage is data, not a script: `STAGES` holds what differs between pretraining, SFT, long SFT and
reasoning distillation (data kind, sequence length, epochs, batch, accumulation, learning rate,
think weight, which stage it starts from). `stage_config(stage, **overrides)` turns a preset plus
the user's flags into one `TrainConfig`, which is stored in every checkpoint.

Every `TrainConfig` field is declared once, with its type, default and help; the command line
(`add_config_args`) is derived from those declarations, so a new field is a new flag and the
help always shows the default a run would really use (the stage preset's where it has one).
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace

from spongebob.errors import UserError

STAGE_ORDER: tuple[str, ...] = ("pretrain", "sft", "sft-long", "distill", "dpo", "grpo")

# The projections `--lora-targets` may name (every linear layer of a block; spongebob.lora).
LORA_TARGETS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)  # fmt: skip


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
    "dpo": StagePreset(
        # MiniMind's train_dpo: lr 4e-8 and β 0.15 (--dpo-beta) on its 64M model.
        kind="pairs", seq_len=1024, epochs=1, batch_size=4, accum=1, lr=4e-8,
        init_from="distill",
        description="direct preference optimisation on {\"chosen\", \"rejected\"} pairs "
        "(dpo.jsonl) against the frozen starting model",
    ),
    "grpo": StagePreset(
        # Prompts per micro-batch × --grpo-group completions each; seq_len bounds prompt + reply.
        kind="prompts", seq_len=1024, epochs=1, batch_size=4, accum=1, lr=1e-6,
        init_from="dpo",
        description="GRPO with verifiable rewards on {\"conversations\", \"answer\"} prompts: "
        "group-normalised advantages, clipped ratio, k3 KL to the starting model",
    ),
}  # fmt: skip


def opt(default, help: str, *, flag: str | None = None, metavar: str | None = None) -> Field:
    """A TrainConfig field with its command-line help (and, rarely, its own flag name)."""
    meta = {"help": help, "flag": flag, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# Fields whose default comes from the stage preset (StagePreset has a field of the same name).
PRESET_FIELDS = ("kind", "seq_len", "epochs", "batch_size", "accum", "lr", "think_weight")


@dataclass
class TrainConfig:
    """Everything one `spongebob train <stage>` run needs. Defaults come from the stage preset."""

    stage: str = opt("pretrain", "the stage (a subcommand on the command line)")
    data: list[str] = opt([], "training jsonl file(s)", metavar="FILE")
    out: str = opt("", "run folder; the stage writes OUT/<stage>/", metavar="DIR")
    tokenizer: str | None = opt(
        None, "tokenizer folder (default: the init checkpoint's)", metavar="DIR"
    )
    template: str = opt(
        "auto", "chat template family: auto (the tokenizer folder's), minimind2 or chatml"
    )
    empty_think: str = opt(
        "keep", "chatml: a turn without reasoning keeps its empty think block (trained) or drops it"
    )
    # data
    kind: str = opt("text", "data: text, chat, pairs (DPO preferences) or prompts (GRPO)")
    seq_len: int = opt(512, "tokens per row")
    think_weight: float = opt(1.0, "loss weight of reasoning-tag tokens in assistant content")
    cache_dir: str | None = opt(
        None, "token cache folder (default: a temporary one)", metavar="DIR"
    )
    on_bad_line: str = opt("error", "bad jsonl lines: error, or skip and count them")
    # optimisation
    epochs: int = opt(1, "epochs")
    max_steps: int | None = opt(None, "optimizer steps (default: from the epochs)")
    batch_size: int = opt(84, "sequences per micro-batch per process")
    accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(5e-4, "peak learning rate")
    min_lr_ratio: float = opt(
        0.1, "final lr as a fraction of --lr (cosine; MiniMind decays to lr/10)"
    )
    warmup: int = opt(0, "linear warm-up steps")
    weight_decay: float = opt(0.1, "AdamW weight decay, on matrices only (never on norms)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "gradient-norm clip")
    max_bad_steps: int = opt(5, "stop after this many non-finite steps in a row")
    # model
    preset: str = opt("spongebob", "model preset for a fresh model (see spongebob.model.PRESETS)")
    init: str | None = opt(
        None,
        "checkpoint, stage or run folder to start from; 'none' = random weights "
        "(default: the previous stage's final in --out)",
        metavar="CKPT",
    )
    # LoRA (spongebob.lora): adapters on frozen weights; the checkpoint holds only them
    lora_rank: int = opt(0, "LoRA rank: train low-rank adapters on frozen weights; 0 = off")
    lora_alpha: float = opt(16.0, "LoRA alpha: the update is scaled by alpha / rank")
    lora_dropout: float = opt(0.0, "dropout on the input of the LoRA adapters")
    lora_targets: list[str] = opt(
        list(LORA_TARGETS),
        f"projections that get adapters (default all: {' '.join(LORA_TARGETS)})",
        metavar="NAME",
    )
    # runtime (never part of the model's config: contracts.md §4)
    kernels: str = opt("auto", "op set: auto (Triton on CUDA), torch or triton")
    attention: str = opt("auto", "packed-row attention: auto (FlexAttention on CUDA), sdpa or flex")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = opt("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32")
    compile: bool = opt(False, "torch.compile the model")
    seed: int = opt(42, "seed of the initialisation, the data order and the validation split")
    # checkpoints
    save_every: int = opt(500, "checkpoint every N optimizer steps")
    keep: int = opt(3, "step checkpoints to keep, 0 = all (final/ is always kept)")
    resume: bool = opt(False, "continue the run in --out exactly where it stopped")
    # evaluation
    eval_data: list[str] = opt([], "held-out jsonl file(s) for validation", metavar="FILE")
    eval_every: int = opt(0, "validate every N steps (0 = only at the end)")
    eval_batches: int = opt(100, "max validation batches per process, 0 = all")
    val_split: float = opt(0.0, "hold out this fraction of the training documents for validation")
    dpo_beta: float = opt(
        0.15, "DPO: β of the sigmoid loss (how far the policy may leave the reference)"
    )
    dpo_sft_weight: float = opt(
        0.0, "DPO: weight of an NLL term on the chosen replies (TRL's sigmoid + sft loss)"
    )
    grpo_group: int = opt(8, "GRPO: completions sampled per prompt (the group)")
    grpo_max_new_tokens: int = opt(256, "GRPO: the longest completion, in tokens")
    grpo_temperature: float = opt(1.0, "GRPO: sampling temperature of the rollouts")
    grpo_top_p: float = opt(
        1.0, "GRPO: sample the rollouts from the smallest set of tokens with this much probability"
    )
    grpo_beta: float = opt(0.04, "GRPO: weight of the k3 KL to the starting model (0 = none)")
    grpo_clip: float = opt(0.2, "GRPO: ε of the clipped ratio")
    rewards: list[str] = opt(
        ["arithmetic", "format"],
        "GRPO rewards, summed: arithmetic, format, or module:function / file.py:function",
        metavar="REWARD",
    )
    # logging
    log_every: int = opt(10, "metrics every N steps")
    wandb: bool = opt(False, "log to Weights & Biases (WANDB_MODE=offline works)")
    wandb_project: str = opt("spongebob", "wandb project")
    wandb_run: str | None = opt(None, "wandb run name (default: <out>-<stage>)")
    progress: bool = opt(True, "show a progress bar", flag="--no-progress")

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise UserError(f"unknown stage {self.stage!r}; choose from {', '.join(STAGES)}")
        choices = {
            "kind": ("text", "chat", "pairs", "prompts"),
            "kernels": ("auto", "torch", "triton"),
            "attention": ("auto", "sdpa", "flex"),
            "on_bad_line": ("error", "skip"),
            "template": ("auto", "minimind2", "chatml"),
            "empty_think": ("keep", "drop"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(
                    f"--{_dash(name)} must be {' or '.join(allowed)}, not {getattr(self, name)!r}"
                )
        positive = ("seq_len", "epochs", "batch_size", "accum", "save_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{_dash(name)} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError("--max-steps must be at least 1")
        if self.lr <= 0:
            raise UserError("--lr must be positive")
        if self.warmup < 0 or self.keep < 0 or self.eval_every < 0 or self.eval_batches < 0:
            raise UserError("--warmup, --keep, --eval-every and --eval-batches cannot be negative")
        if not 0.0 <= self.val_split < 1.0:
            raise UserError(f"--val-split must be in [0, 1), not {self.val_split}")
        if self.kind == "pairs" and self.val_split:
            raise UserError("--val-split is for documents; give preference pairs as --eval-data")
        if self.kind == "prompts" and self.val_split:
            raise UserError("--val-split is for documents; give GRPO prompts as --eval-data")
        if self.grpo_group < 2 or self.grpo_max_new_tokens < 1 or self.grpo_temperature <= 0:
            raise UserError(
                "--grpo-group must be at least 2, --grpo-max-new-tokens at least 1 and "
                "--grpo-temperature positive (a group needs different samples)"
            )
        if self.grpo_beta < 0 or not 0 < self.grpo_clip < 1:
            raise UserError("--grpo-beta cannot be negative and --grpo-clip must be in (0, 1)")
        if not 0 < self.grpo_top_p <= 1:
            raise UserError(f"--grpo-top-p must be in (0, 1], not {self.grpo_top_p}")
        if not self.rewards:
            raise UserError("--rewards needs at least one reward")
        if self.dpo_beta <= 0:
            raise UserError(f"--dpo-beta must be positive, not {self.dpo_beta}")
        if self.dpo_sft_weight < 0:
            raise UserError(f"--dpo-sft-weight cannot be negative, not {self.dpo_sft_weight}")
        if self.val_split and self.eval_data:
            raise UserError("give either --eval-data or --val-split, not both")
        if self.dtype not in ("auto", "bf16", "fp32"):
            hint = " (fp16 would need a loss scaler; use bf16)" if self.dtype == "fp16" else ""
            raise UserError(f"--dtype must be auto, bf16 or fp32, not {self.dtype!r}{hint}")
        self._validate_lora()
        if not self.data:
            raise UserError("no training data: pass --data FILE...")

    def _validate_lora(self) -> None:
        if isinstance(self.lora_rank, bool) or self.lora_rank < 0:
            raise UserError(f"--lora-rank must be 0 (off) or a positive rank, not {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise UserError(f"--lora-alpha must be positive, not {self.lora_alpha:g}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"--lora-dropout must be in [0, 1), not {self.lora_dropout:g}")
        if not self.lora_targets:
            raise UserError(f"--lora-targets needs at least one of {', '.join(LORA_TARGETS)}")
        for name in self.lora_targets:
            if name not in LORA_TARGETS:
                raise UserError(
                    f"--lora-targets: unknown projection {name!r}; choose from "
                    f"{', '.join(LORA_TARGETS)}"
                )
        if len(set(self.lora_targets)) != len(self.lora_targets):
            raise UserError(f"--lora-targets names a projection twice: {self.lora_targets}")

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
    base = TrainConfig(stage=stage, **{name: getattr(p, name) for name in PRESET_FIELDS})
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown TrainConfig fields: {sorted(unknown)}")
    cfg = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    return cfg


# --- the command line, derived from the fields ------------------------------------------------


def _dash(name: str) -> str:
    return name.replace("_", "-")


def _field_type(f: Field) -> tuple[type, bool]:
    """(element type, is a list) of a field's annotation, e.g. `list[str]` → (str, True)."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def add_config_args(parser: argparse.ArgumentParser, stage: str) -> None:
    """One flag per TrainConfig field (but `stage`, the subcommand). Every flag defaults to
    None, so `stage_config` keeps the preset's value for what the user did not set."""
    preset = STAGES[stage]
    for f in fields(TrainConfig):
        if f.name == "stage":
            continue
        typ, is_list = _field_type(f)
        default = getattr(preset, f.name) if f.name in PRESET_FIELDS else f.default
        if f.name == "init" and preset.init_from is None:
            help_text = "checkpoint, stage or run folder to start from (default: random weights)"
        elif f.name == "init":
            help_text = f.metadata["help"].replace(
                "the previous stage's", f"the {preset.init_from}"
            )
        else:
            help_text = f.metadata["help"]
        kw: dict = {"default": None, "dest": f.name}
        if typ is bool:
            flag = f.metadata.get("flag") or f"--{_dash(f.name)}"
            negative = flag.startswith("--no-")
            kw["action"] = "store_false" if negative else "store_true"
            parser.add_argument(
                flag, help=f"turn off: {help_text}" if negative else help_text, **kw
            )
            continue
        if is_list:
            kw["nargs"] = "+"
        elif f.default is not MISSING and default not in (None, "", []):
            help_text += (
                f" (default {default:g})"
                if isinstance(default, float)
                else (f" (default {default})")
            )
        if f.name in ("data", "out"):
            kw["required"] = True
        kw["type"] = typ
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        parser.add_argument(f"--{_dash(f.name)}", help=help_text, **kw)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = [f.name for f in fields(TrainConfig) if f.name != "stage"]
    return stage_config(args.stage, **{n: getattr(args, n, None) for n in names})
