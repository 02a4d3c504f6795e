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

Writes go to a hidden temporary directory next to the target, every file is fsynced, and only
then is the directory renamed into place: a crash at any moment leaves either the old checkpoint
or the new one, never half of one.
"""

from __future__ import annotations

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

from spongebob.config import STAGE_ORDER
from spongebob.errors import UserError

if TYPE_CHECKING:
    from spongebob.data import ChatTokenizer
    from spongebob.model import SpongeBob

STEP_RE = re.compile(r"^step_(\d{8,})$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
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


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    meta: dict,
    tokenizer_dir: Path | None = None,
    train_state: dict | None = None,
) -> Path:
    """Write a complete checkpoint to `path` atomically (temp dir + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)
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
            if m and p.is_dir() and (p / "model.safetensors").is_file():
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


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / "model.safetensors").is_file() and (Path(path) / "config.json").is_file()


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
    kernels: str = "auto",
    attention: str = "auto",
    max_seq_len: int | None = None,
) -> Loaded:
    """The one loader of weights, for training init and resume, chat, eval, export and the demo.

    `path`: a run folder (its latest stage's final checkpoint), a stage folder (its final, else
    its newest step checkpoint), a checkpoint directory, a `model.safetensors` inside one, or an
    exported Hugging Face folder. `tokenizer` overrides the tokenizer stored with the weights;
    its vocab must equal the model's. `kernels` and `attention` are runtime choices (never read
    from the checkpoint), so a model trained with Triton runs on a CPU. `max_seq_len` enlarges
    the RoPE tables (it does not change the weights). Every way this can fail is a one-line
    UserError.
    """
    from spongebob.model import ModelConfig, SpongeBob
    from spongebob.runtime import check_kernels, resolve_device
    from spongebob.tokenizer import load as load_tokenizer

    p = Path(path)
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
        state = _read_weights(ckpt / "model.safetensors")
        meta.setdefault("format", "spongebob")
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
    dev = resolve_device(device) if isinstance(device, str) else device
    check_kernels(kernels, dev)
    model.to(dev).eval()

    tok_dir = Path(tokenizer) if tokenizer is not None else ckpt
    if tokenizer is None and not (tok_dir / "tokenizer.json").is_file():
        raise UserError(f"{ckpt}: no tokenizer.json; pass --tokenizer DIR")
    tok = load_tokenizer(tok_dir)
    if tok.vocab_size != cfg.vocab_size:
        raise UserError(
            f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model in {ckpt} "
            f"was trained with {cfg.vocab_size}: they do not belong together"
        )
    return Loaded(model, tok, meta)


def load_train_state(ckpt: Path) -> dict:
    """The optimizer/step/RNG/loader state of a checkpoint (no code runs: weights_only)."""
    f = Path(ckpt) / "train_state.pt"
    if not f.is_file():
        raise UserError(f"{ckpt}: no train_state.pt, so it cannot be resumed")
    return torch.load(f, map_location="cpu", weights_only=True)
