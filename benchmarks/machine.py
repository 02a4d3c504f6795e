"""What machine a benchmark ran on, recorded next to every result since CPU numbers from
different (or differently loaded) machines are not comparable; and how much memory the
measuring process holds."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine_info(modules: tuple[str, ...] = ("torch", "tokenizers", "numpy", "spongebob")) -> dict:
    """Platform, CPU model and count, memory, load average, package versions, git commit and
    whether the tree had uncommitted changes."""
    info: dict = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gb"] = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    for mod in modules:
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    try:
        git = ("git", "-C", str(HERE.parent))
        info["git_commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        # Uncommitted changes to tracked files: the commit alone does not say what ran.
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout
        info["git_dirty"] = bool(status.strip())
    except OSError:
        pass
    return info


def rss_mb() -> dict:
    """This process's peak RSS (ru_maxrss, and /proc VmHWM where there is one) and current RSS
    (VmRSS), in MB. Benchmarks run each measurement in its own subprocess so the peak is its."""
    out = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                key = "vmhwm_mb" if line.startswith("VmHWM") else "vmrss_mb"
                out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def peak_mb(rss: dict) -> float:
    """The peak of an `rss_mb()` reading: VmHWM where /proc had it, else ru_maxrss."""
    return rss.get("vmhwm_mb", rss["ru_maxrss_mb"])
