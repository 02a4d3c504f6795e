"""`spongebob export hf`: a checkpoint as a Hugging Face `LlamaForCausalLM` folder.

The model is LLaMA to the letter (contracts.md §4: pre-norm RMSNorm, `rotate_half` RoPE, SwiGLU,
GQA, no biases, tied embeddings), so export is a rename plus the files `transformers` reads:

* `config.json` — LlamaConfig fields (rope theta written both as `rope_theta`, read by
  transformers 4, and in `rope_parameters`, read by 5);
* `model.safetensors` — the weights under LLaMA names; the tied output layer is not stored
  (safetensors refuses shared tensors; `tie_word_embeddings` restores it on load);
* `generation_config.json` — bos/eos/pad, so `generate` stops at `</s>`;
* `tokenizer.json`, `tokenizer_config.json` with the chat template (added if the checkpoint's
  tokenizer config lacks one, e.g. MiniMind's), `special_tokens_map.json`;
* `README.md` — how to load it.

From there llama.cpp's `convert_hf_to_gguf.py` or vLLM take it like any LLaMA.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from spongebob.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


def hf_config(model_config, tok, dtype: str = "float32") -> dict:
    """config.json for LlamaForCausalLM, with the tokenizer's special ids."""
    from spongebob.model import hf_config_dict

    cfg = hf_config_dict(model_config)
    cfg.update(
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        rope_parameters={"rope_type": "default", "rope_theta": model_config.rope_theta},
        torch_dtype=dtype,
        dtype=dtype,
        use_cache=True,
        initializer_range=0.02,
        attention_dropout=0.0,
        pretraining_tp=1,
    )
    return cfg


def tokenizer_config(tok_dir: Path) -> dict:
    """The checkpoint's tokenizer_config.json, completed so `AutoTokenizer` and
    `apply_chat_template` work: class, specials and our chat template."""
    from spongebob.tokenizer import CHAT_TEMPLATE

    path = tok_dir / "tokenizer_config.json"
    cfg: dict = {}
    if path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: unreadable ({e})") from None
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for key, token in (
        ("bos_token", "<s>"),
        ("eos_token", "</s>"),
        ("pad_token", "<unk>"),
        ("unk_token", "<unk>"),
    ):
        cfg.setdefault(key, token)
    cfg.setdefault("add_bos_token", False)
    cfg.setdefault("add_eos_token", False)
    cfg.setdefault("clean_up_tokenization_spaces", False)
    cfg.setdefault("model_max_length", 32768)
    cfg["chat_template"] = cfg.get("chat_template") or CHAT_TEMPLATE
    return cfg


def export_hf(
    ckpt: Path | str,
    out: Path | str,
    dtype: str = "float32",
    tokenizer: Path | str | None = None,
    force: bool = False,
) -> Path:
    """Write the HF folder for `ckpt` into `out` (atomically: a temp dir, then a rename)."""
    import torch
    from safetensors.torch import save_file

    from spongebob import checkpoint
    from spongebob.model import hf_state_dict

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out}: exists and is not empty (pass --force to replace it)")
    loaded = checkpoint.load(ckpt, "cpu", tokenizer=tokenizer, kernels="torch")
    model, tok, meta = loaded.model, loaded.tokenizer, loaded.meta
    tok_dir = Path(tok.path).parent

    tmp = out.parent / f".tmp-export-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weights = {
            k: v.detach().to(getattr(torch, dtype)).contiguous()
            for k, v in hf_state_dict(model, include_lm_head=False).items()
        }
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config(model.config, tok, dtype))
        _write_json(
            tmp / "generation_config.json",
            {
                "bos_token_id": tok.bos_id,
                "eos_token_id": tok.eos_id,
                "pad_token_id": tok.pad_id,
                "do_sample": True,
                "temperature": 0.85,
                "top_p": 0.85,
            },
        )
        shutil.copyfile(tok.path, tmp / "tokenizer.json")
        tcfg = tokenizer_config(tok_dir)
        _write_json(tmp / "tokenizer_config.json", tcfg)
        _write_json(
            tmp / "special_tokens_map.json",
            {k: tcfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        )
        (tmp / "README.md").write_text(_readme(meta, model), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _readme(meta: dict, model) -> str:
    from spongebob.model import format_params

    return f"""# SpongeBob model (LlamaForCausalLM)

Exported by `spongebob export hf` from `{meta.get("path")}` (stage {meta.get("stage", "?")},
step {meta.get("step", "?")}); {format_params(model.num_parameters())} parameters.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("THIS_DIR")
model = AutoModelForCausalLM.from_pretrained("THIS_DIR")
ids = tok.apply_chat_template([{{"role": "user", "content": "你好"}}],
                              add_generation_prompt=True, return_tensors="pt")
print(tok.decode(model.generate(ids, max_new_tokens=64)[0][ids.shape[1]:]))
```

Or chat with it: `spongebob chat --ckpt THIS_DIR`.
"""


def add_commands(sub) -> None:
    """`spongebob export hf`."""
    p = sub.add_parser("export", help="export a checkpoint (Hugging Face transformers format)")
    esub = p.add_subparsers(dest="export_format", required=True, metavar="FORMAT")
    h = esub.add_parser("hf", help="a LlamaForCausalLM folder: config, safetensors, tokenizer")
    h.add_argument(
        "--ckpt",
        required=True,
        type=Path,
        metavar="PATH",
        help="run folder, stage folder or checkpoint dir",
    )
    h.add_argument("--out", required=True, type=Path, metavar="DIR")
    h.add_argument("--dtype", choices=DTYPES, default="float32")
    h.add_argument("--tokenizer", type=Path, metavar="DIR")
    h.add_argument("--force", action="store_true", help="replace a non-empty --out")
    h.set_defaults(func=_cmd_export_hf)


def _cmd_export_hf(args) -> int:
    out = export_hf(args.ckpt, args.out, args.dtype, args.tokenizer, args.force)
    print(f"exported to {out}", file=sys.stderr)
    return 0
