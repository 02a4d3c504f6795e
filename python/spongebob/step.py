"""One optimizer step, shared by every stage (contracts.md §2, §5).

The order matters and is the same for any loss:

1. Count the trained tokens of all the step's micro-batches and all-reduce the count over the
   ranks: that is the normalizer Σ mᵢ, known before any backward pass, so accumulation
   4 × B/4 and 2 ranks × B/2 give the update of one batch of B.
2. A step whose micro-batches hold no trained token at all is skipped (no NaN).
3. Forward and backward each micro-batch (autocast from the Runtime), with DDP gradient sync
   only on the last one; the loss is multiplied by the world size, since DDP averages
   gradients and the global normalizer wants their sum.
4. Clip; if the loss or the gradient norm is not finite, the update is skipped.
5. The optimizer steps with the learning rate of the schedule.

A new stage (DPO, GRPO) passes its own `loss_fn` and `count_fn` and keeps everything else.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from spongebob.config import TrainConfig
    from spongebob.runtime import Runtime

Batch = dict  # the loader's batch: input_ids, labels, loss_weights, position_ids


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr × min_lr_ratio` at the last step."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, total_steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW with weight decay on matrices only (never on norms)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda",
    )


def lm_loss(model: torch.nn.Module, b: Batch, normalizer: torch.Tensor) -> torch.Tensor:
    """Σ wᵢ·ceᵢ / normalizer of one loader batch (through `forward`, so DDP syncs)."""
    return model(
        b["input_ids"],
        b["position_ids"],
        labels=b["labels"],
        loss_weights=b["loss_weights"],
        normalizer=normalizer,
    )


def count_trained(batches: Sequence[Batch]) -> tuple[int, int]:
    """(trained tokens, all tokens) of this rank's micro-batches."""
    trained = sum(int((b["labels"] != -100).sum()) for b in batches)
    return trained, sum(b["input_ids"].numel() for b in batches)


def forward_backward(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    normalizer: torch.Tensor,
    rt: Runtime,
    loss_fn: Callable = lm_loss,
) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step; return this rank's summed loss."""
    import torch

    loss_sum = torch.zeros((), dtype=torch.float32, device=rt.device)
    for i, b in enumerate(batches):
        last = i == len(batches) - 1
        sync = model.no_sync() if rt.distributed and not last else contextlib.nullcontext()
        b = {k: v.to(rt.device, non_blocking=True) for k, v in b.items()}
        with sync:
            with rt.autocast():
                loss = loss_fn(model, b, normalizer)
            (loss * rt.world_size).backward()
        loss_sum += loss.detach().float()
    return loss_sum


@dataclass
class StepResult:
    """What one optimizer step did. `loss` and `grad_norm` are None when it was skipped."""

    trained_tokens: int  # over all ranks
    tokens: int  # over all ranks, padding included
    loss: float | None = None
    grad_norm: float | None = None
    skipped: str | None = None  # None | "empty" (no trained token) | "nonfinite"


def optimizer_step(
    model: torch.nn.Module,
    params: list,
    opt,
    batches: Sequence[Batch],
    lr: float,
    grad_clip: float,
    rt: Runtime,
    loss_fn: Callable = lm_loss,
    count_fn: Callable = count_trained,
) -> StepResult:
    """Steps 1–5 of the module docstring over the micro-batches of one optimizer step."""
    import torch

    local = torch.tensor(count_fn(batches), dtype=torch.float64)
    counts = rt.all_reduce_sum(local.to(rt.device)).cpu()
    res = StepResult(trained_tokens=int(counts[0]), tokens=int(counts[1]))
    for g in opt.param_groups:
        g["lr"] = lr
    if res.trained_tokens == 0:
        res.skipped = "empty"
        return res
    normalizer = torch.tensor(float(res.trained_tokens), dtype=torch.float32, device=rt.device)
    loss_sum = rt.all_reduce_sum(forward_backward(model, batches, normalizer, rt, loss_fn))
    gn = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if bool(torch.isfinite(loss_sum) & torch.isfinite(gn)):
        opt.step()
        res.loss, res.grad_norm = loss_sum.item(), gn.item()
    else:
        res.skipped = "nonfinite"
    opt.zero_grad(set_to_none=True)
    return res
