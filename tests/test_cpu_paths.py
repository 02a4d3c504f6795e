"""The CPU paths that have no GPU to hide behind: FlexAttention compiled on CPU, training
under `torch.compile` on CPU, and bf16 autocast on CPU.

What torch 2.15 cannot do on CPU, found out rather than assumed: FlexAttention has no
backward there (`flex_attention` raises "NotImplementedError: FlexAttention does not support
backward on CPU. Please set the input requires_grad to False or use another device." for any
input that requires grad, compiled or not), so on CPU it is checked forward only, and the test
of its backward pins that error (it turns into a gradient comparison the day torch lifts it).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from kernel_utils import assert_close_scaled, build_model
from spongebob.model import ModelConfig, block_causal_mask, flex_block_mask

pytestmark = pytest.mark.slow

# --- FlexAttention on CPU ----------------------------------------------------------------------


def _positions(T: int) -> torch.Tensor:
    """Three packed rows of T = 256 (two of FlexAttention's 128-token blocks): one whose
    documents end exactly at the block edge (so a whole key block is masked and skipped), one
    whose documents straddle it, and one with several short documents and a padded tail
    (position 0 on every pad token: each its own document)."""
    rows = [
        torch.cat([torch.arange(100), torch.arange(28), torch.arange(T - 128)]),
        torch.cat([torch.arange(5), torch.arange(150), torch.arange(T - 155)]),
        torch.cat([torch.arange(40), torch.arange(70), torch.arange(90), torch.zeros(T - 200)]),
    ]
    return torch.stack(rows).long()


def _qkv(B, H, Hk, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, Hk, T, D, generator=g)
    v = torch.randn(B, Hk, T, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_compiled_flex_attention_on_cpu_matches_sdpa_with_the_block_mask(heads):
    """fp32, forward (the only direction FlexAttention has on CPU). Both compute softmax over
    the same keys in fp32 and differ only in summation order: a few ulps of O(1) outputs, so
    1e-5; a document boundary crossed or missed would be an O(1) error."""
    H, Hk = heads
    T, D = 256, 16
    pos = _positions(T)
    q, k, v = _qkv(pos.shape[0], H, Hk, T, D)
    block = flex_block_mask(pos)
    # The first row's second key block is not visible from its second query block: skipped.
    assert block.to_dense()[0, 0, 1, 0] == 0 and block.to_dense()[1, 0, 1, 0] == 1
    flex = torch.compile(flex_attention, dynamic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = flex(q, k, v, block_mask=block, enable_gqa=H != Hk)
    expected = F.scaled_dot_product_attention(
        q, k, v, attn_mask=block_causal_mask(pos), enable_gqa=H != Hk
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Control: plain causal attention (documents ignored) is far from it, so the documents
    # really are what is being compared.
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hk)
    assert (causal - expected).abs().max() > 0.1


def test_flex_attention_backward_on_cpu():
    """torch 2.15 refuses it (see the module docstring); should a later torch allow it, the
    gradients must match SDPA's."""
    pos = _positions(256)
    q, k, v = (t.requires_grad_() for t in _qkv(pos.shape[0], 4, 2, 256, 16, seed=1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = torch.compile(flex_attention, dynamic=False)(
                q, k, v, block_mask=flex_block_mask(pos), enable_gqa=True
            )
    except NotImplementedError as e:
        assert "does not support backward on CPU" in str(e)
        return
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dy)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(pos), enable_gqa=True)
    for a, e in zip(got, torch.autograd.grad(ref, (q, k, v), dy), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_model_flex_path_on_cpu_matches_sdpa_path_for_inference():
    """The model's own `attention="flex"` on CPU (scoring packed rows without gradients):
    the same logits as its SDPA path."""
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    torch.manual_seed(0)
    sdpa = build_model(cfg, "torch", "sdpa").eval()
    flex = build_model(cfg, "torch", "flex").eval()
    flex.load_state_dict(sdpa.state_dict())
    pos = _positions(256)
    ids = torch.randint(3, cfg.vocab_size, pos.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = flex(ids, pos)
        expected = sdpa(ids, pos)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- training on CPU: torch.compile and bf16 autocast, through the real loop --------------------


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    from spongebob import demo_data
    from spongebob.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("cpu_paths")
    paths = demo_data.generate(d / "data", seed=0, scale=0.05)
    train_tokenizer([paths["pretrain"], paths["sft_512"]], d / "tok", 512, show_progress=False)
    return {"chat": str(paths["sft_512"]), "tokenizer": str(d / "tok"), "root": d}


def _train_losses(files, name: str, steps: int = 3, **overrides) -> list[float]:
    from spongebob.config import stage_config
    from spongebob.train import train

    out = files["root"] / name
    cfg = stage_config(
        "sft",
        data=[files["chat"]],
        out=str(out),
        tokenizer=files["tokenizer"],
        preset="tiny",
        init="none",
        max_steps=steps,
        batch_size=4,
        accum=1,
        seq_len=128,
        device="cpu",
        seed=0,
        save_every=10**9,
        log_every=1,
        progress=False,
        **overrides,
    )
    train(cfg)
    records = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and "event" not in r]
    assert len(losses) == steps and all(x is not None for x in losses)
    return losses


def _rel(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)]


@pytest.fixture(scope="module")
def eager_fp32(demo_files):
    return _train_losses(demo_files, "eager-fp32", dtype="fp32")


def test_train_under_torch_compile_on_cpu_matches_eager(demo_files, eager_fp32):
    """Three optimizer steps of `train(compile=True)` (inductor's CPU backend): finite, and
    within 1e-4 of the eager run's losses. Inductor fuses and reorders fp32 reductions (a few
    ulps, ~1e-7 relative per op); AdamW's first updates (≈ lr·sign(g)) can turn that into
    slightly different weights for gradients near zero, still ~1e-6 of the loss after three
    steps (measured: 2e-7). A graph that computes something else is off by 1e-2 or more."""
    compiled = _train_losses(demo_files, "compiled", dtype="fp32", compile=True)
    assert all(torch.isfinite(torch.tensor(compiled)))
    assert max(_rel(compiled, eager_fp32)) < 1e-4, (compiled, eager_fp32)


def test_train_with_bf16_autocast_on_cpu_follows_fp32(demo_files, eager_fp32):
    """`train(dtype="bf16")` on CPU runs under bf16 autocast: its losses are not the fp32
    ones bit for bit (so autocast is really on) but within 2e-3 of them. The loss is a mean
    over ~500 tokens of cross-entropies from bf16 logits (8 significant bits, rounding errors
    of 2⁻⁹ relative that average out over tokens and vocab): measured 3e-5 on this model."""
    bf16 = _train_losses(demo_files, "bf16", dtype="bf16")
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert bf16[0] != eager_fp32[0]
    assert max(_rel(bf16, eager_fp32)) < 2e-3, (bf16, eager_fp32)


def test_model_step_under_bf16_autocast_on_cpu_matches_fp32():
    """One step of the model under CPU bf16 autocast against fp32 (same weights, packed rows):
    loss within 2e-3 (as above), fp32 master gradients within 3 % of each element plus 3 % of
    the tensor's largest entry (every matmul, forward and backward, rounds to bf16; relative
    errors of a few 2⁻⁸ compound through two layers; measured ≤ 0.7 %), the bound the Triton
    model-step test uses for bf16."""
    cfg = ModelConfig(vocab_size=301, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    torch.manual_seed(0)
    fp32 = build_model(cfg, "torch", "sdpa").train()
    bf16 = build_model(cfg, "torch", "sdpa").train()
    bf16.load_state_dict(fp32.state_dict())
    pos = _positions(256)[:, :192]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, cfg.vocab_size, pos.shape, generator=g)
    labels = torch.randint(3, cfg.vocab_size, pos.shape, generator=g)
    labels[:, :10] = -100
    batch = {
        "input_ids": ids,
        "labels": labels,
        "loss_weights": (labels != -100).float(),
        "position_ids": pos,
    }
    normalizer = (labels != -100).sum().float()
    loss32 = fp32.loss(batch, normalizer)
    loss32.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = bf16.loss(batch, normalizer)
    loss16.backward()
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert loss16.item() != loss32.item()
    torch.testing.assert_close(loss16, loss32, rtol=2e-3, atol=0.0)
    for (name, p32), p16 in zip(fp32.named_parameters(), bf16.parameters(), strict=True):
        assert p16.grad.dtype == torch.float32, name
        try:
            assert_close_scaled(p16.grad, p32.grad, rtol=3e-2, atol_frac=3e-2)
        except AssertionError as e:
            raise AssertionError(f"gradient of {name}: {e}") from None
