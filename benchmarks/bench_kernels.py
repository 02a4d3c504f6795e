"""Kernel benchmark: SpongeBob's Triton RMSNorm, RoPE and fused linear + cross-entropy against
PyTorch eager (the reference ops), `torch.compile` of the same reference, PyTorch's own fused
ops (`F.rms_norm`, chunked `F.linear_cross_entropy` where present) and Liger-Kernel when it is
installed (the JSON's meta.liger says whether it ran, or why not); plus a whole training step
of the model with `triton` vs `torch` kernels.

    python benchmarks/bench_kernels.py                    # full run (GPU), a few minutes
    python benchmarks/bench_kernels.py --quick            # training shapes only
    python benchmarks/bench_kernels.py --out results.json

Needs a CUDA GPU: on a machine without one it says so and exits 0 (`--smoke` runs the harness
at toy shapes on CPU through the Triton interpreter, to check the script itself).

What is measured, per op, shape, dtype and implementation:

* fwd, bwd and full (fwd + bwd) time: median of CUDA-event timings, the L2 cache flushed
  before every repetition by writing a buffer several times its size, so each kernel reads
  its inputs from HBM as it does inside a training step. For the fused CE, "fwd" includes
  the gradient computation (that is the design) and "bwd" only scales it.
* peak memory: `torch.cuda.max_memory_allocated` during one full pass, minus what was
  allocated before it (inputs, weights), i.e. what the op itself adds.
* achieved bandwidth for RMSNorm and RoPE (memory-bound): the minimal bytes the op must move
  (inputs read once, outputs written once) / time, and that as a fraction of the GPU's peak
  (from the memory clock and bus width the driver reports).
* ratios against eager and `torch.compile` measured in the same run (these machines are
  noisy: compare within a run, not across runs).

Results print as a table and are written as JSON with the GPU's name, the software versions
and the date (default benchmarks/results/kernels.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

# --smoke runs the Triton kernels on CPU: the interpreter must be on before Triton loads.
if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

DEFAULT_OUT = Path(__file__).parent / "results" / "kernels.json"

# Training shapes of the tutorial model (contracts.md §4–§5): batch 84 × seq 512, dim 512, 8 heads
# of 64, vocab 6400.
TRAIN_ROWS = 84 * 512

# Fallback peak HBM bandwidth (GB/s) by name fragment, when the driver reports no clock/bus.
PEAK_GBPS = {
    "H200": 4800.0,
    "H100 SXM": 3350.0,
    "H100": 2000.0,
    "A100-SXM4-80GB": 2039.0,
    "A100": 1555.0,
    "4090": 1008.0,
    "L40S": 864.0,
    "3090": 936.0,
    "A10": 600.0,
    "L4": 300.0,
}


# --- measuring -------------------------------------------------------------------------------


class Clock:
    """CUDA events + L2 flush on a GPU; perf_counter on CPU (--smoke only)."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.device = device
        self.reps = reps
        self.cuda = device.type == "cuda"
        self.flush_buf = None
        if self.cuda:
            props = torch.cuda.get_device_properties(device)
            l2 = getattr(props, "L2_cache_size", 0) or 64 << 20
            self.flush_buf = torch.empty(
                max(4 * l2, 256 << 20) // 4, dtype=torch.int32, device=device
            )

    def flush(self) -> None:
        if self.flush_buf is not None:
            self.flush_buf.zero_()

    def time_ms(self, fn: Callable[[object], object], setup: Callable[[], object] | None = None):
        """Median over `reps` of fn(setup()), setup untimed, L2 flushed just before fn."""
        times = []
        for _ in range(self.reps):
            state = setup() if setup is not None else None
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                self.flush()
                start.record()
                fn(state)
                end.record()
                torch.cuda.synchronize(self.device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn(state)
                times.append((time.perf_counter() - t0) * 1e3)
            del state
        return statistics.median(times)

    def peak_mb(self, fn: Callable[[], object]) -> float | None:
        """Extra memory (MB) at the peak of fn() over what was allocated before it."""
        if not self.cuda:
            return None
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        out = fn()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del out
        return (peak - base) / 2**20


def peak_bandwidth_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    for key, gbps in PEAK_GBPS.items():
        if key in props.name:
            return gbps
    return None


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    impl: str
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    full_ms: float | None = None
    peak_mb: float | None = None
    fwd_gbps: float | None = None
    bwd_gbps: float | None = None
    fwd_frac_peak: float | None = None
    bwd_frac_peak: float | None = None
    full_vs_eager: float | None = None  # eager time / this time (> 1 = faster)
    full_vs_compile: float | None = None
    mem_vs_eager: float | None = None  # this peak / eager peak (< 1 = less memory)
    max_rel_err: float | None = None  # vs the eager reference's outputs (sanity)
    note: str = ""


@dataclass
class Impl:
    """One implementation of an op: forward(inputs) → output tensor(s)."""

    name: str
    forward: Callable
    note: str = ""


@dataclass
class Problem:
    op: str
    shape: str
    dtype: torch.dtype
    make_inputs: Callable[[], tuple]  # fresh leaf tensors (those needing grad require it)
    impls: list[Impl]
    fwd_bytes: int | None = None
    bwd_bytes: int | None = None
    extra: dict = field(default_factory=dict)


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "loss"):  # Liger's CrossEntropyOutput in newer versions
        return [out.loss]
    return [o for o in out if isinstance(o, torch.Tensor)]


def _leaves(inputs) -> list[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def _backward(outs: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    torch.autograd.backward(
        outs, [g if o.dim() else None for o, g in zip(outs, grads, strict=True)]
    )


def _time_impl(forward: Callable, inputs: tuple, leaves: list[torch.Tensor], clock: Clock):
    """(fwd ms, bwd ms, full ms, peak MB) of one implementation."""

    def ones_like_outs(outs):
        return [torch.ones_like(o) if o.dim() else None for o in outs]

    def fwd(_state):
        return forward(*inputs)

    def fwd_for_bwd():
        outs = _outputs(forward(*inputs))
        return outs, ones_like_outs(outs)

    def bwd(state):
        for t in leaves:
            t.grad = None
        _backward(*state)

    def full(_state):
        for t in leaves:
            t.grad = None
        outs = _outputs(forward(*inputs))
        _backward(outs, ones_like_outs(outs))

    fwd_ms = clock.time_ms(fwd)
    bwd_ms = clock.time_ms(bwd, setup=fwd_for_bwd)
    full_ms = clock.time_ms(full)
    for t in leaves:
        t.grad = None
    peak = clock.peak_mb(lambda: full(None))
    return fwd_ms, bwd_ms, full_ms, peak


def measure(problem: Problem, clock: Clock, peak_gbps: float | None) -> list[Row]:
    rows: list[Row] = []
    inputs = problem.make_inputs()
    leaves = _leaves(inputs)
    ref_out = None
    for impl in problem.impls:
        row = Row(
            problem.op,
            problem.shape,
            str(problem.dtype).removeprefix("torch."),
            impl.name,
            note=impl.note,
        )
        try:
            # Warm up (compiles Triton kernels / torch.compile graphs, primes the allocator).
            for _ in range(2):
                outs = _outputs(impl.forward(*inputs))
                grads = [torch.randn_like(o) if o.dim() else None for o in outs]
                _backward(outs, grads)
            for t in leaves:
                t.grad = None
            outs = [o.detach().float() for o in _outputs(impl.forward(*inputs))]
            if ref_out is None:
                ref_out = outs
            else:
                row.max_rel_err = max(
                    ((o - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                    for o, r in zip(outs, ref_out, strict=True)
                )

            row.fwd_ms, row.bwd_ms, row.full_ms, row.peak_mb = _time_impl(
                impl.forward, inputs, leaves, clock
            )
            if problem.fwd_bytes:
                row.fwd_gbps = problem.fwd_bytes / (row.fwd_ms * 1e-3) / 1e9
                if peak_gbps:
                    row.fwd_frac_peak = row.fwd_gbps / peak_gbps
            if problem.bwd_bytes:
                row.bwd_gbps = problem.bwd_bytes / (row.bwd_ms * 1e-3) / 1e9
                if peak_gbps:
                    row.bwd_frac_peak = row.bwd_gbps / peak_gbps
        except torch.cuda.OutOfMemoryError:
            row.note = (row.note + " OOM").strip()
        except Exception as e:  # an optional baseline that does not work here
            row.note = (row.note + f" failed: {type(e).__name__}: {e}").strip()[:160]
            if os.environ.get("BENCH_DEBUG"):
                traceback.print_exc()
        finally:
            for t in leaves:
                t.grad = None
            if clock.cuda:
                torch.cuda.empty_cache()
        rows.append(row)
    eager = next((r for r in rows if r.impl == "torch eager" and r.full_ms), None)
    compiled = next((r for r in rows if r.impl == "torch.compile" and r.full_ms), None)
    for r in rows:
        if r.full_ms and eager:
            r.full_vs_eager = eager.full_ms / r.full_ms
            if r.peak_mb is not None and eager.peak_mb:
                r.mem_vs_eager = r.peak_mb / eager.peak_mb
        if r.full_ms and compiled:
            r.full_vs_compile = compiled.full_ms / r.full_ms
    return rows


# --- the problems ----------------------------------------------------------------------------


def _liger():
    try:
        from liger_kernel.transformers import functional as liger
    except ImportError:
        return None
    return liger


def liger_status(device: torch.device) -> dict:
    """Whether the Liger baselines ran, and if not, why (recorded in the JSON)."""
    try:
        import liger_kernel  # noqa: F401
        from liger_kernel.transformers import functional  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return {"used": False, "reason": f"liger-kernel not importable: {type(e).__name__}: {e}"}
    try:
        from importlib.metadata import version

        ver = version("liger-kernel")
    except Exception:
        ver = None
    if device.type != "cuda":
        return {"used": False, "version": ver, "reason": "Liger's kernels need CUDA"}
    return {"used": True, "version": ver}


def _compiled(fn: Callable, enabled: bool) -> list[Impl]:
    if not enabled:
        return []
    return [Impl("torch.compile", torch.compile(fn, dynamic=False), "of the reference")]


def rmsnorm_problem(rows: int, dim: int, dtype, device, ops, args) -> Problem:
    reference, ours = ops
    eps = 1e-5

    def make():
        x = torch.randn(rows, dim, device=device, dtype=dtype, requires_grad=True)
        w = (1 + 0.1 * torch.randn(dim, device=device)).to(dtype).requires_grad_()
        return x, w

    impls = [
        Impl("torch eager", lambda x, w: reference.rms_norm(x, w, eps), "reference.rms_norm"),
        Impl("spongebob triton", lambda x, w: ours.rms_norm(x, w, eps)),
        *_compiled(lambda x, w: reference.rms_norm(x, w, eps), args.compile),
    ]
    if hasattr(F, "rms_norm"):
        impls.append(Impl("F.rms_norm", lambda x, w: F.rms_norm(x, (dim,), w, eps), "aten"))
    liger = _liger()
    if liger is not None and device.type == "cuda":
        impls.append(Impl("liger", lambda x, w: liger.liger_rms_norm(x, w, eps)))
    b = torch.tensor([], dtype=dtype).element_size()
    # fwd: read x, write y, read w, write rstd; bwd: read dy, x, w, rstd, write dx (+ dW).
    fwd_bytes = 2 * rows * dim * b + dim * b + rows * 4
    bwd_bytes = 3 * rows * dim * b + rows * 4 + 2 * dim * b
    return Problem("rmsnorm", f"{rows}x{dim}", dtype, make, impls, fwd_bytes, bwd_bytes)


def rope_problem(batch, seq, n_q, n_k, head_dim, dtype, device, ops, args) -> Problem:
    reference, ours = ops
    cos, sin = reference.rope_cache(head_dim, 32768, device=device)
    # Packed rows: documents of 1..seq tokens, positions restarting at each.
    g = torch.Generator().manual_seed(0)
    pos = []
    for _ in range(batch):
        row = []
        while len(row) < seq:
            row.extend(range(int(torch.randint(1, seq + 1, (1,), generator=g))))
        pos.append(row[:seq])
    position_ids = torch.tensor(pos, device=device)

    def make():
        q = torch.randn(batch, seq, n_q, head_dim, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(batch, seq, n_k, head_dim, device=device, dtype=dtype, requires_grad=True)
        return q, k

    impls = [
        Impl(
            "torch eager",
            lambda q, k: reference.apply_rope(q, k, cos, sin, position_ids),
            "reference.apply_rope",
        ),
        Impl("spongebob triton", lambda q, k: ours.apply_rope(q, k, cos, sin, position_ids)),
        *_compiled(lambda q, k: reference.apply_rope(q, k, cos, sin, position_ids), args.compile),
    ]
    liger = _liger()
    if liger is not None and device.type == "cuda":
        # Liger takes [B, H, T, D] and per-token tables [B, T, D] (gathered once per forward
        # for all layers in HF models, so the gather is not timed).
        c_tok = cos[position_ids].to(dtype)
        s_tok = sin[position_ids].to(dtype)

        def liger_rope(q, k):
            qo, ko = liger.liger_rope(q.transpose(1, 2), k.transpose(1, 2), c_tok, s_tok)
            return qo, ko

        impls.append(Impl("liger", liger_rope, "[B,H,T,D] views, bf16 tables"))
    b = torch.tensor([], dtype=dtype).element_size()
    tokens = batch * seq
    qk = tokens * (n_q + n_k) * head_dim * b
    # read q, k and write them (fwd) / read dq, dk and write them (bwd); positions; the
    # distinct table rows (≤ seq, cached after the first touch).
    table = 2 * seq * head_dim * 4
    fwd_bytes = 2 * qk + tokens * 8 + table
    return Problem(
        "rope",
        f"B{batch} T{seq} Hq{n_q} Hk{n_k} D{head_dim}",
        dtype,
        make,
        impls,
        fwd_bytes,
        fwd_bytes,
    )


def linear_ce_problem(rows, dim, vocab, dtype, device, ops, args) -> Problem:
    reference, ours = ops
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.1] = -100  # prompts / padding
    labels = labels.to(device)
    # Uniform weights (1 trained, 0 ignored) so every baseline computes the same loss.
    weights = (labels != -100).float()
    normalizer = (labels != -100).sum().float()

    def make():
        h = torch.randn(rows, dim, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(vocab, dim, device=device) * dim**-0.5).to(dtype).requires_grad_()
        return h, w

    impls = [
        Impl(
            "torch eager",
            lambda h, w: reference.linear_cross_entropy(h, w, labels, weights, normalizer),
            "materialises logits",
        ),
        Impl(
            "spongebob triton",
            lambda h, w: ours.linear_cross_entropy(h, w, labels, weights, normalizer),
            "fwd computes the grads",
        ),
        *_compiled(
            lambda h, w: reference.linear_cross_entropy(h, w, labels, weights, normalizer),
            args.compile,
        ),
    ]
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if hasattr(F, "linear_cross_entropy") and options_cls is not None:
        opts = options_cls()

        def torch_chunked(h, w):
            return F.linear_cross_entropy(h, w, labels, reduction="sum", options=opts) / (
                normalizer
            )

        impls.append(Impl("F.linear_cross_entropy", torch_chunked, "chunked options"))
    liger = _liger()
    if liger is not None and device.type == "cuda":

        def liger_flce(h, w):
            out = liger.liger_fused_linear_cross_entropy(h, w, labels, reduction="sum")
            return _outputs(out)[0] / normalizer

        impls.append(Impl("liger", liger_flce))
    return Problem("linear_ce", f"N{rows} C{dim} V{vocab}", dtype, make, impls)


# --- whole training step ---------------------------------------------------------------------


def model_step(kernels: str, batch: int, seq: int, steps: int, device, smoke: bool) -> dict:
    """Median step time (fwd + bwd + AdamW) of the tutorial model under bf16 autocast."""
    from spongebob.model import ModelConfig, SpongeBob, preset

    if smoke:
        cfg = ModelConfig(
            vocab_size=300,
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            ffn_dim=128,
            max_seq_len=256,
        )
    else:
        cfg = preset("spongebob")
    torch.manual_seed(0)
    attention = "sdpa" if smoke else "auto"
    model = SpongeBob(cfg, kernels=kernels, attention=attention).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=g)
    labels = torch.randint(3, cfg.vocab_size, (batch, seq), generator=g)
    pos = torch.arange(seq).repeat(batch, 1)
    pos[:, seq // 3 :] -= seq // 3  # two documents per row
    pos[:, 2 * seq // 3 :] -= seq // 3  # three
    labels[:, :8] = -100
    b = {
        "input_ids": ids.to(device),
        "labels": labels.to(device),
        "loss_weights": (labels != -100).float().to(device),
        "position_ids": pos.to(device),
    }
    normalizer = (labels != -100).sum().float().to(device)
    amp = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model.loss(b, normalizer)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    ms = statistics.median(times)
    return {
        "kernels": kernels,
        "batch": batch,
        "seq_len": seq,
        "step_ms": ms,
        "tokens_per_s": batch * seq / (ms * 1e-3),
        "peak_mb": peak,
        "final_loss": float(loss.detach()),
    }


# --- report ----------------------------------------------------------------------------------


def _fmt(v, spec: str) -> str:
    """format(v, spec), or a dash right-aligned to the spec's width when v is missing."""
    if v is not None:
        return format(v, spec)
    width = spec.split(".")[0]
    return "-".rjust(int(width)) if width.isdigit() else "-"


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'op':<10}{'shape':<26}{'dtype':<9}{'impl':<24}{'fwd ms':>8}{'bwd ms':>8}"
        f"{'full ms':>9}{'peak MB':>9}{'fwd GB/s':>9}{'%peak':>6}{'bwd GB/s':>9}{'%peak':>6}"
        f"{'×eager':>7}{'×compile':>9}{'mem/eager':>10}{'rel err':>9}  note"
    )
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        key = (r.op, r.shape, r.dtype)
        if last is not None and key != last:
            print()
        last = key
        pct_f = None if r.fwd_frac_peak is None else 100 * r.fwd_frac_peak
        pct_b = None if r.bwd_frac_peak is None else 100 * r.bwd_frac_peak
        print(
            f"{r.op:<10}{r.shape:<26}{r.dtype:<9}{r.impl:<24}{_fmt(r.fwd_ms, '8.3f')}"
            f"{_fmt(r.bwd_ms, '8.3f')}{_fmt(r.full_ms, '9.3f')}{_fmt(r.peak_mb, '9.1f')}"
            f"{_fmt(r.fwd_gbps, '9.0f')}{_fmt(pct_f, '6.0f')}{_fmt(r.bwd_gbps, '9.0f')}"
            f"{_fmt(pct_b, '6.0f')}{_fmt(r.full_vs_eager, '7.2f')}"
            f"{_fmt(r.full_vs_compile, '9.2f')}{_fmt(r.mem_vs_eager, '10.3f')}"
            f"{_fmt(r.max_rel_err, '9.1e')}  {r.note}"
        )


def check_targets(rows: list[Row], step: list[dict]) -> list[str]:
    """The issue's targets, checked against this run's numbers."""
    lines = []
    for r in rows:
        if r.impl != "spongebob triton" or r.full_ms is None:
            continue
        tag = f"{r.op} {r.shape} {r.dtype}"
        if r.full_vs_compile is not None:
            ok = r.full_vs_compile >= 1.0
            lines.append(
                f"[{'ok' if ok else 'MISS'}] {tag}: full pass ×{r.full_vs_compile:.2f} "
                "vs torch.compile (target ≥ 1)"
            )
        if r.op == "linear_ce" and r.mem_vs_eager is not None:
            ok = r.mem_vs_eager <= 0.25
            lines.append(
                f"[{'ok' if ok else 'MISS'}] {tag}: peak memory {100 * r.mem_vs_eager:.1f}"
                " % of eager (target ≤ 25 %)"
            )
    by_kind = {s["kernels"]: s for s in step}
    if "torch" in by_kind and "triton" in by_kind:
        ratio = by_kind["torch"]["step_ms"] / by_kind["triton"]["step_ms"]
        lines.append(
            f"[{'ok' if ratio >= 1.3 else 'MISS'}] training step: triton ×{ratio:.2f} "
            "vs torch kernels (target ≥ 1.3)"
        )
    return lines


# --- main ------------------------------------------------------------------------------------


def problems(args, device, ops) -> list[Problem]:
    bf16, fp32 = torch.bfloat16, torch.float32
    if args.smoke:
        return [
            rmsnorm_problem(37, 96, bf16, device, ops, args),
            rope_problem(2, 8, 4, 2, 64, bf16, device, ops, args),
            linear_ce_problem(41, 96, 500, bf16, device, ops, args),
        ]
    out = [
        # Training shapes first: what the targets are about.
        rmsnorm_problem(TRAIN_ROWS, 512, bf16, device, ops, args),
        rmsnorm_problem(TRAIN_ROWS, 512, fp32, device, ops, args),  # autocast: fp32 residual
        rope_problem(84, 512, 8, 8, 64, bf16, device, ops, args),
        rope_problem(84, 512, 8, 2, 64, bf16, device, ops, args),  # MiniMind2-Small (GQA)
        linear_ce_problem(TRAIN_ROWS, 512, 6400, bf16, device, ops, args),
    ]
    if not args.quick:
        out += [
            *(rmsnorm_problem(n, 512, bf16, device, ops, args) for n in (4096, 16384, 131072)),
            *(rmsnorm_problem(TRAIN_ROWS, c, bf16, device, ops, args) for c in (1024, 2048)),
            *(rope_problem(b, 512, 8, 8, 64, bf16, device, ops, args) for b in (8, 32)),
            rope_problem(28, 1024, 8, 8, 64, bf16, device, ops, args),  # long SFT
            *(linear_ce_problem(n, 512, 6400, bf16, device, ops, args) for n in (8192, 16384)),
            linear_ce_problem(28 * 1024, 512, 6400, bf16, device, ops, args),
            linear_ce_problem(16384, 512, 32000, bf16, device, ops, args),
            linear_ce_problem(16384, 1024, 32000, bf16, device, ops, args),
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    ap.add_argument("--quick", action="store_true", help="training shapes only")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement")
    ap.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the torch.compile baseline"
    )
    ap.add_argument("--no-model-step", dest="model_step", action="store_false")
    ap.add_argument("--step-batch", type=int, default=84)
    ap.add_argument("--step-seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="toy shapes on CPU through the Triton interpreter (checks the script)",
    )
    args = ap.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        args.reps, args.steps, args.compile = 1, 1, False
        args.step_batch, args.step_seq = 2, 16
    elif not torch.cuda.is_available():
        print(
            "bench_kernels: a CUDA GPU is required for the kernel benchmark; none found, "
            "nothing measured (use --smoke to check the script on CPU)."
        )
        return 0
    else:
        device = torch.device("cuda")

    import triton

    from spongebob.kernels import get_ops, reference

    ours = get_ops("triton", str(device))
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    clock = Clock(device, args.reps)
    peak = peak_bandwidth_gbps(device)

    rows: list[Row] = []
    for problem in problems(args, device, (reference, ours)):
        print(f"... {problem.op} {problem.shape} {problem.dtype}", file=sys.stderr, flush=True)
        rows.extend(measure(problem, clock, peak))

    step_results = []
    if args.model_step:
        for kernels in ("torch", "triton"):
            print(f"... training step, kernels={kernels}", file=sys.stderr, flush=True)
            try:
                step_results.append(
                    model_step(
                        kernels, args.step_batch, args.step_seq, args.steps, device, args.smoke
                    )
                )
            except Exception as e:
                step_results.append({"kernels": kernels, "error": f"{type(e).__name__}: {e}"})

    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = f"CPU {platform.machine()} (Triton interpreter: timings mean nothing)"
    print(
        f"\n{gpu} | torch {torch.__version__} | triton {triton.__version__} | "
        f"peak bandwidth {_fmt(peak, '.0f')} GB/s\n"
    )
    print_table(rows)
    if step_results:
        what = "toy model, fp32" if args.smoke else "spongebob preset, bf16 autocast"
        print(f"\ntraining step ({what}, AdamW, batch {args.step_batch} × {args.step_seq}):")
        for s in step_results:
            if "error" in s:
                print(f"  kernels={s['kernels']:<7} failed: {s['error']}")
            else:
                print(
                    f"  kernels={s['kernels']:<7} {s['step_ms']:8.1f} ms/step "
                    f"{s['tokens_per_s']:>10.0f} tok/s  peak {_fmt(s['peak_mb'], '.0f')} MB"
                )
    targets = [] if args.smoke else check_targets(rows, step_results)
    if targets:
        print("\ntargets:")
        for line in targets:
            print("  " + line)

    result = {
        "meta": {
            "gpu": gpu,
            "device": str(device),
            "smoke": args.smoke,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "peak_bandwidth_gbps": peak,
            "liger": liger_status(device),
            "f_linear_cross_entropy": hasattr(F, "linear_cross_entropy"),
            "f_rms_norm": hasattr(F, "rms_norm"),
            "compile_baseline": args.compile,
            "reps": args.reps,
            "l2_flushed": device.type == "cuda",
        },
        "kernels": [asdict(r) for r in rows],
        "training_step": step_results,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
