"""`bash scripts/gpu_check.sh --dry-run` works: every step runs on CPU at toy shapes (Triton
kernels in the interpreter) and the JSON report has every section with plausible values, so
the GPU check is known to run before anyone has a GPU to run it on."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {
    "environment": "info",
    "data": "setup",
    "kernel_tests": "correctness",
    "flex_vs_sdpa": "correctness",
    "train_bf16_vs_fp32": "correctness",
    "bench_kernels": "benchmark",
    "train_step": "benchmark",
    "decode": "benchmark",
}

pytestmark = pytest.mark.slow


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable},
    )
    files = list(out.glob("gpu-dry-run-cpu-*.json"))
    assert len(files) == 1, f"no report written:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(files[0].read_text())
    data["_proc"] = {"returncode": proc.returncode, "stdout": proc.stdout}
    return data


def test_dry_run_passes_and_reports_every_section(report):
    steps = report["steps"]
    assert set(steps) == set(SECTIONS)
    failed = {k: v.get("error") for k, v in steps.items() if v["status"] != "ok"}
    assert not failed, failed
    assert report["exit_status"] == 0 and report["_proc"]["returncode"] == 0
    for name, kind in SECTIONS.items():
        assert steps[name]["kind"] == kind
        assert positive(steps[name]["wall_s"])
    assert report["meta"]["dry_run"] is True
    # The table is printed, one line per step.
    for name in SECTIONS:
        assert name in report["_proc"]["stdout"]


def test_environment_and_data(report):
    env = report["steps"]["environment"]
    assert env["torch"] and env["triton"] and env["python"]
    assert env["gpu"] is None  # a dry run never uses one
    data = report["steps"]["data"]["files"]
    assert data["vocab_size"] > 256 and data["chat_bytes"] > 0


def test_kernel_tests_ran_and_passed(report):
    kt = report["steps"]["kernel_tests"]
    assert kt["failed"] == 0 and kt["passed"] >= 40
    assert {"test_kernels_rmsnorm.py", "test_kernels_rope.py"} <= set(kt["files"])
    # The host-sync tests need CUDA: on CPU they are the ones skipped.
    assert all("host-sync" in s["reason"] for s in kt["skips"])


def test_flex_vs_sdpa_errors_are_finite_and_within_tolerance(report):
    fx = report["steps"]["flex_vs_sdpa"]
    assert len(fx["cases"]) >= 2
    for case in fx["cases"]:
        assert case["passed"]
        for impl in ("flex_bf16", "sdpa_bf16"):
            for err in case["errors"][impl].values():
                assert math.isfinite(err["max"]) and 0 <= err["max"] < 0.05
        assert case["causal_only_control"]["max"] > 0.5  # the documents matter
        assert "backward on CPU" in case["backward"]  # recorded, with torch's own reason


def test_bf16_follows_fp32_over_the_steps(report):
    pr = report["steps"]["train_bf16_vs_fp32"]
    n = pr["steps"]
    for run in ("fp32", "bf16"):
        losses = pr["runs"][run]["losses"]
        assert len(losses) == n and all(positive(x) for x in losses)
    assert 0 < pr["max_rel_diff"] <= pr["tolerance"]["any_step_rel"]


def test_bench_kernels_measured_every_op(report):
    bk = report["steps"]["bench_kernels"]
    ops = {r["op"] for r in bk["kernels"]}
    assert ops == {"rmsnorm", "rope", "linear_ce"}
    for r in bk["kernels"]:
        if r["impl"] in ("torch eager", "spongebob triton"):
            assert positive(r["full_ms"]) and positive(r["fwd_ms"]), r
    impls = {r["impl"] for r in bk["kernels"]}
    assert {"F.rms_norm", "F.linear_cross_entropy"} <= impls
    assert bk["meta"]["liger"]["used"] is False and bk["meta"]["liger"]["reason"]
    assert bk["liger_install"]["install"] == "not attempted in a dry run"


def test_train_step_has_every_variant_with_positive_throughput(report):
    ts = report["steps"]["train_step"]
    variants = {r["variant"]: r for r in ts["results"]}
    assert set(variants) == {"torch-sdpa", "torch-compile", "triton-sdpa", "padded"}
    for name, r in variants.items():
        assert "error" not in r, (name, r.get("error"))
        for key in ("tokens_per_s", "trained_tokens_per_s", "peak_rss_mb", "flops_per_token"):
            assert positive(r[key]), (name, key, r[key])
        assert 0 < r["fill"] <= 1
        assert r["mfu"] is None  # no known peak FLOP/s on a CPU
        assert math.isfinite(r["loss_last_window"])
    assert variants["triton-sdpa"]["kernels_used"] == "triton"
    assert variants["torch-sdpa"]["kernels_used"] == "torch"
    assert variants["torch-sdpa"]["attention_used"] == "sdpa"
    ratios = ts["ratios"]["1x128"]
    assert positive(ratios["torch-sdpa / padded trained tokens/s"])


def test_decode_compares_kv_cache_with_recompute(report):
    dc = report["steps"]["decode"]
    assert dc["sanity"]["match"]
    for k in ("kv_cache", "recompute"):
        assert positive(dc["results"][k]["tokens_per_s"])
        assert dc["results"][k]["new_tokens"] == dc["args"]["new_tokens"]
    assert positive(dc["kv_cache_over_recompute"])


# --- one failing step does not stop the others -------------------------------------------------


def _load_gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def _only_report(out: Path) -> dict:
    (path,) = out.glob("gpu-dry-run-cpu-*.json")
    return json.loads(path.read_text())


def test_a_failing_correctness_step_is_recorded_the_others_run_and_the_exit_status_is_1(
    tmp_path, monkeypatch
):
    gpu_check = _load_gpu_check()

    def broken(self):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(gpu_check.Check, "step_kernel_tests", broken)
    code = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--only", "kernel_tests", "decode"])
    report = _only_report(tmp_path)
    steps = report["steps"]
    assert code == 1 and report["exit_status"] == 1
    assert steps["kernel_tests"]["status"] == "error"
    assert "RuntimeError: injected failure" in steps["kernel_tests"]["error"]
    assert steps["decode"]["status"] == "ok" and steps["environment"]["status"] == "ok"
    assert steps["flex_vs_sdpa"]["status"] == "skipped"


def test_a_failing_benchmark_step_gives_exit_status_2(tmp_path, monkeypatch):
    gpu_check = _load_gpu_check()
    monkeypatch.setattr(
        gpu_check.Check, "step_decode", lambda self: {"status": "failed", "error": "slow"}
    )
    code = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--only", "decode"])
    report = _only_report(tmp_path)
    assert code == 2 and report["steps"]["decode"]["error"] == "slow"
    assert report["steps"]["environment"]["status"] == "ok"


def test_without_a_gpu_the_real_check_runs_nothing_and_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the real check would run")
    gpu_check = _load_gpu_check()
    code = gpu_check.main(["--out", str(tmp_path), "--only", "kernel_tests", "decode"])
    (path,) = tmp_path.glob("gpu-no-gpu-*.json")
    steps = json.loads(path.read_text())["steps"]
    assert code == 1
    assert "no CUDA GPU" in steps["environment"]["error"]
    for name in ("kernel_tests", "decode"):
        assert "--dry-run" in steps[name]["error"] and steps[name]["wall_s"] == 0.0
