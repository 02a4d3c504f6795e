"""GPU readiness check: is this machine's SpongeBob correct, and how fast is it?

    bash scripts/gpu_check.sh                   # on a CUDA machine: ≤ 10 min on one GPU
    bash scripts/gpu_check.sh --out DIR         # the JSON goes to DIR instead of benchmarks/results
    bash scripts/gpu_check.sh --dry-run         # every step on CPU at toy shapes (CI: ~2 min)
    bash scripts/gpu_check.sh --only decode     # some steps only (names below)

Steps, each in its own process so that one failing (or crashing the CUDA context) is recorded
with its error and the others still run:

* environment         GPU, driver, CUDA, torch, triton, Python, machine
* data                a generated Chinese-heavy chat corpus and a 6400-token tokenizer trained
                      on it (dry run: the demo corpus, 512 tokens)
* kernel_tests        (correctness) pytest on tests/test_kernels_*.py: on CUDA the Triton
                      kernels run on the GPU, at the small shapes and at the training shapes,
                      forward and backward against the PyTorch reference, plus the host-sync
                      tests; in a dry run on CPU under TRITON_INTERPRET=1, small shapes only
* flex_vs_sdpa        (correctness) FlexAttention (compiled) against SDPA with the boolean
                      block-diagonal mask, bf16, the model's shapes (8 heads of 64, seq 512 and
                      1024, packed documents, padded tails; GQA too), forward and backward,
                      both measured against an fp32 SDPA reference (tolerances: TOLERANCES)
* train_bf16_vs_fp32  (correctness) 20 optimizer steps of the `spongebob` preset at 84 × 512
                      with bf16 autocast and in fp32 through `spongebob.train.train`, same
                      seed and data: the bf16 losses must follow the fp32 ones
* bench_kernels       benchmarks/bench_kernels.py --quick: Triton kernels against eager,
                      torch.compile, F.rms_norm, F.linear_cross_entropy and Liger (installed
                      with `pip install --no-deps liger-kernel` when missing; the reason is
                      recorded when that fails)
* train_step          benchmarks/bench_train.py: the product's training step of the
                      `spongebob` preset at 84 × 512 and 28 × 1024 with (a) torch ops + SDPA,
                      (b) torch.compile, (c) Triton kernels + FlexAttention, and the
                      MiniMind-style padded loop: tokens/s, trained tokens/s, MFU, peak memory
* decode              benchmarks/bench_decode.py: KV-cache decoding against recomputation at
                      512 new tokens

Writes benchmarks/results/gpu-<gpu-name-slug>-<YYYY-MM-DD>.json (or into --out DIR) with every
step's status, wall time, results or error, and prints a table. Exit status: 0 all ran and
passed; 1 a correctness check failed or could not run; 2 only a benchmark step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import glob
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# name → kind. "correctness" steps decide the exit status.
STEPS: dict[str, str] = {
    "environment": "info",
    "data": "setup",
    "kernel_tests": "correctness",
    "flex_vs_sdpa": "correctness",
    "train_bf16_vs_fp32": "correctness",
    "bench_kernels": "benchmark",
    "train_step": "benchmark",
    "decode": "benchmark",
}
NEEDS_DATA = {"train_bf16_vs_fp32", "train_step"}

TOLERANCES = {
    # FlexAttention and SDPA, both in bf16, are each compared with SDPA in fp32 on the same
    # (bf16-valued) inputs. Both round q·k, softmax and the output to bf16 somewhere (8
    # significant bits: ~2⁻⁹ relative per rounding), in different places, so neither is
    # exactly the other; what must hold is that flex is as accurate as SDPA:
    #   flex error ≤ 2 × SDPA error + floor,
    # per tensor (output, dq, dk, dv), for the max |error| / max |reference| and for the mean
    # |error| / mean |reference|. The floors (1e-2 max, 2e-3 mean) cover the case where SDPA
    # happens to be exact (e.g. both fp32 paths); a document boundary crossed or missed gives
    # O(1) errors on whole rows (the causal-only result sits ~1.0 away, recorded as a control).
    "flex": {"factor": 2.0, "max_floor": 1e-2, "mean_floor": 2e-3, "max_abs": 5e-2},
    # bf16 autocast vs fp32 (TF32 matmuls on CUDA) over 20 steps, relative loss difference.
    # Step 1 is the forward before any update: only rounding differs, and a mean over 43,008
    # tokens averages it out (CPU, 8 layers: 3e-5): 2e-3. Later steps add the divergence of
    # two trajectories (CPU, spongebob preset, 10 steps: ≤ 2.2e-4; TF32, Triton and flex on
    # the GPU add a few times that): 1e-2 at every step, ~50× what was seen, while a precision
    # bug (a bf16 accumulator, a wrong cast under autocast) shows up as several percent. Both
    # runs must also learn: the mean of the last 5 losses below the mean of the first 5.
    "precision": {"first_step_rel": 2e-3, "any_step_rel": 1e-2},
}

GPU_PLAN = {
    "data": {"corpus_mb": 4.0, "vocab": 6400},
    "flex_cases": [
        # batch, seq, q heads, kv heads, head dim
        (16, 512, 8, 8, 64),
        (8, 1024, 8, 8, 64),
        (16, 512, 8, 2, 64),  # minimind2-small (GQA)
    ],
    "precision": {"preset": "spongebob", "batch": 84, "seq_len": 512, "steps": 20},
    # (its whole-model step is left to train_step, which times it through the real loop)
    "bench_kernels": ["--quick", "--no-model-step"],
    "train_step": [
        "--preset", "spongebob", "--shapes", "84x512", "28x1024",
        "--variants", "torch-sdpa", "torch-compile", "triton-flex", "padded",
        "--window", "5", "--windows", "2",
    ],
    "decode": ["--preset", "spongebob", "--new-tokens", "512", "--check-tokens", "64"],
    "timeouts": {
        "environment": 120, "data": 300, "kernel_tests": 480, "flex_vs_sdpa": 300,
        "train_bf16_vs_fp32": 420, "bench_kernels": 480, "train_step": 900, "decode": 300,
    },
}  # fmt: skip
DRY_PLAN = {
    "data": {"demo_scale": 0.05, "vocab": 512},
    "flex_cases": [(2, 128, 4, 4, 16), (2, 256, 4, 2, 16)],
    # (bf16 matmuls are slow on a CPU without bf16 instructions: 10 steps of 2 rows.)
    "precision": {"preset": "tiny", "batch": 2, "seq_len": 128, "steps": 10},
    "bench_kernels": ["--smoke", "--no-model-step"],
    # The Triton kernels run in the interpreter (slow: one tiny step each), and FlexAttention
    # has no backward on CPU (torch raises NotImplementedError), so (c) uses SDPA here.
    "train_step": [
        "--preset", "tiny", "--shapes", "1x128",
        "--variants", "torch-sdpa", "torch-compile", "triton-sdpa", "padded",
        "--window", "1", "--windows", "1", "--threads", "1",
    ],
    "decode": [
        "--preset", "tiny", "--prompt-len", "8", "--new-tokens", "16", "--check-tokens", "8",
        "--threads", "1",
    ],
    "timeouts": {
        "environment": 120, "data": 120, "kernel_tests": 300, "flex_vs_sdpa": 300,
        "train_bf16_vs_fp32": 300, "bench_kernels": 300, "train_step": 600, "decode": 120,
    },
}  # fmt: skip


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# --- running things ----------------------------------------------------------------------------


def run_cmd(cmd: list[str], timeout: float, env: dict) -> dict:
    """Run a command; its exit status, wall time and output (never raises). It runs in a
    session of its own, so a timeout kills it together with the processes it started (a
    benchmark's workers, pytest's), which would otherwise keep running and hold the pipes."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        rc, timed_out = proc.returncode, False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc, timed_out = None, True
    return {
        "cmd": " ".join(cmd),
        "returncode": rc,
        "timed_out": timed_out,
        "wall_s": time.perf_counter() - t0,
        "stdout": out or "",
        "stderr": err or "",
    }


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:] if text else ""


def _last_line_error(run: dict) -> str:
    if run["timed_out"]:
        return f"timed out after {run['wall_s']:.0f} s"
    lines = [ln for ln in (run["stderr"] or "").strip().splitlines() if ln.strip()]
    return f"exit status {run['returncode']}: " + (lines[-1][:300] if lines else "(no output)")


class Check:
    def __init__(self, args) -> None:
        self.args = args
        self.dry = args.dry_run
        self.plan = DRY_PLAN if self.dry else GPU_PLAN
        self.py = sys.executable
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.env = dict(os.environ)
        if self.dry:
            self.env["TRITON_INTERPRET"] = "1"
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # CPU even where a GPU is visible
        else:
            self.env.pop("TRITON_INTERPRET", None)
        self.results: dict[str, dict] = {}

    def ctx(self) -> dict:
        return {"dry_run": self.dry, "work": str(self.work), "plan": self.plan}

    def timeout(self, step: str) -> float:
        return self.plan["timeouts"][step] * self.args.timeout_scale

    def in_subprocess(self, step: str) -> dict:
        """A step implemented in this file, run as `gpu_check.py --_step NAME`."""
        ctx = {**self.ctx(), "data": self.results.get("data", {}).get("files")}
        cmd = [self.py, str(Path(__file__).resolve()), "--_step", step, "--_ctx", json.dumps(ctx)]
        run = run_cmd(cmd, self.timeout(step), self.env)
        if run["returncode"] != 0:
            return {"status": "error", "error": _last_line_error(run), "log": _tail(run["stderr"])}
        try:
            return json.loads(run["stdout"].strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError) as e:
            return {"status": "error", "error": f"no result: {e}", "log": _tail(run["stderr"])}

    # -- the steps run from here --

    def step_kernel_tests(self) -> dict:
        files = sorted(glob.glob(str(ROOT / "tests" / "test_kernels_*.py")))
        xml = self.work / "kernel_tests.xml"
        cmd = [self.py, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
        run = run_cmd(cmd, self.timeout("kernel_tests"), self.env)
        res: dict = {
            "device": "cpu (TRITON_INTERPRET=1, small shapes)"
            if self.dry
            else "cuda (small and training shapes)",
            "files": [Path(f).name for f in files],
            "cmd": run["cmd"],
            "returncode": run["returncode"],
        }
        if not xml.is_file():
            res.update(status="error", error=_last_line_error(run), log=_tail(run["stdout"]))
            return res
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed, skipped = [], []
        for case in suite.iter("testcase"):
            name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
            for tag in ("failure", "error"):
                el = case.find(tag)
                if el is not None:
                    failed.append({"test": name, "message": (el.get("message") or "")[:500]})
            el = case.find("skipped")
            if el is not None:
                skipped.append({"test": name, "reason": (el.get("message") or "")[:200]})
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        res.update(
            tests=counts["tests"],
            passed=passed,
            failed=counts["failures"] + counts["errors"],
            skipped=counts["skipped"],
            failures=failed,
            skips=skipped,
            pytest_wall_s=run["wall_s"],
        )
        ok = run["returncode"] == 0 and res["failed"] == 0 and passed > 0
        res["status"] = "ok" if ok else "failed"
        if not ok:
            res["error"] = (
                f"{res['failed']} kernel test(s) failed"
                if res["failed"]
                else (_last_line_error(run))
            )
            res["log"] = _tail(run["stdout"], 6000)
        return res

    def _liger(self) -> dict:
        """Make Liger importable for the benchmark if we can; say why not otherwise."""
        probe = [self.py, "-c", "import liger_kernel.transformers.functional"]
        if run_cmd(probe, 120, self.env)["returncode"] == 0:
            return {"installed_before": True}
        if self.dry:
            return {"installed_before": False, "install": "not attempted in a dry run"}
        if self.args.no_install:
            return {"installed_before": False, "install": "not attempted (--no-install)"}
        # --no-deps: liger-kernel only needs torch and triton, which are here; letting pip
        # resolve them could replace the torch build under test.
        cmd = [self.py, "-m", "pip", "install", "--no-deps", "liger-kernel"]
        run = run_cmd(cmd, 180, self.env)
        ok = run["returncode"] == 0 and run_cmd(probe, 120, self.env)["returncode"] == 0
        return {
            "installed_before": False,
            "install": "ok" if ok else "failed",
            "install_cmd": " ".join(cmd),
            "install_output": _tail(run["stdout"] + run["stderr"], 1500),
        }

    def step_bench_kernels(self) -> dict:
        liger = self._liger()
        out = self.work / "kernels.json"
        cmd = [self.py, str(HERE / "bench_kernels.py"), *self.plan["bench_kernels"]]
        run = run_cmd([*cmd, "--out", str(out)], self.timeout("bench_kernels"), self.env)
        res: dict = {"cmd": run["cmd"], "liger_install": liger}
        if run["returncode"] != 0 or not out.is_file():
            res.update(status="error", error=_last_line_error(run), log=_tail(run["stderr"]))
            return res
        data = json.loads(out.read_text())
        res.update(data)
        ours = [r for r in data["kernels"] if r["impl"] == "spongebob triton"]
        bad = [f"{r['op']} {r['shape']}: {r['note']}" for r in ours if not finite(r["full_ms"])]
        res["status"] = "ok" if ours and not bad else "failed"
        if bad or not ours:
            res["error"] = "Triton kernels not measured: " + ("; ".join(bad) or "no rows")
        return res

    def step_train_step(self) -> dict:
        out = self.work / "train.json"
        files = self.results["data"]["files"]
        cmd = [
            self.py,
            str(HERE / "bench_train.py"),
            *self.plan["train_step"],
            "--data",
            files["chat"],
            "--tokenizer",
            files["tokenizer"],
            "--work",
            str(self.work / "bench_train"),
            "--json",
            str(out),
        ]
        run = run_cmd(cmd, self.timeout("train_step"), self.env)
        res: dict = {"cmd": run["cmd"]}
        if not out.is_file():
            res.update(status="error", error=_last_line_error(run), log=_tail(run["stderr"]))
            return res
        res.update(json.loads(out.read_text()))
        errors = [
            f"{r['shape']} {r['variant']}: {r['error']}" for r in res["results"] if "error" in r
        ]
        res["table"] = run["stdout"]
        res["status"] = "ok" if run["returncode"] == 0 and not errors else "failed"
        if errors:
            res["error"] = "; ".join(errors)[:1000]
        return res

    def step_decode(self) -> dict:
        out = self.work / "decode.json"
        cmd = [self.py, str(HERE / "bench_decode.py"), *self.plan["decode"], "--json", str(out)]
        run = run_cmd(cmd, self.timeout("decode"), self.env)
        res: dict = {"cmd": run["cmd"]}
        if not out.is_file():
            res.update(status="error", error=_last_line_error(run), log=_tail(run["stderr"]))
            return res
        res.update(json.loads(out.read_text()))
        res["status"] = "ok" if run["returncode"] == 0 and res["sanity"]["match"] else "failed"
        if res["status"] != "ok":
            res["error"] = f"KV-cache and recompute tokens differ: {res['sanity']}"
        return res

    def run(self, step: str) -> dict:
        t0 = time.perf_counter()
        log(f"{step} ...")
        try:
            if step in NEEDS_DATA and self.results.get("data", {}).get("status") != "ok":
                res = {"status": "error", "error": "needs the data step, which did not succeed"}
            elif hasattr(self, f"step_{step}"):
                res = getattr(self, f"step_{step}")()
            else:
                res = self.in_subprocess(step)
        except Exception as e:  # a bug in this script must not stop the other steps
            res = {
                "status": "error",
                "error": f"{type(e).__name__}: {e}",
                "log": traceback.format_exc()[-3000:],
            }
        res = {"kind": STEPS[step], "wall_s": time.perf_counter() - t0, **res}
        self.results[step] = res
        log(f"{step}: {res['status']} ({res['wall_s']:.1f} s)" + _err_suffix(res))
        return res


def _err_suffix(res: dict) -> str:
    return f" — {res['error']}" if res.get("error") else ""


# --- steps that run in their own process (python gpu_check.py --_step NAME) -------------------


def _environment(ctx: dict) -> dict:
    import platform

    import torch

    from machine import machine_info

    res: dict = {
        "status": "ok",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "machine": machine_info(("torch", "triton", "tokenizers", "numpy", "spongebob")),
    }
    try:
        import triton

        res["triton"] = triton.__version__
    except Exception as e:
        res["triton"] = None
        res["triton_error"] = f"{type(e).__name__}: {e}"
    try:
        from importlib.metadata import version

        res["liger_kernel"] = version("liger-kernel")
    except Exception:
        res["liger_kernel"] = None
    if shutil.which("nvidia-smi"):
        q = "name,driver_version,memory.total,power.limit,clocks.max.sm"
        p = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        res["nvidia_smi"] = p.stdout.strip() or p.stderr.strip()
        first = p.stdout.strip().splitlines()[0].split(", ") if p.stdout.strip() else []
        if len(first) >= 2:
            res["driver"] = first[1]
    if torch.cuda.is_available() and not ctx["dry_run"]:
        props = torch.cuda.get_device_properties(0)
        res.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    else:
        res["gpu"] = None
        if not ctx["dry_run"]:
            res["status"] = "failed"
            res["error"] = "no CUDA GPU visible to torch (use --dry-run to check on CPU)"
    return res


def _data(ctx: dict) -> dict:
    plan = ctx["plan"]["data"]
    work = Path(ctx["work"]) / "data"
    if ctx["dry_run"]:
        from spongebob import demo_data
        from spongebob.tokenizer import train_tokenizer

        paths = demo_data.generate(work, seed=0, scale=plan["demo_scale"])
        tok = work / "tokenizer"
        sources = [paths["pretrain"], paths["sft_512"]]
        train_tokenizer(sources, tok, vocab_size=plan["vocab"], show_progress=False)
        files = {"chat": str(paths["sft_512"]), "tokenizer": str(tok), "source": "demo corpus"}
    else:
        from bench_train import prepare_data

        f = prepare_data(work, plan["corpus_mb"], plan["vocab"], None)
        files = {"chat": f["data"], "tokenizer": f["tokenizer"], "source": "benchmarks/corpus.py"}
    from spongebob.tokenizer import load

    files["vocab_size"] = load(files["tokenizer"]).vocab_size
    files["chat_bytes"] = Path(files["chat"]).stat().st_size
    return {"status": "ok", "files": files}


def packed_positions(batch: int, seq: int, seed: int):
    """Loader-like position_ids: documents of log-normal length (median seq/4) packed into
    each row, positions restarting at 0; odd rows end in padding (position 0 on every pad
    token, so each is a document of its own)."""
    import torch

    rng = random.Random(seed)
    rows = []
    for b in range(batch):
        row: list[int] = []
        while len(row) < seq:
            row.extend(range(max(1, int(rng.lognormvariate(math.log(seq / 4), 0.8)))))
        row = row[:seq]
        if b % 2:
            pad = seq // 8
            row[-pad:] = [0] * pad
        rows.append(row)
    return torch.tensor(rows)


def _errors(x, ref) -> dict:
    d = (x.float() - ref).abs()
    return {
        "max": (d.max() / ref.abs().max().clamp_min(1e-30)).item(),
        "mean": (d.mean() / ref.abs().mean().clamp_min(1e-30)).item(),
    }


def _flex_case(flex, device, shape: tuple, seed: int, tol: dict) -> dict:
    """One shape: bf16 FlexAttention and bf16 SDPA (boolean mask) against fp32 SDPA."""
    import torch
    import torch.nn.functional as F

    from spongebob.model import block_causal_mask, flex_block_mask

    B, T, H, Hk, D = shape
    g = torch.Generator().manual_seed(seed)
    pos = packed_positions(B, T, seed=seed).to(device)
    q = torch.randn(B, H, T, D, generator=g).to(device, torch.bfloat16)
    k = torch.randn(B, Hk, T, D, generator=g).to(device, torch.bfloat16)
    v = torch.randn(B, Hk, T, D, generator=g).to(device, torch.bfloat16)
    dy = torch.randn(B, H, T, D, generator=g).to(device, torch.bfloat16)
    gqa = H != Hk
    dense = block_causal_mask(pos)
    block = flex_block_mask(pos)
    case: dict = {
        "shape": f"B{B} T{T} Hq{H} Hk{Hk} D{D}",
        "documents_per_row": float((pos == 0).sum(1).float().mean()),
    }
    backward = True
    if device.type == "cpu":  # FlexAttention has no backward on CPU: record torch's reason
        try:
            flex(q.clone().requires_grad_(), k, v, block_mask=block, enable_gqa=gqa)
        except NotImplementedError as e:
            backward = False
            case["backward"] = f"not run: {e}"

    def run(attend, dtype, grad):
        qq, kk, vv = (t.to(dtype).detach().requires_grad_(grad) for t in (q, k, v))
        y = attend(qq, kk, vv)
        if not grad:
            return [y.detach()]
        return [y.detach(), *torch.autograd.grad(y, (qq, kk, vv), dy.to(dtype))]

    def sdpa(qq, kk, vv):
        return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=dense, enable_gqa=gqa)

    def flexed(qq, kk, vv):
        return flex(qq, kk, vv, block_mask=block, enable_gqa=gqa)

    def causal(qq, kk, vv):
        return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=gqa)

    ref = run(sdpa, torch.float32, backward)
    got = {"sdpa_bf16": run(sdpa, torch.bfloat16, backward)}
    got["flex_bf16"] = run(flexed, torch.bfloat16, backward)
    names = ["out", "dq", "dk", "dv"][: len(ref)]
    case["errors"] = {
        impl: {n: _errors(t, r) for n, t, r in zip(names, ts, ref, strict=True)}
        for impl, ts in got.items()
    }
    # Control: attention that ignores the documents must be far off, or this compares nothing.
    control = _errors(run(causal, torch.bfloat16, False)[0], ref[0])
    case["causal_only_control"] = control
    worst = 0.0
    for n in names:
        f, s = case["errors"]["flex_bf16"][n], case["errors"]["sdpa_bf16"][n]
        for m, floor in (("max", tol["max_floor"]), ("mean", tol["mean_floor"])):
            worst = max(worst, f[m] / (tol["factor"] * s[m] + floor))
        if f["max"] > tol["max_abs"] or not all(map(finite, (*f.values(), *s.values()))):
            worst = math.inf
    case["worst_error_over_bound"] = worst
    case["passed"] = worst <= 1.0 and control["max"] > 10 * tol["max_abs"]
    return case


def _flex_vs_sdpa(ctx: dict) -> dict:
    import warnings

    import torch
    from torch.nn.attention.flex_attention import flex_attention

    warnings.filterwarnings("ignore", category=UserWarning)
    device = torch.device("cpu" if ctx["dry_run"] else "cuda")
    tol = TOLERANCES["flex"]
    flex = torch.compile(flex_attention, dynamic=False)
    cases = [
        _flex_case(flex, device, tuple(shape), i, tol)
        for i, shape in enumerate(ctx["plan"]["flex_cases"])
    ]
    ok = all(c["passed"] for c in cases)
    res = {"status": "ok" if ok else "failed", "device": str(device), "cases": cases}
    res["tolerance"] = tol
    if not ok:
        res["error"] = "FlexAttention disagrees with SDPA beyond the tolerance: " + ", ".join(
            c["shape"] for c in cases if not c["passed"]
        )
    return res


def _train_bf16_vs_fp32(ctx: dict) -> dict:
    import torch

    from spongebob.config import stage_config
    from spongebob.train import train

    p = ctx["plan"]["precision"]
    files = ctx["data"]
    device = "cpu" if ctx["dry_run"] else "cuda"
    if device == "cpu":
        torch.set_num_threads(2)
    runs = {}
    for dtype in ("fp32", "bf16"):
        out = Path(ctx["work"]) / f"precision-{dtype}"
        cfg = stage_config(
            "sft",
            data=[files["chat"]],
            out=str(out),
            tokenizer=files["tokenizer"],
            preset=p["preset"],
            init="none",
            max_steps=p["steps"],
            batch_size=p["batch"],
            accum=1,
            seq_len=p["seq_len"],
            device=device,
            dtype=dtype,
            seed=0,
            save_every=10**9,
            log_every=1,
            progress=False,
            cache_dir=str(Path(ctx["work"]) / "cache"),
        )
        t0 = time.perf_counter()
        train(cfg)
        recs = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
        recs = [r for r in recs if "loss" in r and "event" not in r]
        runs[dtype] = {
            "losses": [r["loss"] for r in recs],
            "wall_s": time.perf_counter() - t0,
            "tokens_per_s_last": recs[-1].get("tokens_per_s") if recs else None,
        }
        shutil.rmtree(out, ignore_errors=True)
    a, b = runs["fp32"]["losses"], runs["bf16"]["losses"]
    tol = TOLERANCES["precision"]
    res: dict = {"runs": runs, "tolerance": tol, "device": device, **p}
    problems = []
    if len(a) != p["steps"] or len(b) != p["steps"] or None in a or None in b:
        problems.append(f"expected {p['steps']} logged losses, got {len(a)} fp32 / {len(b)} bf16")
    else:
        rel = [abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)]
        res["rel_diff"] = rel
        res["max_rel_diff"] = max(rel)
        res["first_step_rel_diff"] = rel[0]
        if not all(map(finite, a + b)):
            problems.append("non-finite loss")
        if rel[0] > tol["first_step_rel"]:
            problems.append(f"step 1 differs by {rel[0]:.2e} > {tol['first_step_rel']:g}")
        if max(rel) > tol["any_step_rel"]:
            i = rel.index(max(rel))
            problems.append(f"step {i + 1} differs by {rel[i]:.2e} > {tol['any_step_rel']:g}")
        for name, ls in (("fp32", a), ("bf16", b)):
            if not sum(ls[-5:]) < sum(ls[:5]):
                problems.append(f"the {name} loss did not fall over {p['steps']} steps")
    res["status"] = "failed" if problems else "ok"
    if problems:
        res["error"] = "; ".join(problems)
    return res


SUBPROCESS_STEPS = {
    "environment": _environment,
    "data": _data,
    "flex_vs_sdpa": _flex_vs_sdpa,
    "train_bf16_vs_fp32": _train_bf16_vs_fp32,
}


# --- report ------------------------------------------------------------------------------------


def _summary(step: str, r: dict) -> str:
    if r.get("status") == "skipped":
        return r.get("reason", "")
    try:
        if step == "environment":
            return (
                f"{r.get('gpu') or 'no GPU'} | driver {r.get('driver', '-')} | torch "
                f"{r['torch']} (CUDA {r['torch_cuda']}) | triton {r.get('triton')}"
            )
        if step == "data":
            f = r["files"]
            return f"{f['source']}, {f['chat_bytes'] / 1e6:.1f} MB chat, vocab {f['vocab_size']}"
        if step == "kernel_tests":
            return (
                f"{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped "
                f"on {r['device']}"
            )
        if step == "flex_vs_sdpa":
            parts = []
            for c in r["cases"]:
                e = c["errors"]
                parts.append(
                    f"{c['shape']}: out max err flex {e['flex_bf16']['out']['max']:.1e} / sdpa "
                    f"{e['sdpa_bf16']['out']['max']:.1e}"
                    + ("" if "backward" not in c else " (fwd only)")
                )
            return "; ".join(parts)
        if step == "train_bf16_vs_fp32":
            return (
                f"{r['preset']} {r['batch']}×{r['seq_len']}, {r['steps']} steps: loss "
                f"{r['runs']['fp32']['losses'][0]:.3f}→{r['runs']['fp32']['losses'][-1]:.3f} "
                f"(fp32), max rel diff {r['max_rel_diff']:.1e} "
                f"(tol {r['tolerance']['any_step_rel']:g})"
            )
        if step == "bench_kernels":
            liger = r["meta"].get("liger", {})
            return f"{len(r['kernels'])} rows; liger: " + (
                "used" if liger.get("used") else liger.get("reason", "?")
            )
        if step == "train_step":
            parts = []
            for shape, e in r["ratios"].items():
                vs_sdpa = [
                    f"{k.split(' /')[0]} {v:.2f}×"
                    for k, v in e.items()
                    if k.endswith("/ torch-sdpa tokens/s") and not k.startswith("padded")
                ]
                # The product's default: Triton + flex on CUDA, torch + SDPA on CPU.
                product = next(
                    (v for v in ("triton-flex", "torch-sdpa") if f"{v} / padded tokens/s" in e),
                    None,
                )
                vs_pad = e.get(f"{product} / padded trained tokens/s")
                parts.append(
                    f"{shape}: tokens/s vs torch-sdpa: {', '.join(vs_sdpa) or '-'}; trained "
                    f"tokens/s {product} vs padded {vs_pad:.2f}×"
                    if vs_pad
                    else f"{shape}: {', '.join(vs_sdpa) or '-'}"
                )
            return "; ".join(parts)
        if step == "decode":
            res = r["results"]
            return (
                f"KV cache {res['kv_cache']['tokens_per_s']:.0f} tok/s vs recompute "
                f"{res['recompute']['tokens_per_s']:.0f} tok/s: "
                f"{r['kv_cache_over_recompute']:.2f}× at {r['args']['new_tokens']} new tokens"
            )
    except Exception as e:  # a summary must never hide the result
        return "" if r.get("status") != "ok" else f"(no summary: {type(e).__name__}: {e})"
    return ""


def print_report(report: dict) -> None:
    steps = report["steps"]
    print(f"\nGPU check ({'DRY RUN on CPU' if report['meta']['dry_run'] else 'CUDA'}), "
          f"{report['meta']['date']}, {report['meta']['wall_s']:.0f} s in all\n")  # fmt: skip
    head = f"{'step':<20}{'kind':<13}{'status':<9}{'wall s':>7}  summary"
    print(head)
    print("-" * 110)
    for name, r in steps.items():
        line = f"{name:<20}{r['kind']:<13}{r['status']:<9}{r['wall_s']:>7.1f}  {_summary(name, r)}"
        print(line)
        if r.get("error"):
            print(f"{'':<49}error: {r['error'][:300]}")
    ts = steps.get("train_step", {})
    if ts.get("table"):
        print("\ntraining step (benchmarks/bench_train.py):")
        lines = ts["table"].strip().splitlines()
        print("\n".join("  " + ln for ln in lines if ln.strip() and not ln.startswith("wrote ")))
    bk = steps.get("bench_kernels", {})
    if bk.get("kernels"):
        print("\nkernels (benchmarks/bench_kernels.py; full = fwd + bwd):")
        print(f"  {'op':<10}{'shape':<26}{'dtype':<10}{'impl':<24}{'full ms':>9}{'×eager':>8}"
              f"{'×compile':>9}{'peak MB':>9}  note")  # fmt: skip
        for k in bk["kernels"]:
            print(
                f"  {k['op']:<10}{k['shape']:<26}{k['dtype']:<10}{k['impl']:<24}"
                f"{_num(k['full_ms'], '9.3f')}{_num(k['full_vs_eager'], '8.2f')}"
                f"{_num(k['full_vs_compile'], '9.2f')}{_num(k['peak_mb'], '9.1f')}  {k['note']}"
            )
    if not report["meta"]["dry_run"] and report["meta"]["wall_s"] > 600:
        print("\nnote: over the 10-minute budget; --skip or --only can split the run")
    print(f"\nexit status {report['exit_status']}: {report['verdict']}")


def _num(v, spec: str) -> str:
    width = int(spec.split(".")[0])
    return format(v, spec) if finite(v) else "-".rjust(width)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every step on CPU at toy shapes")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON")
    ap.add_argument("--only", nargs="+", choices=list(STEPS), help="run these steps only")
    ap.add_argument("--skip", nargs="+", choices=list(STEPS), default=[], help="skip these")
    ap.add_argument("--no-install", action="store_true", help="never pip install liger-kernel")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply step timeouts")
    ap.add_argument("--_step", help=argparse.SUPPRESS)
    ap.add_argument("--_ctx", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._step:
        res = SUBPROCESS_STEPS[args._step](json.loads(args._ctx))
        print(json.dumps(res))
        return 0

    t0 = time.perf_counter()
    check = Check(args)
    wanted = [s for s in STEPS if (not args.only or s in args.only) and s not in args.skip]
    if any(s in NEEDS_DATA for s in wanted) and "data" not in wanted:
        wanted.insert(1 if "environment" in wanted else 0, "data")
    if "environment" not in wanted:
        wanted.insert(0, "environment")  # the file name needs the GPU's name
    try:
        for step in STEPS:
            no_gpu = step != "environment" and (
                not args.dry_run and check.results["environment"].get("gpu") is None
            )
            if step in wanted and no_gpu:
                check.results[step] = {
                    "kind": STEPS[step],
                    "status": "error",
                    "wall_s": 0.0,
                    "error": "not run: no CUDA GPU (bash scripts/gpu_check.sh --dry-run checks "
                    "the script on CPU)",
                }
            elif step in wanted:
                check.run(step)
            else:
                check.results[step] = {
                    "kind": STEPS[step],
                    "status": "skipped",
                    "wall_s": 0.0,
                    "reason": "not selected (--only/--skip)",
                }
    finally:
        if not args.keep_work:
            shutil.rmtree(check.work, ignore_errors=True)

    env = check.results["environment"]
    gpu = env.get("gpu")
    name = "dry-run-cpu" if args.dry_run else slug(gpu or "no-gpu")
    date = dt.date.today().isoformat()
    correctness_bad = [
        s for s, r in check.results.items()
        if STEPS[s] in ("correctness", "setup") and r["status"] not in ("ok", "skipped")
    ]  # fmt: skip
    bench_bad = [
        s for s, r in check.results.items()
        if STEPS[s] in ("benchmark", "info") and r["status"] not in ("ok", "skipped")
    ]  # fmt: skip
    if correctness_bad:
        code, verdict = (
            1,
            "correctness check(s) failed or did not run: " + ", ".join(correctness_bad),
        )
    elif bench_bad:
        code, verdict = 2, "correctness passed; step(s) failed: " + ", ".join(bench_bad)
    else:
        code, verdict = 0, "all selected steps ran and passed"
    report = {
        "meta": {
            "check": "gpu_check",
            "dry_run": args.dry_run,
            "gpu": gpu,
            "date": date,
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": time.perf_counter() - t0,
            "argv": sys.argv[1:] if argv is None else argv,
            "steps_run": wanted,
        },
        "tolerances": TOLERANCES,
        "plan": check.plan,
        "exit_status": code,
        "verdict": verdict,
        "steps": check.results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-{name}-{date}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_report(report)
    print(f"wrote {path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
