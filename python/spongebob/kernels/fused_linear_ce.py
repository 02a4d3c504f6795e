"""Fused linear + cross-entropy: from hidden states and the (tied) output weight to the loss,
without materialising the [rows, vocab] logits. Exported as `linear_cross_entropy`.

Same contract as `reference.linear_cross_entropy`:

    loss = Σᵢ wᵢ · ceᵢ / normalizer,   ceᵢ = logsumexp(hᵢ Wᵀ) − (hᵢ Wᵀ)[labelᵢ]

with labels −100 ignored (their rows give loss 0 and gradient 0), per-token weights wᵢ
(contracts.md §2: the reasoning tags weigh more) and a normalizer that is a 0-dim
tensor (Σ mᵢ over the whole optimizer step), used on the device so there is no host sync.

How (the Liger-Kernel scheme, written for this project):

* Rows are processed in chunks. For each chunk, cuBLAS computes the chunk's logits
  [n, V] into one reused buffer; a Triton kernel (one program per row) reads a row, takes its
  log-sum-exp in fp32 with an online max, writes the row's weighted loss, and overwrites the
  logits in place with the gradient of the loss with respect to them,
  (softmax − onehot) · wᵢ / normalizer. Two more matmuls turn that into this chunk's rows of
  grad_hidden and its contribution to grad_weight. Peak extra memory is one chunk of logits
  plus the two gradients, instead of the full logits, their fp32 copy and their gradient.
* The gradient is therefore computed in the forward pass and stored; backward only scales it
  by grad_output (a tensor multiply, no `grad_output == 1` check: that would be a host sync).
* Chunk size is Liger's rule: next_pow2(cdiv(N, cdiv(V, C))), so a chunk of logits is about
  the size of the hidden states (4096 rows at N = 84·512, V = 6400, C = 512).
* grad_weight accumulates in fp32 across chunks (Liger accumulated it in bf16 and training
  diverged: Liger #512, #827); on CUDA each chunk's product is produced in fp32 by cuBLAS.
* The true-class gradient p − 1 is computed in fp32 as −(mass of the other classes) / (total)
  before the single store: never from a stored bf16 probability (Liger's bf16 bug: 100 %
  error at p = 0.999), and without the cancellation of p − 1 in fp32 either.
* Under autocast the matmuls run in the autocast dtype, as the reference's `hidden @ weight.t()`
  does; otherwise in the promoted dtype of hidden and weight. The CE math is always fp32.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["chunk_rows", "linear_cross_entropy"]

IGNORE_INDEX = -100


@triton.jit
def _log1p(r):
    """log(1 + r) for 0 ≤ r ≤ 1, accurate to a few fp32 ulps of the result, no libdevice.

    Small r (the confident rows): the series r − r²/2 + r³/3 − r⁴/4 + r⁵/5, whose truncation
    error is < r⁶/6, i.e. < 2e-10 relative for r < 1/64. Otherwise Kahan's trick: u = 1 + r
    is rounded, but log(u) · r / (u − 1) cancels that rounding. Neither leans on the absolute
    accuracy of `log` near 1, which may be an approximate instruction on the GPU.
    """
    series = r * (1.0 - r * (0.5 - r * (1.0 / 3.0 - r * (0.25 - r * 0.2))))
    u = 1.0 + r
    denom = tl.where(u == 1.0, 1.0, u - 1.0)
    kahan = tl.log(u) * (r / denom)
    return tl.where(r < 0.015625, series, kahan)


@triton.jit
def _ce_rows_kernel(
    LOGITS,
    LABELS,
    LOSS_WEIGHTS,
    NORMALIZER,
    ROW_LOSS,
    stride_logits,
    n_vocab,
    ignore_index,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    """One row: row_loss = w·(lse − z[label]); logits ← (softmax − onehot)·w/normalizer.

    Written for confident predictions (p = p(label) → 1), where the naive forms lose
    everything: p − 1 from a rounded p, or lse = max + log(1 + ε) rounded at the size of a
    logit. The row sum is therefore kept as s = e_t + s_other, with s_other the exp-sum of
    every *other* class, so that
        p − 1 = −s_other / s              (no cancellation)
        loss  = log1p(s_other / e_t)      (when p ≥ 1/2; the plain lse form otherwise)
    with e_t = exp(z[label] − max).
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_logits
    label = tl.load(LABELS + row).to(tl.int64)
    weight = tl.load(LOSS_WEIGHTS + row).to(tl.float32)
    active = label != ignore_index
    cols = tl.arange(0, BLOCK_V)
    zero = tl.full((), 0.0, tl.float32)

    # Pass 1: online max and sum of exp over all classes but the label, in fp32.
    run_max = tl.full((), float("-inf"), tl.float32)
    sum_other = tl.full((), 0.0, tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        offs = start + cols
        z = tl.load(row_ptr + offs, mask=offs < n_vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(z, axis=0))
        e = tl.where(offs == label, 0.0, tl.exp(z - new_max))
        sum_other = sum_other * tl.exp(run_max - new_max) + tl.sum(e, axis=0)
        run_max = new_max

    z_label = tl.load(row_ptr + label, mask=active, other=0.0).to(tl.float32)
    shifted_label = z_label - run_max  # ≤ 0
    e_label = tl.where(active, tl.exp(shifted_label), zero)
    total = sum_other + e_label
    log_total = tl.log(total)
    # ratio = (1 − p) / p; the log1p form is used while p ≥ 1/2 (then e_label ≥ 1/2 > 0).
    confident = sum_other <= e_label
    ratio = sum_other / tl.where(confident, e_label, 1.0)
    ce = tl.where(confident, _log1p(ratio), log_total - shifted_label)
    row_loss = tl.where(active, weight * ce, zero)
    tl.store(ROW_LOSS + row, row_loss)

    if WRITE_GRAD:
        # Ignored rows get scale 0 (not 0 · something), so their gradient is exactly 0.
        normalizer = tl.load(NORMALIZER).to(tl.float32)
        scale = tl.where(active, weight / normalizer, zero)
        label_grad = -sum_other / total
        for start in range(0, n_vocab, BLOCK_V):
            offs = start + cols
            mask = offs < n_vocab
            z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp((z - run_max) - log_total)
            grad = tl.where(offs == label, label_grad, p) * scale
            tl.store(row_ptr + offs, grad.to(LOGITS.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def chunk_rows(n_rows: int, vocab: int, hidden: int) -> int:
    """Liger's chunk rule: a chunk of logits [chunk, V] is about as big as hidden [N, C]."""
    if n_rows <= 0:
        return 1
    return triton.next_power_of_2(triton.cdiv(n_rows, triton.cdiv(vocab, hidden)))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


@functools.cache
def _cuda_mm_has_out_dtype() -> bool:
    """torch ≥ 2.8 lets cuBLAS write a bf16 × bf16 product straight to fp32."""
    try:
        a = torch.zeros((1, 1), dtype=torch.bfloat16, device="cuda")
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, the product accumulated and returned in fp32 whatever a's dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _cuda_mm_has_out_dtype():
        acc += torch.mm(a, b, out_dtype=torch.float32)
    else:  # CPU (interpreter tests) or old torch: upcast the operands instead.
        acc.addmm_(a.float(), b.float())


def _block_v(n_vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 2048-wide strips, 8 warps → 8 fp32 per thread per strip."""
    block_v = min(2048, triton.next_power_of_2(n_vocab))
    return block_v, 8 if block_v >= 2048 else 4


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        loss_weights: torch.Tensor,
        normalizer: torch.Tensor,
        need_grad_hidden: bool,
        need_grad_weight: bool,
        chunk_size: int | None,
    ) -> torch.Tensor:
        n_rows, n_hidden = hidden.shape
        n_vocab = weight.shape[0]
        device = hidden.device
        cdtype = _compute_dtype(hidden, weight)
        write_grad = need_grad_hidden or need_grad_weight

        labels = labels.contiguous()
        loss_weights = loss_weights.contiguous()
        normalizer = normalizer.to(device=device).reshape(())
        w_c = weight.to(cdtype)
        row_loss = torch.empty((n_rows,), dtype=torch.float32, device=device)
        grad_hidden = (
            torch.empty((n_rows, n_hidden), dtype=hidden.dtype, device=device)
            if need_grad_hidden
            else None
        )
        grad_weight = (
            torch.zeros((n_vocab, n_hidden), dtype=torch.float32, device=device)
            if need_grad_weight
            else None
        )

        chunk = chunk_size or chunk_rows(n_rows, n_vocab, n_hidden)
        chunk = max(1, min(chunk, n_rows))
        logits_buf = torch.empty((chunk, n_vocab), dtype=cdtype, device=device)
        block_v, num_warps = _block_v(n_vocab)

        # The matmuls run in cdtype explicitly; autocast must not re-cast them.
        with torch.autocast(device.type, enabled=False):
            for start in range(0, n_rows, chunk):
                end = min(start + chunk, n_rows)
                n = end - start
                h = hidden[start:end].to(cdtype)
                logits = logits_buf[:n]
                torch.mm(h, w_c.t(), out=logits)
                _ce_rows_kernel[(n,)](
                    logits, labels[start:end], loss_weights[start:end], normalizer,
                    row_loss[start:end],
                    logits.stride(0), n_vocab, IGNORE_INDEX,
                    BLOCK_V=block_v, WRITE_GRAD=write_grad, num_warps=num_warps,
                )  # fmt: skip
                # `logits` now holds d loss / d logits for this chunk.
                if grad_hidden is not None:
                    if grad_hidden.dtype == cdtype:
                        torch.mm(logits, w_c, out=grad_hidden[start:end])
                    else:
                        grad_hidden[start:end] = logits @ w_c
                if grad_weight is not None:
                    _accumulate_fp32(grad_weight, logits.t(), h)

        loss = row_loss.sum() / normalizer
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.has_grad = (grad_hidden is not None, grad_weight is not None)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        saved = list(ctx.saved_tensors)
        has_h, has_w = ctx.has_grad
        grad_hidden = saved.pop(0) * grad_output if has_h else None
        grad_weight = saved.pop(0) * grad_output if has_w else None
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_weights: torch.Tensor,
    normalizer: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Σ wᵢ·ceᵢ / normalizer over rows (contracts.md §2), logits = hidden @ weightᵀ, CE in fp32.

    hidden [N, C], weight [V, C] (tied embedding), labels [N] int64 (−100 = ignored),
    loss_weights [N] float32, normalizer a 0-dim tensor (keep it > 0: like the reference, 0
    gives NaN). `chunk_size` (rows per chunk) overrides Liger's rule; tests use it.
    Labels other than −100 must lie in [0, V): they are not checked on the device.
    """
    if not hidden.is_cuda and not _interpreting():
        raise RuntimeError(
            "spongebob.kernels.fused_linear_ce needs CUDA tensors (or TRITON_INTERPRET=1 "
            "for CPU testing); use kernels='torch' on CPU"
        )
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
            f"{tuple(weight.shape)} must be [N, C] and [V, C]"
        )
    n_rows = hidden.shape[0]
    if labels.shape != (n_rows,) or loss_weights.shape != (n_rows,):
        raise ValueError("linear_cross_entropy: labels and loss_weights must be [N]")
    if not torch.is_tensor(normalizer):
        normalizer = torch.tensor(float(normalizer), device=hidden.device)
    grad_on = torch.is_grad_enabled()
    return _LinearCrossEntropyFunction.apply(
        hidden,
        weight,
        labels,
        loss_weights,
        normalizer,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        chunk_size,
    )
