"""Triton RoPE against the PyTorch reference (CPU: TRITON_INTERPRET=1; GPU: unchanged)."""

from __future__ import annotations

import pytest
import torch

# kernel_utils turns on TRITON_INTERPRET on CPU; it must be imported before the kernels.
from kernel_utils import BF16_ELEMENTWISE, DEVICE, FP32, assert_close, cases
from spongebob.kernels import reference, rope

MAX_POS = 64
# The model's table (max_seq_len 32768): positions up to 1024 in the training shapes.
MODEL_MAX_POS = 32768


def _packed_positions(batch: int, seq_len: int) -> torch.Tensor:
    """Rows that pack several documents: positions restart at 0 mid-row (at different places
    in each row), like the loader's position_ids."""
    rows = []
    for b in range(batch):
        cut1, cut2 = 3 + 2 * b, seq_len // 2 + b
        rows.append(
            torch.cat(
                [
                    torch.arange(cut1) + 5 * b,  # a row may start mid-document
                    torch.arange(cut2 - cut1),
                    torch.arange(seq_len - cut2),
                ]
            )
        )
    return torch.stack(rows).to(DEVICE)


def _inputs(batch, seq_len, n_q, n_k, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, n_q, head_dim, generator=g).to(DEVICE, dtype)
    k = torch.randn(batch, seq_len, n_k, head_dim, generator=g).to(DEVICE, dtype)
    dq = torch.randn(q.shape, generator=g).to(DEVICE, dtype)
    dk = torch.randn(k.shape, generator=g).to(DEVICE, dtype)
    return q, k, dq, dk


def _run(fn, q, k, dq, dk, cos, sin, pos):
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    q_out, k_out = fn(q, k, cos, sin, pos)
    torch.autograd.backward([q_out, k_out], [dq, dk])
    return q_out.detach(), k_out.detach(), q.grad, k.grad


# (B, T, Hq, Hk, D): GQA with D = 96 (D/2 = 48 is not a power of 2: masked lanes), MHA at the
# model's head dim 64 with an odd head count.
CASES = [(2, 13, 4, 2, 96), (1, 11, 3, 3, 64)]
# On a GPU also the training shapes: the spongebob preset at 84 × 512 and, with MiniMind2-Small's
# 2 KV heads, at 28 × 1024. Every output element is its own two-term rotation, so the
# elementwise tolerances hold at any size.
TRAINING_CASES = [(84, 512, 8, 8, 64), (28, 1024, 8, 2, 64)]


def _tables(seq_len, head_dim):
    max_pos = MAX_POS if seq_len <= MAX_POS // 2 else MODEL_MAX_POS
    return reference.rope_cache(head_dim, max_pos, device=DEVICE)


@pytest.mark.parametrize("case", cases(CASES, TRAINING_CASES))
def test_rope_forward_backward_matches_reference_fp32(case):
    batch, seq_len, n_q, n_k, head_dim = case
    q, k, dq, dk = _inputs(batch, seq_len, n_q, n_k, head_dim, torch.float32)
    cos, sin = _tables(seq_len, head_dim)
    pos = _packed_positions(batch, seq_len)
    got = _run(rope.apply_rope, q, k, dq, dk, cos, sin, pos)
    ref = _run(reference.apply_rope, q, k, dq, dk, cos, sin, pos)
    for a, e in zip(got, ref, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert_close(a, e, **FP32)


@pytest.mark.parametrize("case", cases(CASES[:1], TRAINING_CASES))
def test_rope_forward_backward_matches_reference_bf16(case):
    batch, seq_len, n_q, n_k, head_dim = case
    q, k, dq, dk = _inputs(batch, seq_len, n_q, n_k, head_dim, torch.bfloat16)
    cos, sin = _tables(seq_len, head_dim)
    pos = _packed_positions(batch, seq_len)
    got = _run(rope.apply_rope, q, k, dq, dk, cos, sin, pos)
    ref = _run(reference.apply_rope, q, k, dq, dk, cos, sin, pos)
    for a, e in zip(got, ref, strict=True):
        assert a.dtype == torch.bfloat16
        # Each output is x₁c − x₂s in fp32 from the same bf16 inputs, rounded once: the
        # elementwise bf16 tolerance (values are O(1), cancellation is bounded by |x|).
        assert_close(a, e, **BF16_ELEMENTWISE)


def test_rope_positions_restart_per_packed_document():
    """Two documents packed in one row are rotated exactly as if each sat alone at the start
    of its own row; using t instead of position_ids would fail this."""
    head_dim, n_q, n_k = 64, 2, 1
    q, k, _, _ = _inputs(1, 12, n_q, n_k, head_dim, torch.float32, seed=1)
    cos, sin = reference.rope_cache(head_dim, MAX_POS, device=DEVICE)
    pos = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0).to(DEVICE)
    q_out, k_out = rope.apply_rope(q, k, cos, sin, pos)
    first = rope.apply_rope(q[:, :5], k[:, :5], cos, sin, pos[:, :5])
    second = rope.apply_rope(
        q[:, 5:], k[:, 5:], cos, sin, torch.arange(7, device=DEVICE).unsqueeze(0)
    )
    assert torch.equal(q_out[:, :5], first[0]) and torch.equal(k_out[:, :5], first[1])
    assert torch.equal(q_out[:, 5:], second[0]) and torch.equal(k_out[:, 5:], second[1])
    wrong, _ = rope.apply_rope(q, k, cos, sin, torch.arange(12, device=DEVICE).unsqueeze(0))
    assert not torch.allclose(wrong[:, 5:], q_out[:, 5:])


def test_rope_backward_inverts_the_rotation():
    """With the rotate_half tables the backward is the rotation by −angle: applying it to the
    forward's output gives back the input (rotations are orthogonal)."""
    q, k, _, _ = _inputs(2, 9, 2, 2, 64, torch.float32, seed=2)
    cos, sin = reference.rope_cache(64, MAX_POS, device=DEVICE)
    pos = _packed_positions(2, 9) * 3  # larger angles
    q_rot, k_rot = rope.apply_rope(q, k, cos, sin, pos)
    q_back, k_back = rope._rope(q_rot, k_rot, cos, sin, pos, backward=True)
    assert_close(q_back, q, rtol=1e-5, atol=1e-5)
    assert_close(k_back, k, rtol=1e-5, atol=1e-5)
    # Norms are preserved per head, as a rotation must.
    assert_close(q_rot.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_rope_accepts_strided_views_and_broadcast_positions():
    """q/k as slices of a fused qkv projection (non-contiguous), positions given as [1, T]."""
    batch, seq_len, n_heads, head_dim = 2, 7, 2, 64
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(batch, seq_len, 3 * n_heads, head_dim, generator=g).to(DEVICE)
    q, k = qkv[:, :, :n_heads], qkv[:, :, n_heads : 2 * n_heads]
    assert not q.is_contiguous()
    dq = torch.randn(q.shape, generator=g).to(DEVICE)
    dk = torch.randn(k.shape, generator=g).to(DEVICE)
    cos, sin = reference.rope_cache(head_dim, MAX_POS, device=DEVICE)
    pos = torch.arange(seq_len, device=DEVICE).unsqueeze(0) + 2
    got = _run(rope.apply_rope, q, k, dq, dk, cos, sin, pos)
    ref = _run(reference.apply_rope, q, k, dq, dk, cos, sin, pos)
    for a, e in zip(got, ref, strict=True):
        assert_close(a, e, **FP32)


def test_rope_does_not_modify_its_inputs():
    q, k, dq, dk = _inputs(1, 6, 2, 1, 64, torch.bfloat16, seed=5)
    cos, sin = reference.rope_cache(64, MAX_POS, device=DEVICE)
    pos = torch.arange(6, device=DEVICE).unsqueeze(0)
    saved = [t.clone() for t in (q, k, dq, dk)]
    _run(rope.apply_rope, q, k, dq, dk, cos, sin, pos)
    for t, t0 in zip((q, k, dq, dk), saved, strict=True):
        assert torch.equal(t, t0)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host-sync detection needs CUDA")
def test_rope_forward_and_backward_never_sync_with_the_host():
    q, k, dq, dk = _inputs(84, 512, 8, 8, 64, torch.bfloat16)
    cos, sin = reference.rope_cache(64, MODEL_MAX_POS, device=DEVICE)
    pos = _packed_positions(84, 512)
    _run(rope.apply_rope, q, k, dq, dk, cos, sin, pos)  # warm up: compile the kernel
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        q_out, k_out = rope.apply_rope(q, k, cos, sin, pos)
        torch.autograd.backward([q_out, k_out], [dq, dk])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(q.grad).all().item() and torch.isfinite(k.grad).all().item()
