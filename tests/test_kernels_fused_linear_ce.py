"""Fused linear + cross-entropy against the PyTorch reference (CPU: TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

# kernel_utils turns on TRITON_INTERPRET on CPU; it must be imported before the kernels.
from kernel_utils import DEVICE, assert_close, assert_close_scaled, cases
from spongebob.kernels import fused_linear_ce, reference

IGNORE = -100

# --- Tolerances -----------------------------------------------------------------------------
# fp32: same fp32 math, different summation order (row chunks, lse with an online max).
# The loss is a sum over ~100 rows (rtol 1e-5); gradients are sums over rows/vocab whose
# terms partly cancel, so their absolute slack is tied to the tensor's largest entry.
FP32_LOSS = {"rtol": 1e-5, "atol": 1e-6}
FP32_GRAD = {"rtol": 1e-4, "atol_frac": 1e-5}
# bf16: logits come from the same bf16 matmul on both sides and the CE math is fp32 on both,
# so the loss agrees to fp32 summation noise plus the odd one-ulp logit difference between a
# chunked and an unchunked GEMM (≈ 2⁻⁸ of one logit, averaged over rows): rtol 1e-3.
BF16_LOSS = {"rtol": 1e-3, "atol": 1e-5}
# bf16 gradients: d loss / d logits is stored once in bf16 (one rounding, 2⁻⁸, both sides; the
# interpreter truncates, a biased one-ulp error), then goes through a bf16 GEMM over V (or N)
# terms that partly cancel. The error of an element is relative to the size of its terms, so
# rtol 2 % of the element plus 2 % of the tensor's largest entry. (Liger uses 5e-2 for CE.)
BF16_GRAD = {"rtol": 2e-2, "atol_frac": 2e-2}


def _problem(n_rows, n_hidden, vocab, dtype, seed=0, ignore_every=7):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, n_hidden, generator=g)
    weight = torch.randn(vocab, n_hidden, generator=g) / n_hidden**0.5 * 2.0
    labels = torch.randint(0, vocab, (n_rows,), generator=g)
    if ignore_every:
        labels[::ignore_every] = IGNORE
    # Non-uniform per-token weights: 0 (padding-like), 1 (ordinary), 10 (reasoning tags), and
    # random values in between.
    loss_weights = torch.rand(n_rows, generator=g) * 3.0
    loss_weights[1::5] = 10.0
    loss_weights[2::11] = 0.0
    normalizer = (labels != IGNORE).sum()
    return (
        hidden.to(DEVICE, dtype),
        weight.to(DEVICE, dtype),
        labels.to(DEVICE),
        loss_weights.to(DEVICE),
        normalizer.to(DEVICE),
    )


def _run(fn, hidden, weight, labels, loss_weights, normalizer, grad_scale=1.0, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = fn(hidden, weight, labels, loss_weights, normalizer, **kwargs)
    (loss * grad_scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def _check(got, ref, loss_tol, grad_tol):
    (loss, gh, gw), (loss_ref, gh_ref, gw_ref) = got, ref
    assert loss.dim() == 0 and loss.dtype == loss_ref.dtype
    assert gh.dtype == gh_ref.dtype and gw.dtype == gw_ref.dtype
    assert_close(loss, loss_ref, **loss_tol)
    assert_close_scaled(gh, gh_ref, **grad_tol)
    assert_close_scaled(gw, gw_ref, **grad_tol)


# (N, C, V): 123 rows (odd, several chunks by the default rule: 4 of 32 rows), width 96 and the
# model's 512; vocab 500 (one strip) and 4100 (three 2048-wide strips, the last one partial,
# so the online max/sum crosses strips).
SHAPES = [(123, 96, 500), (37, 512, 1000), (29, 96, 4100)]
# On a GPU also the training shapes: 84 × 512 and 28 × 1024 rows of dim 512, vocab 6400 (11 and
# 7 chunks of 4096 rows). The loss is a tree sum over all rows on both sides and each gradient
# element a sum over V (grad_hidden) or over N rows (grad_weight, accumulated in fp32 per chunk
# here, in one cuBLAS GEMM there), so the errors stay of the same relative size: the same
# tolerances apply.
TRAINING_SHAPES = [(84 * 512, 512, 6400), (28 * 1024, 512, 6400)]


@pytest.mark.parametrize("shape", cases(SHAPES, TRAINING_SHAPES))
def test_fused_ce_loss_and_gradients_match_reference_fp32(shape):
    problem = _problem(*shape, torch.float32)
    got = _run(fused_linear_ce.linear_cross_entropy, *problem)
    ref = _run(reference.linear_cross_entropy, *problem)
    _check(got, ref, FP32_LOSS, FP32_GRAD)


@pytest.mark.parametrize("shape", cases(SHAPES[:2], TRAINING_SHAPES))
def test_fused_ce_loss_and_gradients_match_reference_bf16(shape):
    problem = _problem(*shape, torch.bfloat16)
    got = _run(fused_linear_ce.linear_cross_entropy, *problem)
    ref = _run(reference.linear_cross_entropy, *problem)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    _check(got, ref, BF16_LOSS, BF16_GRAD)


def _confident_problem(n_rows, n_hidden, vocab, dtype, margin=10.0, seed=0):
    """Rows whose target logit is the row's max + `margin` (p(target) ≈ 0.998 at V = 500).

    The last 32 hidden columns carry a one-hot of the label times a per-row boost, and the
    first 32 vocab rows of the weight read it back, so z[label] = max(z) + margin exactly
    (before the inputs are rounded to `dtype`).
    """
    g = torch.Generator().manual_seed(seed)
    n_boost = 32
    hidden = torch.randn(n_rows, n_hidden, generator=g)
    weight = torch.randn(vocab, n_hidden, generator=g) / n_hidden**0.5
    hidden[:, -n_boost:] = 0.0
    weight[:, -n_boost:] = 0.0
    weight[:n_boost, -n_boost:] = torch.eye(n_boost)
    labels = torch.randint(0, n_boost, (n_rows,), generator=g)
    logits = hidden @ weight.t()
    boost = logits.max(dim=1).values - logits.gather(1, labels[:, None])[:, 0] + margin
    hidden[torch.arange(n_rows), n_hidden - n_boost + labels] = boost
    z = hidden @ weight.t()
    others = z.scatter(1, labels[:, None], float("-inf")).max(dim=1).values
    assert torch.allclose(z.gather(1, labels[:, None])[:, 0], others + margin, atol=1e-4)
    loss_weights = torch.rand(n_rows, generator=g) + 0.5
    normalizer = torch.tensor(float(n_rows))
    return (
        hidden.to(DEVICE, dtype),
        weight.to(DEVICE, dtype),
        labels.to(DEVICE),
        loss_weights.to(DEVICE),
        normalizer.to(DEVICE),
    )


def _float64_truth(hidden, weight, labels, loss_weights, normalizer):
    """Loss and gradients in float64 end to end (the reference casts its logits to fp32)."""
    hidden = hidden.detach().double().requires_grad_()
    weight = weight.detach().double().requires_grad_()
    logp = torch.log_softmax(hidden @ weight.t(), dim=1)
    ce = -logp.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    w = torch.where(labels == IGNORE, 0.0, loss_weights.double())
    loss = (ce * w).sum() / normalizer.double()
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def test_fused_ce_confident_predictions_are_accurate_fp32():
    """Target logit = row max + 10 (p(target) ≈ 0.997). Against a float64 truth the fused
    kernel stays at fp32 accuracy (~1e-7): it computes p − 1 as −(other classes' mass)/total
    and the loss as log1p of it. Plain fp32 forms lose ~1e-4 here (p − 1 ≈ −3e-3 is the
    difference of two numbers near 1; log(1 + 3e-3) rounds at 1e-7 absolute) — PyTorch's own
    fp32 cross_entropy on CPU shows 8e-5, so it is checked against float64, not the reference."""
    problem = _confident_problem(61, 96, 500, torch.float32)
    loss, grad_hidden, grad_weight = _run(fused_linear_ce.linear_cross_entropy, *problem)
    loss_64, grad_hidden_64, grad_weight_64 = _float64_truth(*problem)
    assert loss_64.item() < 0.01  # really confident
    # What remains is the fp32 rounding of the logits (|z| ≈ 12, ~1e-6 absolute) and of the
    # gradient GEMMs: 1e-5 of the largest entry is ten times that.
    assert_close(loss, loss_64, rtol=1e-5, atol=0.0)
    assert_close_scaled(grad_hidden, grad_hidden_64, rtol=1e-4, atol_frac=1e-5)
    assert_close_scaled(grad_weight, grad_weight_64, rtol=1e-4, atol_frac=1e-5)


def test_fused_ce_confident_predictions_match_reference_bf16():
    """Same rows in bf16: both sides see the same bf16 logits (whose rounding, ~0.03 at
    |z| ≈ 12, dominates the error of either against float64), so they agree to BF16_*."""
    problem = _confident_problem(61, 96, 500, torch.bfloat16)
    got = _run(fused_linear_ce.linear_cross_entropy, *problem)
    ref = _run(reference.linear_cross_entropy, *problem)
    _check(got, ref, BF16_LOSS, BF16_GRAD)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ce_kernel_true_class_gradient_is_accurate_when_confident(dtype):
    """Straight at the row kernel, on given logits: with p(target) ≈ 0.998 the stored gradient
    of the target logit, p − 1 ≈ −2e-3, is within one storage rounding of the exact value
    (float64) — Liger's bf16 kernel was off by 20–100 % here."""
    g = torch.Generator().manual_seed(7)
    n_rows, vocab = 16, 500
    logits = torch.randn(n_rows, vocab, generator=g)
    labels = torch.randint(0, vocab, (n_rows,), generator=g)
    logits[torch.arange(n_rows), labels] = logits.max(dim=1).values + 10.0
    logits = logits.to(dtype)
    exact = torch.softmax(logits.double(), dim=1)
    exact[torch.arange(n_rows), labels] -= 1.0
    buf = logits.clone().to(DEVICE)
    row_loss = torch.empty(n_rows, device=DEVICE)
    fused_linear_ce._ce_rows_kernel[(n_rows,)](
        buf, labels.to(DEVICE), torch.ones(n_rows, device=DEVICE),
        torch.tensor(1.0, device=DEVICE), row_loss,
        buf.stride(0), vocab, IGNORE, BLOCK_V=512, WRITE_GRAD=True,
    )  # fmt: skip
    got = buf.cpu().double()
    true_got = got[torch.arange(n_rows), labels]
    true_exact = exact[torch.arange(n_rows), labels]
    assert (true_exact.abs() < 5e-3).all() and (true_exact.abs() > 1e-4).all()
    # bf16: one rounding of the stored value, ≤ 1 ulp = 2⁻⁷ relative (the interpreter
    # truncates). fp32: p − 1 is formed without cancellation, so a few fp32 ulps: 1e-5.
    rel = 2**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(true_got, true_exact, rtol=rel, atol=0.0)
    # Every other class: p itself, to one storage rounding (plus fp32 exp/log error).
    others = torch.ones_like(got, dtype=torch.bool)
    others[torch.arange(n_rows), labels] = False
    torch.testing.assert_close(got[others], exact[others], rtol=rel + 1e-5, atol=1e-30)
    # The loss (≈ 2e-3, fp32 in any case): log1p form, a few fp32 ulps.
    expected_loss = -torch.log_softmax(logits.double(), 1)[torch.arange(n_rows), labels]
    torch.testing.assert_close(row_loss.cpu().double(), expected_loss, rtol=1e-5, atol=0.0)


def test_ce_kernel_loss_and_gradient_are_accurate_from_hopeless_to_certain_predictions():
    """Row losses from ~40 (target far below the max) to ~1e-7 (target 20 above it), across
    both branches of the kernel's log1p and its plain log-sum-exp form, plus an ignored row:
    fp32-accurate against float64, relative to each row's own loss."""
    g = torch.Generator().manual_seed(8)
    margins = [-40.0, -3.0, -0.5, 0.0, 0.7, 2.0, 4.5, 8.0, 12.0, 20.0]
    n_rows, vocab = len(margins) + 1, 700
    logits = torch.randn(n_rows, vocab, generator=g) * 1.5
    labels = torch.randint(0, vocab, (n_rows,), generator=g)
    for i, m in enumerate(margins):
        others = logits[i].clone()
        others[labels[i]] = float("-inf")
        logits[i, labels[i]] = others.max() + m
    labels[-1] = IGNORE
    buf = logits.clone().to(DEVICE)
    row_loss = torch.empty(n_rows, device=DEVICE)
    weights = torch.full((n_rows,), 2.0, device=DEVICE)
    fused_linear_ce._ce_rows_kernel[(n_rows,)](
        buf, labels.to(DEVICE), weights, torch.tensor(4.0, device=DEVICE), row_loss,
        buf.stride(0), vocab, IGNORE, BLOCK_V=256, WRITE_GRAD=True,
    )  # fmt: skip
    z = logits[:-1].double()
    rows = torch.arange(n_rows - 1)
    expected = -torch.log_softmax(z, 1)[rows, labels[:-1]] * 2.0
    torch.testing.assert_close(row_loss[:-1].cpu().double(), expected, rtol=2e-5, atol=0.0)
    grad = torch.softmax(z, 1)
    grad[rows, labels[:-1]] -= 1.0
    grad *= 2.0 / 4.0
    torch.testing.assert_close(buf[:-1].cpu().double(), grad, rtol=2e-5, atol=1e-12)
    assert row_loss[-1].item() == 0.0 and torch.all(buf[-1] == 0)


def test_fused_ce_all_ignored_rows_give_zero_loss_and_zero_gradient():
    """Ignored rows, and a whole chunk of them, contribute exactly 0 loss and 0 gradient."""
    hidden, weight, labels, loss_weights, _ = _problem(40, 96, 500, torch.float32)
    labels[:16] = IGNORE  # with chunk_size=16, the whole first chunk is ignored
    normalizer = (labels != IGNORE).sum()
    got = _run(
        fused_linear_ce.linear_cross_entropy,
        hidden, weight, labels, loss_weights, normalizer, chunk_size=16,
    )  # fmt: skip
    ref = _run(reference.linear_cross_entropy, hidden, weight, labels, loss_weights, normalizer)
    _check(got, ref, FP32_LOSS, FP32_GRAD)
    grad_hidden = got[1]
    assert torch.all(grad_hidden[labels == IGNORE] == 0)
    assert torch.all(grad_hidden[loss_weights == 0] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ce_fully_ignored_batch_gives_zero_loss_and_gradient_not_nan(dtype):
    """A micro-batch with no trained token (nanochat #590): with the normalizer clamped to ≥ 1
    as the trainer does, loss and gradients are exactly zero, never NaN."""
    hidden, weight, _, loss_weights, _ = _problem(19, 96, 500, dtype)
    labels = torch.full((19,), IGNORE, device=DEVICE)
    normalizer = (labels != IGNORE).sum().clamp_min(1)
    loss, grad_hidden, grad_weight = _run(
        fused_linear_ce.linear_cross_entropy, hidden, weight, labels, loss_weights, normalizer
    )
    assert loss.item() == 0.0
    assert torch.all(grad_hidden == 0) and torch.all(grad_weight == 0)


def test_fused_ce_normalizer_tensor_and_grad_output_scale_the_result():
    """The normalizer is a tensor (e.g. the token count of the whole optimizer step, larger
    than this micro-batch's); loss and gradients scale as 1/normalizer, and the backward
    multiplies the stored gradients by grad_output."""
    hidden, weight, labels, loss_weights, _ = _problem(50, 96, 500, torch.float32)
    step_tokens = torch.tensor(1234, device=DEVICE)  # int tensor, like mask.sum()
    got = _run(
        fused_linear_ce.linear_cross_entropy,
        hidden, weight, labels, loss_weights, step_tokens, grad_scale=3.0,
    )  # fmt: skip
    ref = _run(
        reference.linear_cross_entropy,
        hidden, weight, labels, loss_weights, step_tokens, grad_scale=3.0,
    )  # fmt: skip
    _check(got, ref, FP32_LOSS, FP32_GRAD)
    half = _run(
        fused_linear_ce.linear_cross_entropy,
        hidden, weight, labels, loss_weights, step_tokens * 2,
    )  # fmt: skip
    assert_close(half[0] * 2, got[0], **FP32_LOSS)
    assert_close_scaled(half[1] * 6, got[1], **FP32_GRAD)


def test_fused_ce_result_does_not_depend_on_chunk_size():
    problem = _problem(45, 96, 500, torch.float32, seed=3)
    results = [
        _run(fused_linear_ce.linear_cross_entropy, *problem, chunk_size=c) for c in (7, 16, 45)
    ]
    for other in results[1:]:
        _check(other, results[0], FP32_LOSS, FP32_GRAD)


def test_chunk_rule_is_liger_rule_at_training_shape():
    """next_pow2(cdiv(N, cdiv(V, C))): at 84 × 512 rows, V 6400, C 512 → 4096-row chunks
    (11 chunks), so one chunk of logits ≈ the size of the hidden states."""
    assert fused_linear_ce.chunk_rows(84 * 512, 6400, 512) == 4096
    assert fused_linear_ce.chunk_rows(123, 500, 96) == 32
    assert fused_linear_ce.chunk_rows(16384, 32000, 4096) == 2048  # Liger's own example


def test_fused_ce_without_grad_returns_the_loss_and_stores_nothing():
    problem = _problem(33, 96, 500, torch.float32)
    hidden, weight = problem[0].clone(), problem[1].clone()
    with torch.no_grad():
        loss = fused_linear_ce.linear_cross_entropy(*problem)
        loss_ref = reference.linear_cross_entropy(*problem)
    assert loss.grad_fn is None
    assert_close(loss, loss_ref, **FP32_LOSS)
    # Inputs are untouched (the kernel only writes into its own logits buffer).
    assert torch.equal(hidden, problem[0]) and torch.equal(weight, problem[1])


def test_fused_ce_autocast_bf16_with_fp32_master_weights_matches_reference():
    """The training layout: fp32 hidden and weight under bf16 autocast. The matmuls run in
    bf16 like the reference's, grad_weight comes back fp32 (accumulated in fp32)."""
    problem = _problem(41, 96, 500, torch.float32, seed=5)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = _run(fused_linear_ce.linear_cross_entropy, *problem)
        ref = _run(reference.linear_cross_entropy, *problem)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    _check(got, ref, BF16_LOSS, BF16_GRAD)


def test_fused_ce_tied_weight_gradient_sums_embedding_and_output_paths():
    """weight is also the embedding: its gradient is the sum of both uses."""
    problem = _problem(30, 96, 500, torch.float32, seed=6)
    _, weight, labels, loss_weights, normalizer = problem
    ids = labels.clamp_min(0)

    def step(fn):
        w = weight.detach().clone().requires_grad_()
        hidden = torch.tanh(w[ids] * 3.0)
        fn(hidden, w, labels, loss_weights, normalizer).backward()
        return w.grad

    assert_close_scaled(
        step(fused_linear_ce.linear_cross_entropy),
        step(reference.linear_cross_entropy),
        **FP32_GRAD,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync detection needs CUDA")
def test_fused_ce_forward_and_backward_never_sync_with_the_host():
    problem = _problem(256, 512, 6400, torch.bfloat16)
    fused_linear_ce.linear_cross_entropy(*problem)  # warm up: compile the kernel
    hidden = problem[0].detach().clone().requires_grad_()
    weight = problem[1].detach().clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fused_linear_ce.linear_cross_entropy(hidden, weight, *problem[2:])
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
