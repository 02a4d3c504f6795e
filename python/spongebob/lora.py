"""LoRA: low-rank adapters on frozen projections, for any training stage.

A targeted `nn.Linear` (weight W [out, in], no bias) becomes a `LoRALinear`

    y = x Wᵀ + scaling · B(A(dropout(x))),   A [r, in], B [out, r], scaling = alpha / r

with W frozen, A initialised like `nn.Linear` (Kaiming-uniform, a = √5) and B at zero, so a
fresh adapter leaves the model's output unchanged. This is PEFT's default LoRA (`use_rslora`
off, dropout on the input of A, no adapter bias). `merge_lora` folds it back:
W ← W + scaling · B·A, and the layer is a plain `nn.Linear` again.

Names follow PEFT so the adapter is a PEFT adapter: our `layers.N.self_attn.q_proj` is
`model.layers.N.self_attn.q_proj` in `LlamaForCausalLM`, whose adapter tensors PEFT saves as
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (and `lora_B.weight`) in
`adapter_model.safetensors`, next to `adapter_config.json`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from spongebob.config import LORA_TARGETS

ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's SAFETENSORS_WEIGHTS_NAME
ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's CONFIG_NAME
PEFT_PREFIX = "base_model.model.model."  # PeftModel → LlamaForCausalLM → LlamaModel


@dataclass(frozen=True)
class LoRASpec:
    """What `apply_lora` did: stored in a LoRA checkpoint's config.json under "lora"."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LoRASpec:
        return cls(
            rank=int(d["rank"]),
            alpha=float(d["alpha"]),
            dropout=float(d.get("dropout", 0.0)),
            targets=tuple(d.get("targets") or LORA_TARGETS),
        )


class LoRALinear(nn.Module):
    """A frozen bias-free linear layer plus a trainable low-rank update (module docstring).

    The frozen weight keeps the name `weight`, so the base model's state-dict keys do not
    change; the adapter adds `lora_A.weight` and `lora_B.weight` under the layer's name."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear wraps bias-free linear layers only")
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, not {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.weight = base.weight
        self.weight.requires_grad_(False)
        kw = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A: Kaiming-uniform with a = √5 (nn.Linear's default, and PEFT's); B: zeros."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight)
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling · B·A [out, in], computed in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` holding W + scaling · B·A."""
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=False,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        return lin

    def extra_repr(self) -> str:
        i, o = self.in_features, self.out_features
        return f"in={i}, out={o}, rank={self.rank}, alpha={self.alpha:g}"


def _targets(model: nn.Module, targets) -> list[tuple[nn.Module, str, str]]:
    """(parent module, child name, full name) of every module named like one of `targets`."""
    found = []
    for name, mod in model.named_modules():
        for child_name, _ in mod.named_children():
            if child_name in targets:
                found.append((mod, child_name, f"{name}.{child_name}" if name else child_name))
    return found


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets=LORA_TARGETS,
) -> nn.Module:
    """Freeze every parameter of `model` and wrap each targeted `nn.Linear` in a `LoRALinear`
    (in place; the adapters are created on the weights' device and dtype). Only the adapters'
    A and B train afterwards. Returns `model`, which remembers its `LoRASpec` as `lora_spec`."""
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters (merge them first)")
    spec = LoRASpec(int(rank), float(alpha), float(dropout), tuple(targets))
    found = _targets(model, spec.targets)
    if not found:
        raise ValueError(f"no module named {', '.join(spec.targets)} to adapt")
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, child_name, full in found:
        child = getattr(parent, child_name)
        if not isinstance(child, nn.Linear):
            raise ValueError(f"{full} is a {type(child).__name__}, not a linear layer")
        setattr(parent, child_name, LoRALinear(child, spec.rank, spec.alpha, spec.dropout))
    model.lora_spec = spec
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_spec(model: nn.Module) -> LoRASpec | None:
    return getattr(model, "lora_spec", None) if has_lora(model) else None


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's names (module docstring), detached, on the CPU."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            for part in ("lora_A", "lora_B"):
                w = getattr(mod, part).weight
                out[f"{PEFT_PREFIX}{name}.{part}.weight"] = w.detach().to("cpu").contiguous()
    return out


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights (PEFT names) into a model that `apply_lora` wrapped. Every adapter
    tensor must be there with its shape, and nothing else (a ValueError names the first
    difference)."""
    want = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            for part in ("lora_A", "lora_B"):
                want[f"{PEFT_PREFIX}{name}.{part}.weight"] = getattr(mod, part).weight
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise ValueError(f"adapter weights do not fit the model ({what})")
    with torch.no_grad():
        for k, p in want.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise ValueError(
                    f"adapter weights do not fit the model ({k}: {tuple(state[k].shape)} vs "
                    f"{tuple(p.shape)})"
                )
            p.copy_(state[k].to(p.dtype))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + scaling · B·A) and make the layer a plain
    `nn.Linear` again; every parameter trains again, as in a model loaded without LoRA."""
    for _, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                setattr(mod, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_spec"):
        del model.lora_spec
    return model


def adapter_parameters(model: nn.Module) -> int:
    """The adapters' parameters (A and B of every LoRALinear); 0 without LoRA."""
    return sum(
        m.lora_A.weight.numel() + m.lora_B.weight.numel()
        for m in model.modules()
        if isinstance(m, LoRALinear)
    )


def adapter_config(spec: LoRASpec, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json for `peft.PeftModel.from_pretrained` (PEFT's LoraConfig fields)."""
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    return {
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": spec.dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": spec.rank,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
        "target_modules": list(spec.targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
