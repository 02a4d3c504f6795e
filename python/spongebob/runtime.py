"""Where and how the model runs: device, dtype and autocast, distributed set-up, RNG, peak FLOPs.

One owner for these so that training, generation, evaluation and the server agree: `auto`
means CUDA when a GPU is visible (bf16 autocast there, never fp16, which would need a loss
scaler) and the CPU in fp32 otherwise. Under `torchrun` the process group is NCCL on CUDA and
gloo on CPU; without it every collective here is a no-op, so callers never branch on it.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spongebob.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICES = "auto, cpu, cuda, cuda:N"
DTYPES = ("auto", "bf16", "fp32")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` → this rank's GPU when CUDA is available, else the CPU; `cuda` → this rank's GPU."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}, but CUDA is not available here")
        if name == "cuda":
            name = f"cuda:{local_rank}"
        try:
            return torch.device(name)
        except RuntimeError:
            raise UserError(f"unknown --device {name!r} ({DEVICES})") from None
    if name not in ("cpu", "mps"):
        raise UserError(f"unknown --device {name!r} ({DEVICES})")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` → bf16 on a CUDA device that supports it, fp32 elsewhere."""
    import torch

    if name not in DTYPES:
        hint = " (fp16 would need a loss scaler; use bf16)" if name == "fp16" else ""
        raise UserError(f"--dtype must be auto, bf16 or fp32, not {name!r}{hint}")
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32


def check_kernels(kernels: str, device: torch.device) -> None:
    """Triton kernels run on CUDA, or on a CPU under Triton's interpreter (TRITON_INTERPRET=1)."""
    if kernels == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(
            f"--kernels triton needs a CUDA device (this model is on {device}); use --kernels "
            "auto or torch, or set TRITON_INTERPRET=1 to run Triton's interpreter on the CPU"
        )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX, via oneDNN). Where it
    does, bf16 autocast trains faster than fp32; where it does not, bf16 is emulated and slower."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_training_attention(attention: str, device: torch.device) -> None:
    """FlexAttention has no backward pass on a CPU (torch raises NotImplementedError at the
    first backward), so training there refuses it before any work is done."""
    if attention == "flex" and device.type == "cpu":
        raise UserError(
            "--attention flex cannot train on a CPU (FlexAttention has no CPU backward in "
            "torch); use --attention auto or sdpa"
        )


@dataclass
class Runtime:
    """The device, compute dtype and process group of this process."""

    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False
    _owns_group: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when the dtype is bf16; a no-op in fp32."""
        import torch

        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    # -- collectives (no-ops in a single process) --

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj: Any) -> list:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def log(self, msg: str) -> None:
        """A line on stderr, from rank 0 only."""
        if self.is_main:
            print(f"[spongebob] {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Tear down the process group this Runtime created (safe to call twice)."""
        if self._owns_group:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self._owns_group = False


def start(device: str = "auto", dtype: str = "auto", distributed: bool = True) -> Runtime:
    """The Runtime of this process. With `distributed` and torchrun's WORLD_SIZE > 1, joins
    the process group (NCCL on CUDA, gloo on CPU) and takes the GPU of LOCAL_RANK."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    dev = resolve_device(device, local_rank)
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world <= 1:
        return Runtime(dev, dt)
    import torch.distributed as dist

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Runtime(
        dev,
        dt,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        distributed=True,
        _owns_group=owns,
    )


# --- RNG -------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states as plain data (weights_only-loadable)."""
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- peak FLOPs (for MFU) ----------------------------------------------------------------------

# Dense bf16 tensor-core peaks in TFLOP/s (no sparsity), from the vendors' data sheets.
_BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "V100": 125.0,
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense peak FLOP/s for `dtype` when we know it (CUDA bf16), else None.

    fp32 on CUDA uses TF32 tensor cores here (`allow_tf32`), roughly half the bf16 peak; a CPU's
    peak is not known to us, so MFU is reported as None there rather than guessed.
    """
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _BF16_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12 * (1.0 if dtype == torch.bfloat16 else 0.5)
    return None
