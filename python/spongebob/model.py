"""The SpongeBob model: a LLaMA-style decoder (contracts.md §4).

Pre-norm RMSNorm, RoPE in Hugging Face's `rotate_half` layout, SwiGLU, grouped-query attention,
no biases, tied input/output embeddings. Module names are LLaMA's (`embed_tokens`,
`layers.N.self_attn.q_proj`, ...) so the weights map one-to-one onto `transformers`'
`LlamaForCausalLM` by prefixing `model.` (see `hf_state_dict`).

Attention has three modes, picked by the arguments of `forward`:

* training / scoring (no cache, no mask): block-diagonal causal over the documents packed into a
  row. A new document starts at every `position_ids == 0`, so doc_id = cumsum(position_ids == 0).
  On CUDA this goes through FlexAttention (a block mask skips the tiles that cross documents);
  elsewhere through SDPA with a boolean mask.
* generation with a `KVCache`: new keys/values are written after the cached ones and the queries
  attend causally to everything cached.
* an explicit `attn_mask` (bool [B, 1, Tq, Tk], True = attend), e.g. for left-padded prompts;
  combined with causality.

The ops that have Triton versions (RMSNorm, RoPE, fused linear + cross-entropy) come from
`spongebob.kernels.get_ops(kernels, device)`. Which kernels and which attention backend run are
runtime choices of the model object (`SpongeBob(config, kernels=..., attention=...)`, or
`set_runtime` later), never part of `ModelConfig`: a checkpoint trained with Triton on a GPU
loads and runs on a CPU (contracts.md §4).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from spongebob.kernels import get_ops
from spongebob.kernels.reference import rope_cache

KERNELS = ("auto", "torch", "triton")
ATTENTION = ("auto", "sdpa", "flex")


@dataclass
class ModelConfig:
    """Architecture of the decoder. `asdict(config)` is what checkpoints store as "model"."""

    vocab_size: int = 6400
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8
    ffn_dim: int = 1408
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    max_seq_len: int = 32768  # size of the RoPE tables (MiniMind's max_position_embeddings)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Build from a checkpoint's "model" dict, ignoring keys it does not know (runtime
        switches that older checkpoints stored, or fields a newer version may add)."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


PRESETS: dict[str, ModelConfig] = {
    # The tutorial's model: 28,975,616 parameters with vocab 6400.
    "spongebob": ModelConfig(),
    # MiniMind2-Small: the same with 2 KV heads, 25,829,888 parameters.
    "minimind2-small": ModelConfig(n_kv_heads=2),
    # A CPU demo size; its vocab is replaced by the tokenizer's when training.
    "tiny": ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=352),
    # The `spongebob demo` size: small enough to train every stage on a 2-core CPU in
    # minutes. It learns to copy a value from its context only after some 300-900 pretraining
    # steps (benchmarks/copy_curve.py), which sets the demo's pretraining length.
    "demo": ModelConfig(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=512),
    # 2.4x the demo's parameters (4.75M with vocab 2048): `spongebob demo
    # --preset demo-wide` measures what the demo's targets cost in model size (README).
    "demo-wide": ModelConfig(dim=256, n_layers=6, n_heads=8, n_kv_heads=2, ffn_dim=704),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A copy of a preset with some fields replaced (e.g. vocab_size from the tokenizer)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def format_params(n: int) -> str:
    """28975616 -> '28.98M' (how the tutorial prints the size)."""
    return f"{n / 1e6:.2f}M"


class KVCache:
    """Preallocated keys/values for incremental decoding.

    Per layer k and v are [B, max_len, Hk, D]; `length` tokens of each row are filled. The model
    writes the new tokens' k/v at [length, length + T) in every layer and advances `length` once
    per forward. Rows of a batch share `length`: left-pad prompts and pass `attn_mask` (and the
    matching `position_ids`) to batch prompts of different lengths.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, max_len, config.n_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, T, Hk, D] after the cached tokens; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[layer][:, start:end] = k.to(self.k[layer].dtype)
        self.v[layer][:, start:end] = v.to(self.v[layer].dtype)
        return self.k[layer][:, :end], self.v[layer][:, :end]


# --- attention masks -------------------------------------------------------------------------


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] document index of every token: a new document starts at each position 0."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=1)


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T]: query i sees key j iff j <= i and both are in the same document."""
    doc = document_ids(position_ids)
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :])).unsqueeze(1)


_flex_attention = None


def _flex(q, k, v, block_mask, enable_gqa):
    """FlexAttention, compiled once per process (uncompiled it runs a slow reference path)."""
    global _flex_attention
    from torch.nn.attention.flex_attention import flex_attention

    if not q.is_cuda:  # CPU: the unfused reference (tests compare it with the SDPA path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _flex_attention is None:
        _flex_attention = torch.compile(flex_attention, dynamic=False)
    return _flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def flex_block_mask(position_ids: torch.Tensor):
    """A FlexAttention BlockMask for block-diagonal causal attention over packed documents."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids(position_ids)
    B, T = position_ids.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    return create_block_mask(mask_mod, B, None, T, T, device=position_ids.device)


# --- layers ----------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: SimpleNamespace) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, ops: SimpleNamespace) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.ops = ops

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        position_ids: torch.Tensor,
        mask: AttentionMask,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = self.ops.apply_rope(q, k, cos, sin, position_ids)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)
            v = v.to(q.dtype)
            k = k.to(q.dtype)
        # SDPA / FlexAttention want [B, H, T, D].
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = self.n_kv_heads != self.n_heads
        if mask.flex is not None:
            y = _flex(q, k, v, mask.flex, gqa)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.dense, is_causal=mask.is_causal, enable_gqa=gqa
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, ops: SimpleNamespace) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps, ops)
        self.self_attn = Attention(config, layer, ops)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps, ops)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, position_ids, mask, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, position_ids, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class AttentionMask:
    """How one forward pass masks attention (shared by all layers, built once)."""

    dense: torch.Tensor | None = None  # bool [B, 1, Tq, Tk] for SDPA
    is_causal: bool = False
    flex: object | None = None  # a FlexAttention BlockMask


class SpongeBob(nn.Module):
    """The decoder. `forward` gives fp32 logits; `loss` the contracts.md §2 loss without logits."""

    def __init__(self, config: ModelConfig, kernels: str = "auto", attention: str = "auto") -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.kernels = "auto"
        self.attention = "auto"
        self.set_runtime(kernels, attention)
        self.ops = get_ops("torch")  # replaced by _select_ops once the device is known
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i, self.ops) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, self.ops)
        cos, sin = rope_cache(config.head_dim, config.max_seq_len, config.rope_theta)
        # Not persistent: recomputed from the config, so never stored in checkpoints.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        self._select_ops()

    # -- set-up --

    def reset_parameters(self) -> None:
        """GPT-2/LLaMA-style init: N(0, 0.02), residual projections scaled by 1/sqrt(2·layers)
        so the residual stream's variance does not grow with depth; norms at 1. The tied
        embedding also uses 0.02 (nn.Embedding's N(0, 1) would start with huge logits)."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def _apply(self, fn, recurse=True):
        # Re-pick the op set when the model moves, so kernels="auto" follows the device, and
        # keep the RoPE tables in fp32 even through `model.to(torch.bfloat16)`.
        out = super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            c = self.config
            cos, sin = rope_cache(c.head_dim, c.max_seq_len, c.rope_theta, self.rope_cos.device)
            self.rope_cos, self.rope_sin = cos, sin
        self._select_ops()
        return out

    def set_runtime(self, kernels: str | None = None, attention: str | None = None) -> SpongeBob:
        """Choose the op set (torch | triton | auto = Triton on CUDA) and the attention backend
        for packed rows (sdpa | flex | auto = FlexAttention on CUDA). Weights are untouched."""
        if kernels is not None:
            if kernels not in KERNELS:
                raise ValueError(f"kernels must be {', '.join(KERNELS)}, not {kernels!r}")
            self.kernels = kernels
        if attention is not None:
            if attention not in ATTENTION:
                raise ValueError(f"attention must be {', '.join(ATTENTION)}, not {attention!r}")
            self.attention = attention
        if hasattr(self, "embed_tokens"):
            self._select_ops()
        return self

    def _select_ops(self) -> None:
        device = self.embed_tokens.weight.device
        if device.type == "meta":
            return
        ops = get_ops(self.kernels, str(device))
        self.ops = ops
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention)):
                m.ops = ops

    def num_parameters(self) -> int:
        """Distinct parameters (the tied output projection counted once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), docs/architecture.md "MFU":
        6 per trained weight (a multiply-add forward, two backward) and 4 per frozen one (a LoRA
        run's base still passes gradients to its input), the tied output layer counted once,
        + 12 · layers · dim · seq_len for the attention scores and their use (causal attention
        over a full row; packed documents attend less, so MFU is an upper bound there)."""
        c = self.config
        trained = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = self.num_parameters() - trained
        return 6.0 * trained + 4.0 * frozen + 12.0 * c.n_layers * c.dim * seq_len

    # -- forward --

    def _mask(
        self,
        B: int,
        T: int,
        position_ids: torch.Tensor | None,
        kv_cache: KVCache | None,
        attn_mask: torch.Tensor | None,
        device: torch.device,
    ) -> AttentionMask:
        past = kv_cache.length if kv_cache is not None else 0
        if attn_mask is None and kv_cache is None:
            if position_ids is None:
                return AttentionMask(is_causal=True)
            use_flex = self.attention == "flex" or (
                self.attention == "auto" and device.type == "cuda"
            )
            if use_flex:
                return AttentionMask(flex=flex_block_mask(position_ids))
            return AttentionMask(dense=block_causal_mask(position_ids))
        if attn_mask is None and T == 1:
            return AttentionMask()  # one new token sees every cached one
        if attn_mask is None and past == 0:
            return AttentionMask(is_causal=True)
        Tk = past + T
        # Query i (absolute index past + i) sees keys j <= past + i.
        causal = torch.ones(T, Tk, dtype=torch.bool, device=device).tril(diagonal=past)
        mask = causal[None, None].expand(B, 1, T, Tk)
        if attn_mask is not None:
            if attn_mask.shape[-1] != Tk or attn_mask.shape[-2] != T:
                raise ValueError(
                    f"attn_mask {tuple(attn_mask.shape)} does not match [B, 1, {T}, {Tk}]"
                )
            # A query always sees itself: a fully masked row (a padding query) would give NaN
            # in SDPA, and 0 · NaN still poisons the later tokens that read its value.
            diag = torch.zeros(T, Tk, dtype=torch.bool, device=device)
            diag[torch.arange(T), past + torch.arange(T)] = True
            mask = (mask & attn_mask.to(torch.bool)) | diag
        return AttentionMask(dense=mask)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-norm hidden states [B, T, dim] (the input of the tied output layer)."""
        B, T = input_ids.shape
        device = input_ids.device
        mask = self._mask(B, T, position_ids, kv_cache, attn_mask, device)
        if position_ids is None:
            start = kv_cache.length if kv_cache is not None else 0
            position_ids = torch.arange(start, start + T, device=device).expand(B, T)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin, position_ids, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        loss_weights: torch.Tensor | None = None,
        normalizer: torch.Tensor | None = None,
        logits_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] in fp32, or, when `labels` is given, the training loss.

        `logits_mask` (bool [B, T]) gives logits [N, vocab] of only the N positions it marks,
        in row-major order: the output layer is most of the compute of a small model, so a
        DPO/GRPO pass scores just its trained tokens and a prefill just its last position.
        The loss form exists because DDP only synchronises gradients for calls that go
        through `forward`; `loss(batch, normalizer)` is the friendlier spelling.
        """
        h = self.hidden_states(input_ids, position_ids, kv_cache, attn_mask)
        if logits_mask is not None:
            h = h[logits_mask.to(h.device, torch.bool)]
        if labels is not None:
            if loss_weights is None:
                loss_weights = (labels != -100).to(torch.float32)
            if normalizer is None:
                normalizer = (labels != -100).sum().clamp_min(1).to(torch.float32)
            weight = self.embed_tokens.weight
            if torch.is_autocast_enabled(h.device.type):
                # A custom (Triton) op is not autocast; give it what autocast would have given
                # the matmul, so both op sets compute the logits in the same precision.
                dt = torch.get_autocast_dtype(h.device.type)
                h, weight = h.to(dt), weight.to(dt)
            return self.ops.linear_cross_entropy(
                h.reshape(-1, h.shape[-1]),
                weight,
                labels.reshape(-1),
                loss_weights.reshape(-1),
                normalizer,
            )
        return F.linear(h, self.embed_tokens.weight).float()

    def loss(
        self, batch: dict[str, torch.Tensor], normalizer: torch.Tensor | float
    ) -> torch.Tensor:
        """Σ wᵢ·ceᵢ / normalizer over a loader batch (contracts.md §2), logits never materialized
        in the Triton path. `normalizer` is Σ mᵢ over the whole optimizer step."""
        if not torch.is_tensor(normalizer):
            normalizer = torch.tensor(float(normalizer))
        dev = self.embed_tokens.weight.device
        return self(
            batch["input_ids"].to(dev),
            batch["position_ids"].to(dev),
            labels=batch["labels"].to(dev),
            loss_weights=batch["loss_weights"].to(dev),
            normalizer=normalizer.to(dev, torch.float32),
        )


# --- Hugging Face mapping --------------------------------------------------------------------


def hf_state_dict(model: SpongeBob, include_lm_head: bool = True) -> dict[str, torch.Tensor]:
    """The model's weights under LlamaForCausalLM names: ours with a `model.` prefix, and the
    tied embedding again as `lm_head.weight`."""
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    if include_lm_head:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def hf_config_dict(config: ModelConfig) -> dict:
    """The matching `transformers.LlamaConfig` fields."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
