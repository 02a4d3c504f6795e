"""End to end: a training step of a tiny SpongeBob with the Triton kernels matches the PyTorch
path (CPU: TRITON_INTERPRET=1; the same test runs unchanged on a GPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch

# kernel_utils turns on TRITON_INTERPRET on CPU; it must be imported before the kernels.
from kernel_utils import DEVICE, assert_close, assert_close_scaled, build_model, cases
from spongebob.model import PRESETS, ModelConfig

# Small enough for the interpreter (48 tokens → ~50 programs per kernel launch), but with
# every feature the kernels see in training: GQA (4 query heads, 2 KV heads), head dim 16,
# an odd vocab, two layers (five RMSNorms), tied embeddings.
CONFIG = ModelConfig(
    vocab_size=301, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64,
)  # fmt: skip
BATCH, SEQ = 2, 24
# On a GPU also the tutorial's model (spongebob preset: 8 layers, dim 512, vocab 6400) on four
# packed rows of 512: the same step at the size it trains at. Its matmuls are the same cuBLAS
# calls in both models, so only the kernels' own rounding differs, as in the small model.
SMALL = [("small", CONFIG, BATCH, SEQ)]
TRAINING = [("spongebob", PRESETS["spongebob"], 4, 512)]


def _batch(config: ModelConfig, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """A packed chat-like batch: documents restart their positions mid-row, untrained tokens
    are −100 with weight 0, a few trained tokens weigh 10 (reasoning tags), the tail of the
    second row is padding."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=g)
    labels = torch.randint(3, config.vocab_size, (batch, seq), generator=g)
    if (batch, seq) == (BATCH, SEQ):
        pos = torch.stack(
            [
                torch.cat([torch.arange(9), torch.arange(15)]),
                torch.cat([torch.arange(5), torch.arange(13), torch.arange(6)]),
            ]
        )
    else:  # documents of 3/8, 1/2 and 1/8 of a row, shifted a little in every row
        rows = []
        for b in range(batch):
            a, c = 3 * seq // 8 + b, seq // 2 - 2 * b
            rows.append(torch.cat([torch.arange(a), torch.arange(c), torch.arange(seq - a - c)]))
        pos = torch.stack(rows)
    labels[0, :4] = -100  # prompt
    labels[1, 3 * seq // 4 :] = -100  # padding
    weights = (labels != -100).float()
    weights[0, 10] = weights[1, 7] = 10.0
    return {"input_ids": ids, "labels": labels, "loss_weights": weights, "position_ids": pos}


def _models(config: ModelConfig):
    torch.manual_seed(0)
    torch_model = build_model(config, "torch", "sdpa").to(DEVICE).train()
    triton_model = build_model(config, "triton", "sdpa").to(DEVICE).train()
    triton_model.load_state_dict(torch_model.state_dict())
    assert torch_model.ops.name == "torch" and triton_model.ops.name == "triton"
    return torch_model, triton_model


def _step(model, batch, normalizer, autocast_dtype):
    """What the trainer does for one optimizer step: forward under autocast, backward,
    clip at 1.0, optimizer step. Returns the loss, the loss after the step, and the clipped
    gradients (the update, up to the learning rate)."""
    ctx = (
        torch.autocast(DEVICE.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    # SGD rather than AdamW: Adam's first step is lr·sign(g), which turns fp32 noise on
    # gradients that are ~0 into full-size differences and would test nothing about kernels.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with ctx:
        loss = model.loss(batch, normalizer)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad(set_to_none=True)
    with ctx, torch.no_grad():
        next_loss = model.loss(batch, normalizer)
    return loss.detach(), next_loss, grads


# fp32: same math, different reduction orders (row chunks, tree sums) through two layers and
# clipping: ~1e-6 relative; 1e-4 / 1e-5 of the largest entry leaves room, bugs are ≥ 1e-2.
# bf16 autocast: every matmul and the RoPE outputs round to bf16 (2⁻⁸) on both sides, the
# interpreter truncates its bf16 stores, and differences compound through two layers: 3e-2
# of each tensor's largest entry (Liger checks its model convergence at similar bounds).
TOLERANCES = {
    None: {"loss": {"rtol": 1e-5, "atol": 1e-6}, "grad": {"rtol": 1e-4, "atol_frac": 1e-5}},
    torch.bfloat16: {
        "loss": {"rtol": 2e-3, "atol": 1e-4},  # a mean over ~40 tokens: errors average
        "grad": {"rtol": 3e-2, "atol_frac": 3e-2},
    },
}


@pytest.mark.parametrize("model", cases(SMALL, TRAINING), ids=lambda m: m[0])
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16_autocast"])
def test_training_step_with_triton_kernels_matches_pytorch_path(autocast_dtype, model):
    _, config, batch_size, seq = model
    batch = {k: v.to(DEVICE) for k, v in _batch(config, batch_size, seq).items()}
    # The step's normalizer: Σ mᵢ over the whole optimizer step (say, two micro-batches).
    normalizer = ((batch["labels"] != -100).sum() * 2).float()
    torch_model, triton_model = _models(config)
    tol = TOLERANCES[autocast_dtype]

    loss_ref, next_ref, grads_ref = _step(torch_model, batch, normalizer, autocast_dtype)
    loss, next_loss, grads = _step(triton_model, batch, normalizer, autocast_dtype)

    assert torch.isfinite(loss) and loss.item() > 0
    assert_close(loss, loss_ref, **tol["loss"])
    for name, g_ref in grads_ref.items():
        assert grads[name].dtype == g_ref.dtype, name
        assert g_ref.abs().max() > 0, name  # every parameter is really trained
        try:
            assert_close_scaled(grads[name], g_ref, **tol["grad"])
        except AssertionError as e:
            raise AssertionError(f"gradient of {name}: {e}") from None
    # The (clipped) gradients above are the update; after it both models score the batch
    # alike, and the step lowered the loss.
    assert_close(next_loss, next_ref, **tol["loss"])
    assert next_loss < loss
