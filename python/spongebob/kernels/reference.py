"""PyTorch reference ops: the CPU path of the model and the ground truth for the kernels.

Signatures are the contract the Triton versions implement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """y = x / sqrt(mean(x²) + eps) * weight, statistics in fp32, result in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rope_cache(
    head_dim: int, max_pos: int, theta: float = 1e6, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_pos, head_dim] in the HF `rotate_half` layout (halves repeated)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos, device=device).float(), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, T, Hq, D] and k [B, T, Hk, D] at `position_ids` [B, T] (restarting per
    document in packed rows). cos/sin are the fp32 tables of `rope_cache`."""
    c = cos[position_ids].unsqueeze(2)  # [B, T, 1, D]
    s = sin[position_ids].unsqueeze(2)
    qf, kf = q.float(), k.float()
    q_out = qf * c + rotate_half(qf) * s
    k_out = kf * c + rotate_half(kf) * s
    return q_out.to(q.dtype), k_out.to(k.dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_weights: torch.Tensor,
    normalizer: torch.Tensor,
) -> torch.Tensor:
    """Σ wᵢ·ceᵢ / normalizer over rows (contracts.md §2), logits = hidden @ weightᵀ in fp32.

    hidden [N, C], weight [V, C], labels [N] (−100 = ignored), loss_weights [N] float32,
    normalizer a scalar tensor (Σ mᵢ over the whole optimizer step; no host sync needed).
    """
    logits = (hidden @ weight.t()).float()
    ce = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    w = torch.where(labels == -100, torch.zeros_like(loss_weights), loss_weights)
    return (ce * w).sum() / normalizer
