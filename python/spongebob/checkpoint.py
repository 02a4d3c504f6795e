"""Checkpoints: atomic save, keep-last-K, resume state, and `load_model` for every consumer.

Layout of a run folder `OUT/`:

    OUT/<stage>/checkpoints/step_00001000/   every --save-every steps, the last --keep kept
    OUT/<stage>/final/                       at the end of the stage
    OUT/<stage>/metrics.jsonl

A checkpoint directory holds

* `model.safetensors` — the model's state_dict (the tied embedding stored once; LLaMA names,
  see `spongebob.model.HF_NAME_TABLE`),
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
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from spongebob.config import STAGE_ORDER
from spongebob.errors import UserError

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


def _test_hang(var: str, step: int) -> None:
    """Testing hook: block forever at a chosen point so a test can SIGKILL us there."""
    if os.environ.get(var) == str(step):
        while True:
            time.sleep(1)


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
        _test_hang("SPONGEBOB_TEST_HANG_IN_SAVE", int(meta.get("step", -1)))
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
    return json.loads((Path(ckpt) / "config.json").read_text())


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    state = load_file(str(Path(ckpt) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{ckpt}: weights do not fit the model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )


def load_model(path: Path | str, device: str | torch.device = "cpu", **config_overrides):
    """(model, meta) from a run folder, stage folder or checkpoint dir; model in eval mode.

    `meta` is the checkpoint's config.json plus "path" (the resolved checkpoint dir).
    `config_overrides` replace ModelConfig fields that do not change the weights' shapes,
    e.g. kernels="torch".
    """
    from spongebob.model import ModelConfig, SpongeBob

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    cfg = ModelConfig.from_dict({**meta["model"], **config_overrides})
    model = SpongeBob(cfg)
    load_weights(model, ckpt)
    model.to(device).eval()
    meta["path"] = str(ckpt)
    return model, meta


def load_train_state(ckpt: Path) -> dict:
    """The optimizer/step/RNG/loader state of a checkpoint (no code runs: weights_only)."""
    f = Path(ckpt) / "train_state.pt"
    if not f.is_file():
        raise UserError(f"{ckpt}: no train_state.pt, so it cannot be resumed")
    return torch.load(f, map_location="cpu", weights_only=True)
