"""What a run reports: `metrics.jsonl` (always), wandb (when asked), and the throughput window
behind the progress bar (loss, tokens/s, MFU). Rank 0 only writes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from spongebob.errors import UserError


class MetricsLog:
    """Appends one JSON record a line; on resume, drops the records of steps about to be redone."""

    def __init__(
        self, path: Path, enabled: bool, start_step: int, wandb_args: dict | None = None
    ) -> None:
        self.enabled = enabled
        self.path = path
        self.wandb = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if start_step > 0 and path.is_file():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    pass
            path.write_text("".join(k + "\n" for k in kept))
        elif start_step == 0 and path.exists():
            path.unlink()
        if wandb_args is not None:
            self.wandb = _wandb_run(path.parent, wandb_args)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            step = record.get("step")
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_run(folder: Path, args: dict):
    """A wandb run that a resumed stage continues (its id is kept in the stage folder)."""
    try:
        import wandb
    except ImportError as e:
        raise UserError("--wandb needs the wandb package (pip install wandb)") from e
    id_file = folder / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    run = wandb.init(dir=str(folder), id=run_id, resume="allow", **args)
    id_file.write_text(run.id)
    return run


@dataclass
class Window:
    """Loss and throughput since the last log line. MFU = achieved model FLOP/s over the
    device's peak (`runtime.peak_flops`); None where the peak is not known (a CPU)."""

    flops_per_token: float
    peak_flops: float | None
    loss_sum: float = 0.0
    steps: int = 0
    tokens: int = 0
    trained: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, tokens: int, trained: int, loss: float | None) -> None:
        self.tokens += tokens
        self.trained += trained
        if loss is not None:
            self.loss_sum += loss
            self.steps += 1

    def flush(self) -> dict:
        """The window's numbers, then start a new window."""
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        tok_s = self.tokens / dt
        out = {
            "loss": self.loss_sum / self.steps if self.steps else None,
            "tokens_per_s": tok_s,
            "trained_tokens_per_s": self.trained / dt,
            "mfu": tok_s * self.flops_per_token / self.peak_flops if self.peak_flops else None,
        }
        self.loss_sum, self.steps, self.tokens, self.trained, self.t0 = 0.0, 0, 0, 0, now
        return out
