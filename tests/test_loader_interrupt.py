"""Issue 3: Ctrl-C during a cold cache build stops the build and leaves no cache behind.

Tokenizing a big file takes minutes with the GIL released; a signal is only seen when Python
runs again, so the Rust side must hand control back while it works. A child process starts a
build on a file that takes seconds to tokenize, the test sends it SIGINT once the build has
begun, and checks that the child raised KeyboardInterrupt from the constructor (not after the
build finished: no cache was written) and left no temporary files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import signal, sys
# Python leaves SIGINT ignored when it starts with it ignored (a background job of a
# non-interactive shell, as under CI); a user at a terminal gets KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)
from spongebob.data import PackedDataset
path, tok, cache = sys.argv[1:4]
print("building", flush=True)
try:
    PackedDataset([path], tok, kind="chat", seq_len=256, batch_size=4, cache_dir=cache)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(3)
print("finished", flush=True)
"""


def _big_chat_file(path: Path, mb: float) -> Path:
    lines = []
    for i in range(500):
        conv = [
            {"role": "user", "content": f"第{i}个问题：请解释数据加载器为什么要打包。" * 3},
            {"role": "assistant", "content": f"回答{i}：打包把多条对话放进同一行，减少填充。" * 6},
        ]
        lines.append(json.dumps({"conversations": conv}, ensure_ascii=False))
    block = ("\n".join(lines) + "\n").encode()
    with path.open("wb") as f:
        for _ in range(int(mb * 1e6 / len(block)) + 1):
            f.write(block)
    return path


def test_sigint_during_cold_build_raises_keyboardinterrupt_and_leaves_no_cache(tok_dir, tmp_path):
    data = _big_chat_file(tmp_path / "big.jsonl", 40)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data), str(tok_dir), str(cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout.readline().strip() == "building"
        time.sleep(1.0)  # past imports and into the tokenizing loop
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 3, (out, err)
    assert out.strip() == "interrupted"
    left = sorted(p.name for p in cache.rglob("*")) if cache.exists() else []
    assert not any(n.endswith(".json") for n in left), f"the build finished anyway: {left}"
    assert not any(".tmp" in n for n in left), f"temporary files left behind: {left}"
