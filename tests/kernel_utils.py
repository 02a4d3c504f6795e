"""Shared set-up and tolerances for the Triton kernel tests.

Import this module before anything that imports Triton kernels: on a machine without an NVIDIA
driver it turns on the Triton interpreter (TRITON_INTERPRET=1), which Triton reads when a kernel
is decorated, so the same tests run on CPU in CI and unchanged on a GPU.

The tests run on one device, `DEVICE`: CUDA when there is a GPU, else the CPU through the
interpreter. On CPU they use small shapes (the interpreter runs one program at a time); on a
GPU `cases(small, training)` adds the training shapes (84 × 512 and 28 × 1024 tokens, dim 512,
8 heads of 64, vocab 6400), so `bash scripts/gpu_check.sh` checks the kernels where they run.
"""

from __future__ import annotations

import os
import shutil

import pytest

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ON_GPU = DEVICE.type == "cuda" and not INTERPRETED


def cases(small: list, training: list) -> list:
    """Parameters for a test: the small ones everywhere, plus the training shapes on a GPU
    (each shown as `train-...` in the test id)."""
    out = list(small)
    if ON_GPU:
        out += [pytest.param(c, id=f"train-{_id(c)}") for c in training]
    return out


def _id(c) -> str:
    if isinstance(c, tuple) and c and isinstance(c[0], str):
        return c[0]  # (name, ...) cases
    return "x".join(map(str, c)) if isinstance(c, tuple) else str(c)


def build_model(config, kernels: str, attention: str):
    """A SpongeBob with these runtime choices: constructor keywords since the model's runtime
    split (contracts.md §4: ModelConfig is architecture only), ModelConfig fields before."""
    import inspect
    from dataclasses import replace

    from spongebob.model import SpongeBob

    if "kernels" in inspect.signature(SpongeBob.__init__).parameters:
        return SpongeBob(config, kernels=kernels, attention=attention)
    return SpongeBob(replace(config, kernels=kernels, attention=attention))


# --- Tolerances -----------------------------------------------------------------------------
# fp32: kernel and reference do the same fp32 math in a different order (tree vs. pairwise
# sums, fused multiply-adds on GPU), so results agree to a few fp32 ulps (~1e-7 relative);
# 1e-5 leaves room for reductions over a few hundred terms without hiding real bugs, which
# show up as errors of 1e-2 or more.
FP32 = {"rtol": 1e-5, "atol": 1e-6}
# bf16 outputs: both sides compute in fp32 and round once to bf16 (8 significant bits, so one
# ulp is 2⁻⁸..2⁻⁷ ≈ 0.4–0.8 % of the value). The interpreter truncates fp32→bf16 stores instead
# of rounding, so results may sit one ulp apart, two at a rounding boundary:
# rtol = 2 ulps = 2⁻⁶. atol covers values near 0, where a relative bound means nothing.
BF16_ELEMENTWISE = {"rtol": 2**-6, "atol": 1e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **tol: float) -> None:
    """torch.testing.assert_close on fp32 copies (so bf16 results compare with fp32 slack)."""
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol_frac: float
) -> None:
    """Elementwise rtol plus an absolute slack of `atol_frac` × max|expected|.

    For sums of many bf16-rounded terms (matmul gradients) the error of an element is relative
    to the size of the terms, not of the (possibly cancelling) sum, so the absolute slack is
    tied to the tensor's scale.
    """
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=rtol, atol=max(atol_frac * scale, 1e-12)
    )
