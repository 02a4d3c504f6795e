"""Checkpoints: the one save (atomic, keep-last-K, resume state) and the one `load` for every
consumer (training init and resume, chat, eval, export, the demo), exported HF folders included.

Layout of a run folder `OUT/`:

    OUT/<stage>/checkpoints/step_00001000/   every --save-every steps, the last --keep kept
    OUT/<stage>/final/                       at the end of the stage
    OUT/<stage>/metrics.jsonl

A checkpoint directory holds

* `model.safetensors` — the model's state_dict (the tied embedding stored once; LLaMA's
  names without the `model.` prefix),
* `config.json` — {"model": asdict(ModelConfig), "stage", "step", "train": asdict(TrainConfig),
  ...},
* `tokenizer.json`, `tokenizer_config.json` — so a checkpoint is self-contained,
* `train_state.pt` — optimizer, step, RNG states and loader states, loaded with
  `weights_only=True` (no pickled code runs on load).

A LoRA checkpoint (`--lora-rank R`, spongebob.lora) holds `adapter_model.safetensors` (only the
adapters, under PEFT's names) in place of `model.safetensors`, and its config.json a "lora"
section: rank, alpha, dropout, targets and "base": the checkpoint the adapters were trained on
(its resolved path, the path relative to this checkpoint, and the sha256 of its weights file).
`load` loads that base (refused if it is missing or its weights changed), applies the adapters
and merges them, so every consumer sees a plain model; `merge_lora=False` keeps them apart
(resume, the adapter-only export).

Writes go to a hidden temporary directory next to the target, every file is fsynced, and only
then is the directory renamed into place: a crash at any moment leaves either the old checkpoint
or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from spongebob import lora
from spongebob.config import STAGE_ORDER
from spongebob.errors import UserError

if TYPE_CHECKING:
    from spongebob.data import ChatTokenizer
    from spongebob.model import SpongeBob

STEP_RE = re.compile(r"^step_(\d{8,})$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MODEL_FILE = "model.safetensors"
WEIGHT_FILES = (MODEL_FILE, lora.ADAPTER_FILE)  # a full checkpoint's, a LoRA checkpoint's
TMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _set_chat_template(path: Path, chat_template: str) -> None:
    cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if cfg.get("chat_template") != chat_template:
        cfg["chat_template"] = chat_template
        path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    meta: dict,
    tokenizer_dir: Path | None = None,
    train_state: dict | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write a complete checkpoint to `path` atomically (temp dir + rename). `chat_template`
    (the tokenizer's family, contracts.md §2) is written into the copied tokenizer_config.json
    when it differs, so loading the checkpoint selects the family it was trained with.

    A model with LoRA adapters is saved as a LoRA checkpoint: only the adapters, and `meta`
    must carry "lora" with "base" (`base_reference` of the checkpoint they were applied to)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if lora.has_lora(model):
        info = meta.get("lora") or {}
        if not isinstance(info.get("base"), dict) or "sha256" not in info["base"]:
            raise ValueError("a LoRA checkpoint needs meta['lora']['base'] (base_reference)")
        base = dict(info["base"])
        base["relative"] = os.path.relpath(base["path"], path.resolve())
        meta = {**meta, "lora": {**info, "base": base}}
        weights, weights_name = lora.adapter_state_dict(model), lora.ADAPTER_FILE
    else:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        weights_name = MODEL_FILE
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / weights_name), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)
            if chat_template is not None:
                _set_chat_template(tmp / "tokenizer_config.json", chat_template)
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        old = None
        if path.exists():  # e.g. final/ of an earlier attempt: swap, then delete the old one
            old = path.parent / f"{TMP_PREFIX}old-{path.name}-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def clean_stale_temps(root: Path) -> list[Path]:
    """Remove temp dirs left by a crash during a write (they are never valid checkpoints)."""
    removed = []
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def list_step_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete step checkpoints under `ckpt_root`, oldest first."""
    ckpt_root = Path(ckpt_root)
    out = []
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            m = STEP_RE.match(p.name)
            if m and p.is_dir() and weights_file(p) is not None:
                out.append((int(m.group(1)), p))
    return sorted(out)


def prune_checkpoints(ckpt_root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step checkpoints (keep = 0 keeps all)."""
    if keep <= 0:
        return []
    ckpts = list_step_checkpoints(ckpt_root)
    doomed = [p for _, p in ckpts[:-keep]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest step checkpoint of a stage folder, or None."""
    ckpts = list_step_checkpoints(Path(stage_dir) / "checkpoints")
    return ckpts[-1][1] if ckpts else None


def weights_file(ckpt: Path) -> Path | None:
    """The weights of a checkpoint dir: model.safetensors, or a LoRA checkpoint's adapter."""
    for name in WEIGHT_FILES:
        if (Path(ckpt) / name).is_file():
            return Path(ckpt) / name
    return None


def is_checkpoint(path: Path) -> bool:
    return weights_file(path) is not None and (Path(path) / "config.json").is_file()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def base_reference(ckpt: Path) -> dict:
    """What a LoRA checkpoint records about its base: the resolved path of the checkpoint (or
    exported HF folder) and the sha256 of its weights file."""
    ckpt = Path(ckpt).resolve()
    f = weights_file(ckpt)
    if f is None:
        raise UserError(f"{ckpt}: no weights file to train LoRA adapters on")
    return {"path": str(ckpt), "sha256": file_sha256(f)}


def lora_base(ckpt: Path, info: dict) -> Path:
    """The base checkpoint of the LoRA checkpoint `ckpt` (its "lora" section `info`): the
    recorded path, else the one relative to `ckpt` (a run folder moved as a whole), whose
    weights still have the recorded sha256. Missing or changed: a one-line UserError."""
    base = info.get("base")
    if not isinstance(base, dict) or not base.get("path") or not base.get("sha256"):
        raise UserError(f'{ckpt / "config.json"}: a LoRA checkpoint without its "base" reference')
    candidates = [Path(base["path"])]
    if base.get("relative"):
        candidates.append(Path(os.path.normpath(Path(ckpt).resolve() / base["relative"])))
    changed = None
    for c in candidates:
        f = weights_file(c)
        if f is None:
            continue
        if file_sha256(f) == base["sha256"]:
            return c.resolve()
        changed = changed or c
    if changed is not None:
        raise UserError(
            f"{ckpt}: its base checkpoint {changed} changed since the LoRA adapters were "
            f"trained on it (sha256 of {weights_file(changed).name} is no longer "
            f"{base['sha256'][:12]}…); restore that base or retrain the adapters"
        )
    raise UserError(
        f"{ckpt}: its base checkpoint {base['path']} is missing (the LoRA adapters need it); "
        "restore it to load this checkpoint"
    )


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint directory from a run folder, a stage folder or a checkpoint directory.

    Run folder: the final checkpoint of the latest stage that has one (pretrain < sft <
    sft-long < distill). Stage folder: its `final/`, else its newest step checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such checkpoint, stage or run folder")
    if is_checkpoint(p):
        return p
    if is_checkpoint(p / "final"):
        return p / "final"
    for stage in reversed(STAGE_ORDER):
        if is_checkpoint(p / stage / "final"):
            return p / stage / "final"
    latest = latest_checkpoint(p)
    if latest is not None:
        return latest
    raise UserError(
        f"{p}: not a checkpoint (no model.safetensors + config.json), and no stage "
        "final/ or step checkpoint inside"
    )


def read_meta(ckpt: Path) -> dict:
    return _read_json(Path(ckpt) / "config.json")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _read_weights(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: corrupt or unreadable safetensors file ({msg})") from None


def _hf_model_config(hf: dict, path: Path):
    """Our ModelConfig from a LlamaForCausalLM config.json (an exported folder)."""
    from spongebob.model import ModelConfig

    try:
        rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 1e6)
        if not hf.get("tie_word_embeddings", False):
            raise UserError(f"{path}: untied input/output embeddings are not supported")
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            dim=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=int(hf["num_attention_heads"]),
            n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            ffn_dim=int(hf["intermediate_size"]),
            rope_theta=float(rope),
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            max_seq_len=int(hf.get("max_position_embeddings", 32768)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a LLaMA config this model can load ({e})") from None


@dataclass
class Loaded:
    """What `load` returns: the model (eval mode, on the device), its tokenizer, and the
    checkpoint's config.json plus "path" (the resolved checkpoint dir) and "format"."""

    model: SpongeBob
    tokenizer: ChatTokenizer
    meta: dict

    @property
    def path(self) -> Path:
        return Path(self.meta["path"])


def load(
    path: Path | str,
    device: str | torch.device = "cpu",
    *,
    tokenizer: Path | str | None = None,
    template: str | None = None,
    empty_think: str = "keep",
    kernels: str = "auto",
    attention: str = "auto",
    max_seq_len: int | None = None,
    merge_lora: bool = True,
) -> Loaded:
    """The one loader of weights, for training init and resume, chat, eval, export and the demo.

    `path`: a run folder (its latest stage's final checkpoint), a stage folder (its final, else
    its newest step checkpoint), a checkpoint directory, a `model.safetensors` inside one, or an
    exported Hugging Face folder. `tokenizer` overrides the tokenizer stored with the weights;
    its vocab must equal the model's; `template` overrides its family and `empty_think` is the
    chatml training option (contracts.md §2). `kernels` and `attention` are runtime choices
    (never read from the checkpoint), so a model trained with Triton runs on a CPU.
    `max_seq_len` enlarges the RoPE tables (it does not change the weights). A LoRA checkpoint
    loads its base, applies the adapters and merges them; with `merge_lora=False` the model
    keeps its `LoRALinear` layers (frozen base, trainable adapters). Every way this can fail is
    a one-line UserError.
    """
    from spongebob.runtime import check_kernels, resolve_device
    from spongebob.tokenizer import load as load_tokenizer

    model, meta, ckpt = _load_model(Path(path), kernels, attention, max_seq_len, merge_lora)
    cfg = model.config
    dev = resolve_device(device) if isinstance(device, str) else device
    check_kernels(kernels, dev)
    model.to(dev).eval()

    tok_dir = Path(tokenizer) if tokenizer is not None else ckpt
    if tokenizer is None and not (tok_dir / "tokenizer.json").is_file():
        raise UserError(f"{ckpt}: no tokenizer.json; pass --tokenizer DIR")
    tok = load_tokenizer(tok_dir, template, empty_think)
    if tok.vocab_size != cfg.vocab_size:
        raise UserError(
            f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model in {ckpt} "
            f"was trained with {cfg.vocab_size}: they do not belong together"
        )
    return Loaded(model, tok, meta)


def _load_model(
    p: Path, kernels: str, attention: str, max_seq_len: int | None, merge_lora: bool
) -> tuple[SpongeBob, dict, Path]:
    """(model on the CPU, meta, resolved checkpoint dir) of any path `load` accepts."""
    from spongebob.model import ModelConfig, SpongeBob

    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent
    if not p.exists():
        raise UserError(f"{p}: no such checkpoint, stage or run folder")
    cfg_path = p / "config.json"
    hf = _read_json(cfg_path) if cfg_path.is_file() else {}
    if "model" not in hf and hf.get("model_type") == "llama":
        cfg = _hf_model_config(hf, cfg_path)
        state = _read_weights(p / "model.safetensors")
        state = {k.removeprefix("model."): v for k, v in state.items() if k != "lm_head.weight"}
        meta: dict = {"format": "hf", "model": asdict(cfg)}
        ckpt = p
    else:
        ckpt = resolve_checkpoint(p)
        meta = read_meta(ckpt)
        if not isinstance(meta.get("model"), dict):
            raise UserError(f'{ckpt / "config.json"}: no "model" section')
        try:
            cfg = ModelConfig.from_dict(meta["model"])
        except TypeError as e:
            raise UserError(f"{ckpt / 'config.json'}: bad model config ({e})") from None
        meta.setdefault("format", "spongebob")
        if meta.get("lora"):
            # The base's RoPE tables as long as those the adapters were trained with.
            longest = max(max_seq_len or 0, cfg.max_seq_len)
            return _load_lora(ckpt, meta, kernels, attention, longest, merge_lora)
        state = _read_weights(ckpt / MODEL_FILE)
    meta["path"] = str(ckpt)
    if max_seq_len is not None and max_seq_len > cfg.max_seq_len:
        cfg.max_seq_len = max_seq_len
    try:
        cfg.validate()
        model = SpongeBob(cfg, kernels=kernels, attention=attention)
        model.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()
        raise UserError(
            f"{ckpt}: weights do not fit the configured model ({' '.join(first[:2])})"
        ) from None
    return model, meta, ckpt


def _load_lora(
    ckpt: Path, meta: dict, kernels: str, attention: str, max_seq_len: int | None, merge: bool
) -> tuple[SpongeBob, dict, Path]:
    """A LoRA checkpoint: its verified base (merged, if itself a LoRA checkpoint), the adapters
    applied, then merged unless `merge` is False."""
    info = meta["lora"]
    try:
        spec = lora.LoRASpec.from_dict(info)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f'{ckpt / "config.json"}: bad "lora" section ({e})') from None
    base = lora_base(ckpt, info)
    model, _, _ = _load_model(base, kernels, attention, max_seq_len, merge_lora=True)
    state = _read_weights(ckpt / lora.ADAPTER_FILE)
    try:
        lora.apply_lora(model, spec.rank, spec.alpha, spec.dropout, spec.targets)
        lora.load_adapter_state_dict(model, state)
    except ValueError as e:
        raise UserError(f"{ckpt}: {e}") from None
    if merge:
        lora.merge_lora(model)
    meta["lora"] = {**info, "base": {**info["base"], "path": str(base)}}
    meta["path"] = str(ckpt)
    return model, meta, ckpt


def load_train_state(ckpt: Path) -> dict:
    """The optimizer/step/RNG/loader state of a checkpoint (no code runs: weights_only)."""
    f = Path(ckpt) / "train_state.pt"
    if not f.is_file():
        raise UserError(f"{ckpt}: no train_state.pt, so it cannot be resumed")
    return torch.load(f, map_location="cpu", weights_only=True)
