"""Rotary position embedding in Triton: forward, backward and the autograd wrapper `apply_rope`.

Same contract as `reference.apply_rope`: q [B, T, Hq, D] and k [B, T, Hk, D] (Hq ≠ Hk under
GQA), fp32 cos/sin tables [max_pos, D] in the Hugging Face `rotate_half` layout, and
`position_ids` [B, T] that restart at 0 for each document packed into a row.

With x = [x₁, x₂] split into halves and the table rows c = [c₁, c₂], s = [s₁, s₂]:

    forward   y₁ = x₁·c₁ − x₂·s₁          y₂ = x₂·c₂ + x₁·s₂
    backward  dx₁ = dy₁·c₁ + dy₂·s₂       dx₂ = dy₂·c₂ − dy₁·s₁

(the transpose of the forward map; with the usual table, c₁ = c₂ and s₁ = s₂, it is the rotation
by −angle). Both halves of the tables are read, so any table gives exactly the reference's math.

Design notes:

* One program per token (b, t): it looks up that token's position once, loads its cos/sin row
  once, and rotates every q head and every k head of the token in one [heads, D/2] tile each.
  Positions come from `position_ids`, never from t, which is what makes packed rows correct.
* Out-of-place, like the reference: q and k may be views that autograd still needs.
* Inputs may be strided views (e.g. a split of a fused qkv projection); only the head dim must
  be contiguous. Outputs are fresh contiguous [B, T, H, D] tensors.
* Loads are cast to fp32 at once; math in fp32; stores in the input dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["apply_rope"]


@triton.jit
def _rotate_heads(
    SRC,
    DST,
    src_off,
    dst_off,
    stride_src_h,
    stride_dst_h,
    n_heads,
    half,
    c1,
    c2,
    s1,
    s2,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (heads < n_heads)[:, None] & (d < half)[None, :]
    src = SRC + src_off + heads[:, None] * stride_src_h + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1[None, :] + x2 * s2[None, :]
        y2 = x2 * c2[None, :] - x1 * s1[None, :]
    else:
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
    dst = DST + dst_off + heads[:, None] * stride_dst_h + d[None, :]
    tl.store(dst, y1.to(DST.dtype.element_ty), mask=mask)
    tl.store(dst + half, y2.to(DST.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q,
    K,
    Q_OUT,
    K_OUT,
    COS,
    SIN,
    POS,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_pb,
    stride_pt,
    stride_cos,
    stride_sin,
    seq_len,
    n_q_heads,
    n_k_heads,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    t = token % seq_len
    pos = tl.load(POS + b * stride_pb + t * stride_pt).to(tl.int64)

    d = tl.arange(0, BLOCK_D)
    d_mask = d < half
    cos_row = COS + pos * stride_cos
    sin_row = SIN + pos * stride_sin
    c1 = tl.load(cos_row + d, mask=d_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + half + d, mask=d_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + d, mask=d_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + half + d, mask=d_mask, other=0.0).to(tl.float32)

    # Outputs are contiguous [B*T, H, D]: token offset = token * H * D, head stride = D.
    _rotate_heads(
        Q, Q_OUT, b * stride_qb + t * stride_qt, token * n_q_heads * 2 * half,
        stride_qh, 2 * half, n_q_heads, half, c1, c2, s1, s2,
        BLOCK_H=BLOCK_HQ, BLOCK_D=BLOCK_D, BACKWARD=BACKWARD,
    )  # fmt: skip
    _rotate_heads(
        K, K_OUT, b * stride_kb + t * stride_kt, token * n_k_heads * 2 * half,
        stride_kh, 2 * half, n_k_heads, half, c1, c2, s1, s2,
        BLOCK_H=BLOCK_HK, BLOCK_D=BLOCK_D, BACKWARD=BACKWARD,
    )  # fmt: skip


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor,
    backward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch one pass (forward rotation or its transpose) over q and k."""
    batch, seq_len, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[2]
    q = _unit_last_stride(q)
    k = _unit_last_stride(k)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    n_tokens = batch * seq_len
    if n_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    block_hq = triton.next_power_of_2(n_q_heads)
    block_hk = triton.next_power_of_2(n_k_heads)
    block_d = triton.next_power_of_2(half)
    tile = (block_hq + block_hk) * block_d
    num_warps = 2 if tile <= 512 else 4 if tile <= 2048 else 8
    _rope_kernel[(n_tokens,)](
        q, k, q_out, k_out, cos, sin, position_ids,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        position_ids.stride(0), position_ids.stride(1),
        cos.stride(0), sin.stride(0),
        seq_len, n_q_heads, n_k_heads, half,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d, BACKWARD=backward,
        num_warps=num_warps,
    )  # fmt: skip
    return q_out, k_out


class _RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):
        q_out, k_out = _rope(q, k, cos, sin, position_ids, backward=False)
        ctx.save_for_backward(cos, sin, position_ids)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin, position_ids = ctx.saved_tensors
        dq, dk = _rope(dq_out, dk_out, cos, sin, position_ids, backward=True)
        return dq, dk, None, None, None


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, T, Hq, D] and k [B, T, Hk, D] at `position_ids` [B, T] (restarting per
    document in packed rows). cos/sin are the fp32 tables [max_pos, D] of `rope_cache`.

    Positions must lie in [0, max_pos): they are not bounds-checked on the device (that
    would need a host sync).
    """
    if not q.is_cuda and not _interpreting():
        raise RuntimeError(
            "spongebob.kernels.rope needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
            "testing); use kernels='torch' on CPU"
        )
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError("apply_rope: q and k must be [B, T, H, D]")
    batch, seq_len, _, head_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != seq_len or k.shape[3] != head_dim:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} disagree")
    if head_dim % 2:
        raise ValueError(f"apply_rope: head dim {head_dim} must be even")
    if cos.shape[-1] != head_dim or sin.shape != cos.shape:
        raise ValueError(f"apply_rope: tables {tuple(cos.shape)} for head dim {head_dim}")
    cos = _unit_last_stride(cos)
    sin = _unit_last_stride(sin)
    # [1, T] or [T] positions broadcast over the batch like in the reference (stride 0).
    position_ids = position_ids.expand(batch, seq_len)
    return _RoPEFunction.apply(q, k, cos, sin, position_ids)
