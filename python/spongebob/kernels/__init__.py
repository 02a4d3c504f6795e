"""SpongeBob's Triton kernels, importable as `spongebob.kernels`.

The files live in `python/spongebob/kernels/` and the repository's top-level `kernels/` is a
symlink to that folder. This way round, maturin packs them into the wheel (it does not follow a
symlinked folder inside the package), editable installs see them too, and there is no
top-level `kernels` module (a name another PyPI distribution owns).

Each op has a PyTorch reference in `reference.py` (the CPU path and the ground truth of the
tests) and a Triton implementation in its own file with the same signature:
`rmsnorm.rms_norm`, `rope.apply_rope`, `fused_linear_ce.linear_cross_entropy`.
"""

from __future__ import annotations

from types import SimpleNamespace

from . import reference

__all__ = ["get_ops", "reference"]


def get_ops(kind: str = "auto", device: str | None = None) -> SimpleNamespace:
    """The op set the model calls: `rms_norm`, `apply_rope`, `linear_cross_entropy`.

    kind: "torch" (reference), "triton", or "auto" (Triton on CUDA, PyTorch elsewhere).
    """
    if kind == "auto":
        kind = "triton" if device is not None and str(device).startswith("cuda") else "torch"
    if kind == "torch":
        return SimpleNamespace(
            name="torch",
            rms_norm=reference.rms_norm,
            apply_rope=reference.apply_rope,
            linear_cross_entropy=reference.linear_cross_entropy,
        )
    if kind == "triton":
        from .fused_linear_ce import linear_cross_entropy
        from .rmsnorm import rms_norm
        from .rope import apply_rope

        return SimpleNamespace(
            name="triton",
            rms_norm=rms_norm,
            apply_rope=apply_rope,
            linear_cross_entropy=linear_cross_entropy,
        )
    raise ValueError(f"unknown kernels {kind!r} (expected torch, triton or auto)")
