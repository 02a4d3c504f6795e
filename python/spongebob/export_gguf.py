"""`spongebob export gguf`: a checkpoint as one GGUF file that llama.cpp and Ollama run.

The model is LLaMA to the letter (contracts.md §4), so the file is llama.cpp's `llama`
architecture with the usual tensor names. Three things need care:

* **RoPE layout.** Ours rotates halves (`rotate_half`, as in transformers); llama.cpp's `llama`
  rotates adjacent pairs. The rows of `wq` and `wk` are permuted per head so that pairs become
  halves (the same permutation llama.cpp's converter applies to transformers checkpoints); the
  attention scores, hence the logits, are unchanged.
* **Pre-tokenizer.** llama.cpp does not run `tokenizer.json`; it picks a built-in pre-tokenizer
  by the name in `tokenizer.ggml.pre`. Ours is `Sequence[Digits(individual), ByteLevel]`: every
  numeric character alone, then GPT-2's split. llama.cpp's `refact` is exactly that (first
  `\\p{N}`, then the GPT-2 expression); MiniMind's plain `ByteLevel` is `gpt-2`. Any other
  pre-tokenizer is refused rather than exported to split differently. tests/test_gguf.py checks
  the ids against llama.cpp on mixed Chinese, English, digits, emoji and whitespace.
* **Specials and the template family** (contracts.md §2). The family's special tokens (`<unk>`,
  `<s>`, `</s>`; or chatml's `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`) are control tokens,
  never printed; the other added tokens (reasoning and tool tags) are user-defined, so
  `<think>`… shows in llama.cpp's and Ollama's output. EOS is the family's end of turn, EOT its
  first stop token; `add_bos_token` is false (the template writes its markers itself), and the
  family's Jinja template is `tokenizer.chat_template`.

Beside the file, an Ollama `Modelfile` with the family's template, the default system prompt
(minimind2) and the stop tokens (`ollama create NAME -f Modelfile`).

`--dtype`: `f32` (exact), `f16`, or `q8_0` (2-D weights in 8-bit blocks of 32; the norms stay
f32). The tied output layer is not stored: llama.cpp reuses `token_embd` as it does for any tied
LLaMA.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from spongebob.errors import UserError

DTYPES = ("f32", "f16", "q8_0")

# transformers' LLaMA names (spongebob.model.hf_state_dict) → llama.cpp's tensor names.
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` → `blk.3.ffn_up.weight`."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        inner = ".".join(parts[3:-1])
        if inner in _LAYER_NAMES:
            return f"blk.{parts[2]}.{_LAYER_NAMES[inner]}.weight"
    raise ValueError(f"no GGUF name for tensor {hf_name}")


def halves_to_pairs(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the output rows of a q/k projection, per head, from the rotate-half layout
    (dims i and i + d/2 rotate together) to the interleaved one (dims 2i and 2i+1)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pre_tokenizer_name(tokenizer_json: dict, path: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or a `UserError` if it has none."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]

    def gpt2_byte_level(s: dict) -> bool:
        return (
            s.get("type") == "ByteLevel"
            and not s.get("add_prefix_space", False)
            and s.get("use_regex", True)
        )

    if len(steps) == 1 and gpt2_byte_level(steps[0]):
        return "gpt-2"
    if (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits")
        and gpt2_byte_level(steps[1])
    ):
        return "refact"
    raise UserError(
        f"{path}: pre-tokenizer {kinds} has no llama.cpp equivalent (supported: ByteLevel, and "
        "Digits(individual) then ByteLevel, both without prefix space); llama.cpp would split "
        "text differently from training"
    )


def _vocab(tokenizer_json: dict, path: Path) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id, their GGUF types (special added tokens are control tokens, the other
    added ones user-defined), and the merges as `"a b"` strings."""
    from gguf import TokenType

    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{path}: a {model.get('type')} model; GGUF export needs byte-level BPE")
    by_id = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tokenizer_json.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    n = max(by_id) + 1
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        raise UserError(f"{path}: token ids {missing[:5]} have no token; the vocabulary has gaps")
    tokens = [by_id[i] for i in range(n)]
    types = []
    for i in range(n):
        if i in added and added[i].get("special", False):
            types.append(int(TokenType.CONTROL))
        elif i in added:
            types.append(int(TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _weights(model, dtype: str):
    """(name, array, raw_dtype) for each tensor, q/k permuted for llama.cpp's RoPE."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    from spongebob.model import hf_state_dict

    cfg = model.config
    for hf_name, t in hf_state_dict(model, include_lm_head=False).items():
        w = t.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            w = halves_to_pairs(w, cfg.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = halves_to_pairs(w, cfg.n_kv_heads)
        name = gguf_name(hf_name)
        if w.ndim == 1 or dtype == "f32":
            yield name, np.ascontiguousarray(w, dtype=np.float32), None
        elif dtype == "f16":
            yield name, np.ascontiguousarray(w, dtype=np.float16), None
        elif w.shape[-1] % 32 == 0:
            yield name, quants.quantize(np.ascontiguousarray(w), Q.Q8_0), Q.Q8_0
        else:  # q8_0 needs rows of whole 32-blocks; such a tensor stays f16
            yield name, np.ascontiguousarray(w, dtype=np.float16), None


def export_gguf(
    ckpt: Path | str,
    out: Path | str,
    dtype: str = "f32",
    tokenizer: Path | str | None = None,
    force: bool = False,
    modelfile: bool = True,
) -> Path:
    """Write `out` (a .gguf file, atomically) and, with `modelfile`, an Ollama `Modelfile`
    next to it."""
    try:
        import gguf
    except ImportError:
        raise UserError("export gguf needs the gguf package: pip install gguf") from None
    from spongebob import checkpoint

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out}: exists (pass --force to replace it)")
    loaded = checkpoint.load(ckpt, "cpu", tokenizer=tokenizer, kernels="torch", merge_lora=True)
    model, tok = loaded.model, loaded.tokenizer
    cfg = model.config
    tok_path = Path(tok.path)
    try:
        tjson = json.loads(tok_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{tok_path}: unreadable ({e})") from None
    pre = pre_tokenizer_name(tjson, tok_path)
    tokens, types, merges = _vocab(tjson, tok_path)
    if len(tokens) != cfg.vocab_size:
        raise UserError(
            f"{tok_path}: {len(tokens)} tokens but the model has vocab_size {cfg.vocab_size}"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(Path(loaded.path).name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    ftype = {"f32": 0, "f16": 1, "q8_0": 7}[dtype]  # llama.cpp's LlamaFileType
    w.add_file_type(ftype)
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_eot_token_id(tok.stop_ids[0])
    if (unk := tok.token_to_id("<unk>")) is not None:
        w.add_unk_token_id(unk)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(tok.chat_template)
    for name, arr, raw in _weights(model, dtype):
        w.add_tensor(name, arr, raw_dtype=raw)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if modelfile:
        stops = [tok.id_to_token(i) for i in tok.stop_ids]
        text = ollama_modelfile(out.name, tok.template, stops)
        (out.parent / "Modelfile").write_text(text, encoding="utf-8")
    return out


# Ollama's Go templates for each family (contracts.md §2). minimind2: each turn
# `<s>ROLE\nTEXT</s>\n`, the default system prompt when the chat has none (Ollama adds SYSTEM as
# the first message), generation after `<s>assistant\n`. chatml: `<|im_start|>ROLE\nTEXT
# <|im_end|>\n`, tool results as a user turn of `<tool_response>` blocks, generation after
# `<|im_start|>assistant\n` (the model writes its own `<think>` block).
_OLLAMA_TEMPLATES = {
    "minimind2": (
        "{{- range .Messages }}<s>{{ .Role }}\n{{ .Content }}</s>\n{{ end }}<s>assistant\n"
    ),
    "chatml": (
        "{{- range .Messages }}"
        '{{ if eq .Role "tool" }}<|im_start|>user\n<tool_response>\n{{ .Content }}\n'
        "</tool_response><|im_end|>\n"
        "{{ else }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "{{- end }}<|im_start|>assistant\n"
    ),
}


def ollama_modelfile(gguf_file: str, family: str, stops: list[str]) -> str:
    """Ollama's Modelfile: the GGUF, the family's template, its stop tokens and sampling."""
    from spongebob.data import DEFAULT_SYSTEM

    lines = ["# Ollama: ollama create spongebob -f Modelfile && ollama run spongebob"]
    lines.append(f"FROM ./{gguf_file}")
    if family == "minimind2":
        lines.append(f'SYSTEM """{DEFAULT_SYSTEM}"""')
    lines.append(f'TEMPLATE """{_OLLAMA_TEMPLATES[family]}"""')
    lines += [f'PARAMETER stop "{t}"' for t in stops]
    lines += ["PARAMETER temperature 0.85", "PARAMETER top_p 0.85", ""]
    return "\n".join(lines)


def add_command(esub) -> None:
    """`spongebob export gguf` (registered by `spongebob.export.add_commands`)."""
    from spongebob.export import add_ckpt_argument

    g = esub.add_parser("gguf", help="one GGUF file for llama.cpp / Ollama, and a Modelfile")
    add_ckpt_argument(g)
    g.add_argument("--out", required=True, type=Path, metavar="FILE.gguf")
    g.add_argument("--dtype", choices=DTYPES, default="f32")
    g.add_argument("--tokenizer", type=Path, metavar="DIR")
    g.add_argument("--force", action="store_true", help="replace an existing --out")
    g.add_argument("--no-modelfile", action="store_true", help="skip the Ollama Modelfile")
    g.set_defaults(func=_cmd_export_gguf)


def _cmd_export_gguf(args) -> int:
    out = export_gguf(
        args.ckpt, args.out, args.dtype, args.tokenizer, args.force, not args.no_modelfile
    )
    size = out.stat().st_size / 2**20
    print(f"exported to {out} ({size:.1f} MiB, {args.dtype})", file=sys.stderr)
    if not args.no_modelfile:
        print(f"Ollama: ollama create NAME -f {out.parent / 'Modelfile'}", file=sys.stderr)
    return 0
