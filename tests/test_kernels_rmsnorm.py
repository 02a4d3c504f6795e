"""Triton RMSNorm against the PyTorch reference (CPU: TRITON_INTERPRET=1; GPU: unchanged)."""

from __future__ import annotations

import pytest
import torch

# kernel_utils turns on TRITON_INTERPRET on CPU; it must be imported before the kernels.
from kernel_utils import BF16_ELEMENTWISE, DEVICE, FP32, assert_close, cases
from spongebob.kernels import reference, rmsnorm

# Shapes: 123 rows of 96 (odd row count, non-power-of-2 width: masked rows and columns),
# [2, 7, 512] (the model's width, leading dims; 16 row tiles so the backward's persistent
# programs walk several tiles each), and one row.
SHAPES = [(123, 96), (2, 7, 512), (1, 96)]
# On a GPU also the training shapes [B, T, dim]: pretrain/SFT 84 × 512 and long SFT 28 × 1024.
# y and dx are per-row math, so their tolerances do not depend on the row count; dW sums
# 43,008 or 28,672 rows in fp32 on both sides (tree sums), ~1e-6 of its largest entry, within
# the 1e-5 (fp32) and the bf16 output's one-rounding bounds below.
TRAINING_SHAPES = [(84, 512, 512), (28, 1024, 512)]

# bf16 gradients: dx is computed in fp32 from the same bf16 inputs on both sides and rounded
# once (same reason as BF16_ELEMENTWISE), but it is a difference of two terms, so near-zero
# elements get an absolute slack of 2 ulps of the row's typical magnitude (~1 → 2⁻⁶·0.5).
BF16_DX = {"rtol": 2**-6, "atol": 1e-2}
# dW is a sum over rows accumulated in fp32 on both sides, rounded once to bf16.
BF16_DW = {"rtol": 2**-6, "atol": 1e-2}


def _inputs(shape, dtype, weight_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0 + 0.5
    w = 1.0 + 0.3 * torch.randn(shape[-1], generator=g)
    dy = torch.randn(shape, generator=g)
    x = x.to(DEVICE, dtype)
    w = w.to(DEVICE, weight_dtype or dtype)
    return x, w, dy.to(DEVICE, dtype)


def _run(fn, x, w, dy, eps=1e-5):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, eps)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("shape", cases(SHAPES, TRAINING_SHAPES))
def test_rmsnorm_forward_backward_matches_reference_fp32(shape):
    x, w, dy = _inputs(shape, torch.float32)
    y, dx, dw = _run(rmsnorm.rms_norm, x, w, dy)
    y_ref, dx_ref, dw_ref = _run(reference.rms_norm, x, w, dy)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, y_ref, **FP32)
    assert_close(dx, dx_ref, **FP32)
    # dW sums up to 123 rows: relative to its largest entry the slack stays at ~1e-6.
    assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5 * dw_ref.abs().max().item())


@pytest.mark.parametrize("shape", cases(SHAPES[:2], TRAINING_SHAPES))
def test_rmsnorm_forward_backward_matches_reference_bf16(shape):
    x, w, dy = _inputs(shape, torch.bfloat16)
    y, dx, dw = _run(rmsnorm.rms_norm, x, w, dy)
    y_ref, dx_ref, dw_ref = _run(reference.rms_norm, x, w, dy)
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
    assert dw.dtype == torch.bfloat16
    assert_close(y, y_ref, **BF16_ELEMENTWISE)
    assert_close(dx, dx_ref, **BF16_DX)
    assert_close(dw, dw_ref, **BF16_DW)


def test_rmsnorm_bf16_input_with_fp32_weight_matches_reference():
    """The autocast layout: bf16 activations, fp32 master weight; dW comes back in fp32."""
    x, w, dy = _inputs((123, 96), torch.bfloat16, weight_dtype=torch.float32)
    y, dx, dw = _run(rmsnorm.rms_norm, x, w, dy)
    y_ref, dx_ref, dw_ref = _run(reference.rms_norm, x, w, dy)
    assert y.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert_close(y, y_ref, **BF16_ELEMENTWISE)
    assert_close(dx, dx_ref, **BF16_DX)
    # dW is fp32 here: the only bf16 rounding is in the inputs, identical on both sides.
    assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5 * dw_ref.abs().max().item())


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_rmsnorm_statistics_are_fp32_for_tiny_and_huge_bf16_inputs(scale):
    """mean(x²) of bf16 inputs at 1e±3 scale neither underflows nor loses precision."""
    x, w, dy = _inputs((37, 96), torch.bfloat16)
    x = (x.float() * scale).to(torch.bfloat16)
    y, dx, _ = _run(rmsnorm.rms_norm, x, w, dy)
    y_ref, dx_ref, _ = _run(reference.rms_norm, x, w, dy)
    assert_close(y, y_ref, **BF16_ELEMENTWISE)
    # dx scales like 1/scale: compare relative to its size.
    assert_close(dx, dx_ref, rtol=2**-6, atol=1e-2 * dx_ref.float().abs().max().item())


def test_rmsnorm_zero_rows_give_zero_output_and_finite_gradients():
    x, w, dy = _inputs((9, 96), torch.float32)
    x[3] = 0.0
    y, dx, dw = _run(rmsnorm.rms_norm, x, w, dy, eps=1e-6)
    y_ref, dx_ref, dw_ref = _run(reference.rms_norm, x, w, dy, eps=1e-6)
    assert torch.all(y[3] == 0)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
    assert_close(y, y_ref, **FP32)
    assert_close(dx, dx_ref, **FP32)
    assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5 * dw_ref.abs().max().item())


def test_rmsnorm_eps_is_honoured():
    x, w, dy = _inputs((16, 96), torch.float32)
    x = x * 1e-3  # mean(x²) ≈ 4e-6: eps = 1e-2 dominates, eps = 1e-5 does not
    for eps in (1e-5, 1e-2):
        y, dx, _ = _run(rmsnorm.rms_norm, x, w, dy, eps=eps)
        y_ref, dx_ref, _ = _run(reference.rms_norm, x, w, dy, eps=eps)
        assert_close(y, y_ref, **FP32)
        assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5 * dx_ref.abs().max().item())


def test_rmsnorm_weight_grad_is_deterministic_with_multi_tile_programs(monkeypatch):
    """dW is reduced by a fixed set of programs each walking several row tiles: rerunning
    gives bit-identical dW, and it still matches the reference."""
    monkeypatch.setattr(rmsnorm, "_num_persistent_programs", lambda device, n: min(n, 3))
    x, w, dy = _inputs((2, 7, 512), torch.float32, seed=3)  # 14 rows, BLOCK_M 8 → 2 tiles
    x = torch.cat([x, x.flip(0), x * 0.5], dim=1)  # 42 rows → 6 tiles over 3 programs
    dy = torch.cat([dy, dy, dy.flip(1)], dim=1)
    _, dx_a, dw_a = _run(rmsnorm.rms_norm, x, w, dy)
    _, dx_b, dw_b = _run(rmsnorm.rms_norm, x, w, dy)
    assert torch.equal(dw_a, dw_b) and torch.equal(dx_a, dx_b)
    _, dx_ref, dw_ref = _run(reference.rms_norm, x, w, dy)
    assert_close(dw_a, dw_ref, rtol=1e-5, atol=1e-5 * dw_ref.abs().max().item())
    assert_close(dx_a, dx_ref, **FP32)


def test_rmsnorm_accepts_non_contiguous_input_and_keeps_its_shape():
    x, _, dy = _inputs((96, 5, 3), torch.float32)
    _, w, _ = _inputs((3, 5, 96), torch.float32)
    x = x.permute(2, 1, 0)  # [3, 5, 96], last dim strided
    dy = dy.permute(2, 1, 0)
    assert x.stride(-1) != 1
    y, dx, dw = _run(rmsnorm.rms_norm, x, w, dy)
    y_ref, dx_ref, dw_ref = _run(reference.rms_norm, x, w, dy)
    assert y.shape == (3, 5, 96) and dx.shape == (3, 5, 96)
    assert_close(y, y_ref, **FP32)
    assert_close(dx, dx_ref, **FP32)
    assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5 * dw_ref.abs().max().item())


def test_rmsnorm_does_not_modify_its_inputs():
    x, w, dy = _inputs((17, 96), torch.bfloat16)
    x0, w0, dy0 = x.clone(), w.clone(), dy.clone()
    _run(rmsnorm.rms_norm, x, w, dy)
    assert torch.equal(x, x0) and torch.equal(w, w0) and torch.equal(dy, dy0)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host-sync detection needs CUDA")
def test_rmsnorm_forward_and_backward_never_sync_with_the_host():
    x, w, dy = _inputs((84, 512, 512), torch.bfloat16, weight_dtype=torch.float32)
    _run(rmsnorm.rms_norm, x, w, dy)  # warm up: compile the kernels
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = rmsnorm.rms_norm(x, w, 1e-5)
        y.backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad).all().item() and torch.isfinite(w.grad).all().item()
