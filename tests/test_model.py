"""The model of contracts.md §4: sizes, block-diagonal attention, KV cache, HF mapping, loss."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from spongebob.model import (
    PRESETS,
    KVCache,
    ModelConfig,
    SpongeBob,
    block_causal_mask,
    format_params,
    hf_config_dict,
    hf_state_dict,
)

TINY = ModelConfig(
    vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
    max_seq_len=128,
)  # fmt: skip


def tiny_model(seed: int = 0, attention: str = "sdpa", **kw) -> SpongeBob:
    torch.manual_seed(seed)
    return SpongeBob(replace(TINY, **kw), kernels="torch", attention=attention).eval()


@pytest.mark.parametrize(
    ("name", "count", "printed"),
    [("spongebob", 28_975_616, "28.98M"), ("minimind2-small", 25_829_888, "25.83M")],
)
def test_presets_have_the_tutorial_parameter_counts(name, count, printed):
    with torch.device("meta"):
        model = SpongeBob(PRESETS[name])
    assert model.num_parameters() == count
    assert format_params(model.num_parameters()) == printed


def test_state_dict_stores_the_tied_embedding_once_and_no_biases():
    model = tiny_model()
    sd = model.state_dict()
    assert "embed_tokens.weight" in sd
    assert not any("lm_head" in k or "bias" in k or "rope" in k for k in sd)
    assert sum(v.numel() for v in sd.values()) == model.num_parameters()


def test_block_causal_mask_separates_documents_at_position_zero():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    m = block_causal_mask(pos)[0, 0]
    assert m[2, :3].all() and not m[2, 3:].any()
    assert m[4, 3:5].all() and not m[4, :3].any() and not m[4, 5]
    assert m[5].nonzero().flatten().tolist() == [5]


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_logits_of_a_document_are_the_same_packed_with_others_or_alone(attention):
    model = tiny_model(attention=attention)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 97, (n,), generator=g) for n in (7, 11, 5)]
    row = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(row, pos)
        start = 0
        for d in docs:
            alone = model(d[None])
            torch.testing.assert_close(
                packed[:, start : start + len(d)], alone, atol=1e-5, rtol=1e-5
            )
            start += len(d)


def test_flex_attention_path_equals_the_sdpa_mask_path():
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 0, 1, 2, 3, 4, 5]])
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = tiny_model(attention="sdpa")(ids, pos)
        b = tiny_model(attention="flex")(ids, pos)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_weights_map_one_to_one_onto_hf_llama_with_equal_logits():
    import transformers

    model = tiny_model()
    cfg = transformers.LlamaConfig(**hf_config_dict(model.config))
    hf = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=True)
    assert not missing and not unexpected
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)


def test_kv_cache_decoding_gives_the_logits_of_the_full_forward():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch_size=2, max_len=16)
        parts = [model(ids[:, :6], kv_cache=cache)]
        parts += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(6, 8)]
        parts.append(model(ids[:, 8:], kv_cache=cache))  # a 2-token chunk after a cache
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_with_attn_mask_matches_each_prompt_alone():
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(3, 97, (7,), generator=g), torch.randint(3, 97, (4,), generator=g)
    ids = torch.zeros(2, 7, dtype=torch.long)
    ids[0], ids[1, 3:] = a, b
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, :3] = False
    pos = (keep.long().cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        cache = KVCache(model.config, batch_size=2, max_len=12)
        out = model(ids, pos, kv_cache=cache, attn_mask=keep[:, None, None, :].expand(2, 1, 7, 7))
        # One more token for both rows, still masking the padding.
        nxt = torch.tensor([[5], [6]])
        keep2 = torch.cat([keep, torch.ones(2, 1, dtype=torch.bool)], 1)
        step = model(nxt, pos[:, -1:] + 1, kv_cache=cache, attn_mask=keep2[:, None, None, :])
        alone_a = model(torch.cat([a, nxt[0]])[None])
        alone_b = model(torch.cat([b, nxt[1]])[None])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], alone_a[0, :7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 3:], alone_b[0, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[0, 0], alone_a[0, 7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], alone_b[0, 4], atol=1e-5, rtol=1e-5)


def test_loss_is_weighted_cross_entropy_over_the_given_normalizer():
    model = tiny_model()
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 97, (2, 8), generator=g)
    labels = torch.randint(0, 97, (2, 8), generator=g)
    labels[0, :3] = -100
    weights = torch.rand(2, 8, generator=g) * (labels != -100)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * 2)
    batch = {"input_ids": ids, "labels": labels, "loss_weights": weights, "position_ids": pos}
    with torch.no_grad():
        loss = model.loss(batch, torch.tensor(37.0))
        logits = model(ids, pos)
    ce = F.cross_entropy(logits.view(-1, 97), labels.view(-1).clamp_min(0), reduction="none")
    torch.testing.assert_close(loss, (ce * weights.view(-1)).sum() / 37.0)


def test_a_batch_without_trained_tokens_gives_zero_loss_and_finite_gradients():
    model = tiny_model().train()
    ids = torch.randint(0, 97, (2, 8))
    batch = {
        "input_ids": ids,
        "labels": torch.full((2, 8), -100),
        "loss_weights": torch.zeros(2, 8),
        "position_ids": torch.zeros(2, 8, dtype=torch.long),  # all padding: one doc per token
    }
    loss = model.loss(batch, torch.tensor(1.0))
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_casting_to_bfloat16_keeps_rope_tables_in_fp32():
    model = tiny_model().to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32
    ref = tiny_model()
    torch.testing.assert_close(model.rope_cos, ref.rope_cos)
    out = model(torch.randint(0, 97, (1, 5)))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bf16_autocast_forward_is_close_to_fp32():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        ref = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=5e-2, rtol=5e-2)
