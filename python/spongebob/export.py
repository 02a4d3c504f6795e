"""`spongebob export hf`: a checkpoint as a Hugging Face `LlamaForCausalLM` folder.

The model is LLaMA to the letter (contracts.md §4: pre-norm RMSNorm, `rotate_half` RoPE, SwiGLU,
GQA, no biases, tied embeddings), so export is a rename plus the files `transformers` reads:

* `config.json` — LlamaConfig fields (rope theta written both as `rope_theta`, read by
  transformers 4, and in `rope_parameters`, read by 5);
* `model.safetensors` — the weights under LLaMA names; the tied output layer is not stored
  (safetensors refuses shared tensors; `tie_word_embeddings` restores it on load);
* `generation_config.json` — bos/eos/pad, so `generate` stops at the family's stop tokens;
* `tokenizer.json`, `tokenizer_config.json` with the template family's chat template and
  specials (added if the checkpoint's tokenizer config lacks them, e.g. MiniMind2's),
  `special_tokens_map.json`;
* `README.md` — how to load it.

From there llama.cpp's `convert_hf_to_gguf.py` or vLLM take it like any LLaMA.

A LoRA checkpoint (`--lora-rank`) is exported merged (W + scaling · B·A) by default. With
`--adapter-only` the folder is a PEFT adapter instead: `adapter_config.json` and
`adapter_model.safetensors` (plus the tokenizer files and a README), to load with
`peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(BASE), THIS_DIR)`, where BASE
is the HF export of the adapter's base checkpoint (`--base-model` names it in the config).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Iterator
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


def tokenizer_config(tok) -> dict:
    """The checkpoint's tokenizer_config.json, completed so `AutoTokenizer` and
    `apply_chat_template` work: class, the template family's specials and Jinja template
    (contracts.md §2; a MiniMind folder without one gets ours)."""
    path = Path(tok.path).parent / "tokenizer_config.json"
    cfg: dict = {}
    if path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: unreadable ({e})") from None
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for key, token in (
        ("bos_token", tok.bos_token),
        ("eos_token", tok.eos_token),
        ("pad_token", tok.pad_token),
        ("unk_token", tok.pad_token),
    ):
        cfg.setdefault(key, token)
    cfg.setdefault("add_bos_token", False)
    cfg.setdefault("add_eos_token", False)
    cfg.setdefault("clean_up_tokenization_spaces", False)
    cfg.setdefault("model_max_length", 32768)
    cfg["chat_template"] = cfg.get("chat_template") or tok.chat_template
    return cfg


def export_hf(
    ckpt: Path | str,
    out: Path | str,
    dtype: str = "float32",
    tokenizer: Path | str | None = None,
    force: bool = False,
    adapter_only: bool = False,
    base_model: str | None = None,
) -> Path:
    """Write the HF folder for `ckpt` into `out` (atomically: a temp dir, then a rename): a
    LlamaForCausalLM folder (LoRA adapters merged), or with `adapter_only` the PEFT adapter of a
    LoRA checkpoint, whose `base_model_name_or_path` is `base_model` (default: the base
    checkpoint's path; export that base with `spongebob export hf` and name its folder)."""
    from spongebob import checkpoint, lora

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if base_model is not None and not adapter_only:
        raise UserError("--base-model names the base of an adapter: use it with --adapter-only")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out}: exists and is not empty (pass --force to replace it)")
    loaded = checkpoint.load(
        ckpt, "cpu", tokenizer=tokenizer, kernels="torch", merge_lora=not adapter_only
    )
    if adapter_only and not lora.has_lora(loaded.model):
        raise UserError(
            f"{loaded.path} is not a LoRA checkpoint (one trained with --lora-rank), so it has "
            "no adapter to export; drop --adapter-only"
        )
    with _atomic_dir(out) as tmp:
        if adapter_only:
            base = base_model or loaded.meta["lora"]["base"]["path"]
            _write_adapter(tmp, loaded, dtype, base)
            (tmp / "README.md").write_text(_adapter_readme(loaded.meta, base), encoding="utf-8")
        else:
            _write_model(tmp, loaded, dtype)
            (tmp / "README.md").write_text(_readme(loaded.meta, loaded.model), encoding="utf-8")
        _write_tokenizer(tmp, loaded.tokenizer)
    return out


@contextlib.contextmanager
def _atomic_dir(out: Path) -> Iterator[Path]:
    """A temporary folder next to `out` that replaces `out` when the block succeeds."""
    tmp = out.parent / f".tmp-export-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_model(tmp: Path, loaded, dtype: str) -> None:
    """config.json, model.safetensors (LLaMA names, tied head not stored), generation config."""
    import torch
    from safetensors.torch import save_file

    from spongebob.model import hf_state_dict

    model, tok = loaded.model, loaded.tokenizer
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
            "eos_token_id": stops[0] if len(stops := list(tok.stop_ids)) == 1 else stops,
            "pad_token_id": tok.pad_id,
            "do_sample": True,
            "temperature": 0.85,
            "top_p": 0.85,
        },
    )


def _write_adapter(tmp: Path, loaded, dtype: str, base: str) -> None:
    """PEFT's adapter_model.safetensors (its tensor names) and adapter_config.json."""
    import torch
    from safetensors.torch import save_file

    from spongebob import lora

    weights = {
        k: v.to(getattr(torch, dtype)).contiguous()
        for k, v in lora.adapter_state_dict(loaded.model).items()
    }
    save_file(weights, str(tmp / lora.ADAPTER_FILE), metadata={"format": "pt"})
    spec = lora.lora_spec(loaded.model)
    _write_json(tmp / lora.ADAPTER_CONFIG_FILE, lora.adapter_config(spec, base))


def _write_tokenizer(tmp: Path, tok) -> None:
    shutil.copyfile(tok.path, tmp / "tokenizer.json")
    tcfg = tokenizer_config(tok)
    _write_json(tmp / "tokenizer_config.json", tcfg)
    _write_json(
        tmp / "special_tokens_map.json",
        {k: tcfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
    )


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _readme(meta: dict, model) -> str:
    from spongebob.model import format_params

    return f"""# SpongeBob model (LlamaForCausalLM)

Exported by `spongebob export hf` from `{meta.get("path")}` (stage {meta.get("stage", "?")},
step {meta.get("step", "?")}); {format_params(model.num_parameters())} parameters.{_merged(meta)}

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


def _merged(meta: dict) -> str:
    info = meta.get("lora")
    if not info:
        return ""
    return (
        f"\nLoRA adapters (rank {info.get('rank')}, alpha {info.get('alpha')}) merged into the "
        f"base `{info.get('base', {}).get('path')}`."
    )


def _adapter_readme(meta: dict, base: str) -> str:
    info = meta["lora"]
    return f"""# SpongeBob LoRA adapter (PEFT)

Exported by `spongebob export hf --adapter-only` from `{meta.get("path")}` (stage
{meta.get("stage", "?")}, step {meta.get("step", "?")}): rank {info["rank"]}, alpha
{info["alpha"]}, on {", ".join(info["targets"])}; {info.get("parameters", "?")} parameters.

The base is the Hugging Face export of `{info["base"]["path"]}`
(`spongebob export hf --ckpt {info["base"]["path"]} --out BASE`); `adapter_config.json` names
it as `{base}`.

```python
from peft import PeftModel
from transformers import LlamaForCausalLM

model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained("BASE"), "THIS_DIR")
model = model.merge_and_unload()  # optional: a plain LlamaForCausalLM
```
"""


def add_ckpt_argument(p) -> None:
    """`--ckpt`, as every export format takes it."""
    p.add_argument(
        "--ckpt",
        required=True,
        type=Path,
        metavar="PATH",
        help="run folder, stage folder or checkpoint dir",
    )


def add_commands(sub) -> None:
    """`spongebob export hf` and `spongebob export gguf`."""
    from spongebob import export_gguf

    p = sub.add_parser("export", help="export a checkpoint (Hugging Face folder or GGUF file)")
    esub = p.add_subparsers(dest="export_format", required=True, metavar="FORMAT")
    h = esub.add_parser("hf", help="a LlamaForCausalLM folder: config, safetensors, tokenizer")
    add_ckpt_argument(h)
    h.add_argument("--out", required=True, type=Path, metavar="DIR")
    h.add_argument("--dtype", choices=DTYPES, default="float32")
    h.add_argument("--tokenizer", type=Path, metavar="DIR")
    h.add_argument("--force", action="store_true", help="replace a non-empty --out")
    h.add_argument(
        "--adapter-only",
        action="store_true",
        help="a LoRA checkpoint as a PEFT adapter folder (adapter_config.json, "
        "adapter_model.safetensors) instead of the merged model",
    )
    h.add_argument(
        "--base-model",
        metavar="NAME_OR_DIR",
        help="with --adapter-only: the adapter config's base_model_name_or_path, i.e. the HF "
        "export of the base checkpoint (default: the base checkpoint's path)",
    )
    h.set_defaults(func=_cmd_export_hf)
    export_gguf.add_command(esub)


def _cmd_export_hf(args) -> int:
    out = export_hf(
        args.ckpt,
        args.out,
        args.dtype,
        args.tokenizer,
        args.force,
        adapter_only=args.adapter_only,
        base_model=args.base_model,
    )
    print(f"exported to {out}", file=sys.stderr)
    if not args.adapter_only:
        return 0
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    if args.base_model is None and not _is_hf_folder(Path(base)):
        print(
            f"base_model_name_or_path is {base}; export that base with `spongebob export hf "
            f"--ckpt {base} --out BASE` and load the adapter on BASE (or pass --base-model BASE)",
            file=sys.stderr,
        )
    return 0


def _is_hf_folder(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "llama"
    except (OSError, ValueError):
        return False
