"""Throughput and MFU (docs/architecture.md "MFU"), and the runtime's device rules."""

from __future__ import annotations

import pytest
import torch

from spongebob.errors import UserError
from spongebob.metrics import Window
from spongebob.model import PRESETS, SpongeBob
from spongebob.runtime import (
    check_kernels,
    check_training_attention,
    peak_flops,
    resolve_device,
    resolve_dtype,
)


def test_flops_per_token_is_six_n_plus_the_attention_term():
    model = SpongeBob(PRESETS["spongebob"])
    n = model.num_parameters()
    assert n == 28_975_616
    assert model.flops_per_token(512) == 6 * n + 12 * 8 * 512 * 512
    model.embed_tokens.weight.requires_grad_(False)  # frozen weights: forward + input grads
    frozen = model.embed_tokens.weight.numel()
    assert model.flops_per_token(512) == 6 * (n - frozen) + 4 * frozen + 12 * 8 * 512 * 512


def test_window_reports_tokens_per_second_and_mfu_against_the_peak():
    w = Window(flops_per_token=1e6, peak_flops=4e9)
    w.t0 -= 2.0  # the window opened two seconds ago
    w.add(tokens=4000, trained=1000, loss=2.0)
    w.add(tokens=4000, trained=1000, loss=None)  # a skipped step counts its tokens, not a loss
    out = w.flush()
    assert out["loss"] == 2.0
    assert 8000 / 2.5 < out["tokens_per_s"] <= 8000 / 2.0
    assert out["trained_tokens_per_s"] == pytest.approx(out["tokens_per_s"] / 4)
    assert out["mfu"] == pytest.approx(out["tokens_per_s"] * 1e6 / 4e9)
    assert w.tokens == 0 and w.steps == 0  # a new window


def test_mfu_is_none_where_the_peak_is_unknown():
    assert peak_flops(torch.device("cpu"), torch.float32) is None
    w = Window(flops_per_token=1e6, peak_flops=None)
    w.add(10, 5, 1.0)
    assert w.flush()["mfu"] is None


def test_device_and_dtype_rules():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(UserError, match="unknown --device"):
        resolve_device("tpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UserError, match="loss scaler"):
        resolve_dtype("fp16", torch.device("cpu"))


def test_triton_kernels_on_a_cpu_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="needs a CUDA device"):
        check_kernels("triton", torch.device("cpu"))
    check_kernels("torch", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_kernels("triton", torch.device("cpu"))


def test_flex_attention_is_refused_for_training_on_a_cpu_before_any_work():
    with pytest.raises(UserError, match="cannot train on a CPU"):
        check_training_attention("flex", torch.device("cpu"))
    check_training_attention("sdpa", torch.device("cpu"))
    check_training_attention("auto", torch.device("cpu"))
