"""RMSNorm in Triton: forward, backward (dX and dW), and the autograd wrapper `rms_norm`.

Same contract as `reference.rms_norm`: x [..., C] with any leading dims, statistics in fp32,
result in x's dtype, y = x * rsqrt(mean(x²) + eps) * weight.

Design notes (why it looks like this):

* Each program normalises a tile of BLOCK_M rows × the whole row (BLOCK_C ≥ C). At this
  model's width (C = 512) one row is only 1 KB in bf16, far too little work for a program, so
  several rows share one; the row length still fits in registers, so each element is read once.
* The forward stores rstd (one fp32 per row) so the backward never recomputes the reduction.
* dW = Σ_rows dy · x̂ is a reduction over all rows. Atomics would make it non-deterministic
  (and bf16 atomics fail in the interpreter), so the backward runs a fixed number of persistent
  programs that walk row tiles with a fixed stride, each writing an fp32 partial sum of its
  rows; the partials are then summed by torch. Fixed grid + fixed order = bit-reproducible.
* Every load is cast to fp32 at once (the Triton interpreter computes bf16 arithmetic wrongly)
  and every load is masked (the interpreter does not catch out-of-bounds reads).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["rms_norm"]

# Largest row length handled in one tile; wider rows would spill registers (the model has 512).
_MAX_FUSED_COLS = 65536


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    W,
    Y,
    RSTD,
    stride_x,
    stride_y,
    n_rows,
    n_cols,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)

    mean_sq = tl.sum(x * x, axis=1) / n_cols
    rstd = tl.rsqrt(mean_sq + eps)
    # Same order as the reference: normalise first, then scale by the weight.
    y = (x * rstd[:, None]) * w[None, :]

    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dx = rstd · (w·dy − x̂ · mean(w·dy·x̂)),  dW partial of this program = Σ dy · x̂."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)

    n_tiles = tl.cdiv(n_rows, BLOCK_M)
    for tile in range(pid, n_tiles, n_programs):
        rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)

        x_hat = x * rstd[:, None]
        w_dy = dy * w[None, :]
        proj = tl.sum(w_dy * x_hat, axis=1) / n_cols
        dx = (w_dy - x_hat * proj[:, None]) * rstd[:, None]
        tl.store(
            DX + rows[:, None] * stride_dx + cols[None, :],
            dx.to(DX.dtype.element_ty),
            mask=mask,
        )
        # Masked rows and columns load as 0, so they add nothing here.
        dw_acc += tl.sum(dy * x_hat, axis=0)

    tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=col_mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and not _interpreting():
        raise RuntimeError(
            "spongebob.kernels.rmsnorm needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
            "testing); use kernels='torch' on CPU"
        )


def _launch_config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps): about 4K elements per program, whole rows per tile."""
    block_c = triton.next_power_of_2(n_cols)
    if block_c > _MAX_FUSED_COLS:
        raise ValueError(f"rms_norm: rows of {n_cols} elements exceed {_MAX_FUSED_COLS}")
    block_m = max(1, min(4096 // block_c, triton.next_power_of_2(max(n_rows, 1))))
    elements = block_m * block_c
    num_warps = 4 if elements <= 2048 else 8 if elements <= 8192 else 16
    return block_m, block_c, num_warps


def _num_persistent_programs(device: torch.device, n_tiles: int) -> int:
    """Programs of the backward: a few per SM on a GPU, a handful in the interpreter."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_tiles, 4 * sms))
    return max(1, min(n_tiles, 4))


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """[..., C] → [M, C] with unit column stride (a view whenever possible)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        _check_device(x)
        n_cols = x.shape[-1]
        if weight.shape != (n_cols,):
            raise ValueError(f"rms_norm: weight {tuple(weight.shape)} for rows of {n_cols}")
        x2 = _as_rows(x, n_cols)
        weight = weight.contiguous()
        n_rows = x2.shape[0]
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
        block_m, block_c, num_warps = _launch_config(n_rows, n_cols)
        if n_rows > 0:
            grid = (triton.cdiv(n_rows, block_m),)
            _rms_norm_fwd_kernel[grid](
                x2, weight, y, rstd,
                x2.stride(0), y.stride(0),
                n_rows, n_cols, eps,
                BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
            )  # fmt: skip
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = _as_rows(dy, n_cols)
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
        block_m, block_c, num_warps = _launch_config(n_rows, n_cols)
        n_tiles = triton.cdiv(n_rows, block_m)
        n_programs = _num_persistent_programs(x2.device, n_tiles)
        dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x2.device)
        if n_rows > 0:
            _rms_norm_bwd_kernel[(n_programs,)](
                dy2, x2, weight, rstd, dx, dw_partial,
                dy2.stride(0), x2.stride(0), dx.stride(0),
                n_rows, n_cols,
                BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
            )  # fmt: skip
            dw = dw_partial.sum(0)
        else:
            dw = torch.zeros((n_cols,), dtype=torch.float32, device=x2.device)
        return dx.view(ctx.x_shape), dw.to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """y = x / sqrt(mean(x²) + eps) * weight over the last dim; fp32 statistics, x's dtype."""
    return _RMSNormFunction.apply(x, weight, float(eps))
