"""The install: the package, its Rust extension and the kernels import; the CLI lists only
commands that exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import spongebob
import spongebob.data
import spongebob.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_extension_is_the_one_built_from_this_checkout():
    ext = Path(spongebob._rust.__file__).resolve()
    assert ext.parent == (ROOT / "python" / "spongebob").resolve()
    assert spongebob._rust.__version__ == spongebob.__version__


def test_kernels_are_real_files_inside_the_package_so_wheels_ship_them():
    pkg = Path(spongebob.kernels.__file__).parent
    assert not pkg.is_symlink()
    assert pkg.resolve() == (ROOT / "kernels").resolve()  # the top-level folder points here
    for name in ("rmsnorm", "rope", "fused_linear_ce", "reference"):
        assert (pkg / f"{name}.py").is_file()


def test_cli_version_and_help_list_every_registered_command():
    import argparse
    import re

    from spongebob.cli import build_parser

    run = [sys.executable, "-m", "spongebob"]
    out = subprocess.run([*run, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"spongebob {spongebob.__version__}"
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    expected = {"tokenizer", "data", "train", "chat", "serve", "eval", "export", "demo"}
    assert set(sub.choices) == expected
    helptext = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True).stdout
    # Each command on a line of its own in the command list, not just a word somewhere.
    listed = set(re.findall(r"^    ([a-z]+)(?: {2,}\S|$)", helptext, flags=re.M))
    assert listed == expected, helptext
    for cmd in sorted(expected):
        r = subprocess.run([*run, cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.startswith(f"usage: spongebob {cmd}"), r.stderr
