"""Serving throughput and latency: `spongebob serve` against llama.cpp's own server
(`python -m llama_cpp.server`, from llama-cpp-python, with `--interrupt_requests False` so that
concurrent requests queue instead of cutting each other off) on the same model, exported with
`spongebob export gguf --dtype f32`.

    python benchmarks/bench_serve.py                 # demo preset, 1 and 16 streams, 64 tokens

Both servers run as subprocesses with the same thread count (`--threads`, default 2) and get the
same requests from the official `openai` client: streaming chat completions of `--tokens` new
tokens (temperature 0.8, top_p 0.9; the specials' embedding rows are zeroed in the random model
so that no reply stops early, and every reply's length is counted from its chunks). At each
concurrency C, C clients each send `--requests` requests back to back after a warm-up request.
Reported per server and C: generated tokens/s over the wall time of the whole round, p50/p99
of the request latency (first byte to `[DONE]`) and of the time to first token. Writes JSON with
machine info (default benchmarks/results/bench_serve-cpu.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_dpo import make_checkpoint, make_tokenizer  # noqa: E402
from machine import machine_info  # noqa: E402

PROMPTS = [
    "你好，请介绍一下你自己。",
    "What is the capital of France?",
    "请用三句话解释什么是机器学习。",
    "12 + 7 = ?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{base} not ready after {timeout:.0f} s")


def one_request(client, model: str, prompt: str, tokens: int) -> dict:
    t0 = time.perf_counter()
    first = None
    n = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=tokens,
        temperature=0.8,
        top_p=0.9,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and (chunk.choices[0].delta.content or "") != "":
            n += 1
            if first is None:
                first = time.perf_counter() - t0
    return {"latency": time.perf_counter() - t0, "ttft": first or 0.0, "chunks": n}


def full_length(base: str, model: str, tokens: int) -> int:
    """completion_tokens of one non-streaming request: that replies run to max_tokens."""
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=600)
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPTS[1]}],
        max_tokens=tokens,
        temperature=0.8,
        top_p=0.9,
    )
    return r.usage.completion_tokens


def round_of(base: str, model: str, streams: int, requests: int, tokens: int) -> dict:
    """`streams` clients, each `requests` back to back."""
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=600)
    one_request(client, model, PROMPTS[0], 8)  # warm-up
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for j in range(requests):
            try:
                r = one_request(client, model, PROMPTS[(k + j) % len(PROMPTS)], tokens)
                if r["chunks"] == 0:
                    raise RuntimeError("a stream with no content")
            except Exception as e:  # a failed request is counted, not fatal
                with lock:
                    errors.append(repr(e))
                continue
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)

    def pct(xs, p):
        return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else float("nan")

    generated = len(results) * tokens  # full_length() checked that replies run to max_tokens
    return {
        "streams": streams,
        "requests": len(results),
        "errors": errors,
        "chunks_min": min((r["chunks"] for r in results), default=0),
        "tokens_per_request": tokens,
        "wall_s": wall,
        "tokens_per_s": generated / wall,
        "latency_p50_s": pct(lat, 50),
        "latency_p99_s": pct(lat, 99),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
    }


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--vocab", type=int, default=6400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_serve")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_serve-cpu.json")
    args = ap.parse_args()

    import torch

    from spongebob.checkpoint import save_checkpoint
    from spongebob.export_gguf import export_gguf

    args.work.mkdir(parents=True, exist_ok=True)
    tok_dir = make_tokenizer(args.work, 2.0, args.vocab)
    ckpt = args.work / f"ckpt-{args.preset}"
    if not ckpt.is_dir():
        raw = make_checkpoint(args.work / "raw", tok_dir, args.preset, 0, 1024)
        from spongebob import checkpoint

        loaded = checkpoint.load(raw, "cpu", kernels="torch")
        tok = loaded.tokenizer
        with torch.no_grad():  # no special token is ever the likeliest: full-length replies
            for t in ("<unk>", "<s>", "</s>", "<think>", "</think>", "<answer>", "</answer>"):
                i = tok.token_to_id(t)
                if i is not None:
                    loaded.model.embed_tokens.weight[i].zero_()
        save_checkpoint(ckpt, loaded.model, loaded.meta, tokenizer_dir=tok_dir)
    gguf = args.work / f"{args.preset}-f32.gguf"
    if not gguf.is_file():
        export_gguf(ckpt, gguf, "f32", modelfile=False)

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    servers = {
        "spongebob serve": lambda port: [
            sys.executable, "-m", "spongebob", "serve", "--ckpt", str(ckpt),
            "--port", str(port), "--max-batch", "32", "--max-queue", "256",
        ],
        "llama_cpp.server": lambda port: [
            sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
            "--port", str(port), "--n_threads", str(args.threads),
            "--n_threads_batch", str(args.threads), "--n_ctx", "1024",
            "--interrupt_requests", "False",  # queue concurrent requests, don't cut them off
        ],
    }  # fmt: skip
    results: dict[str, list[dict]] = {}
    for name, cmd in servers.items():
        port = free_port()
        log = args.work / f"{name.split()[0]}.log"
        proc = start(cmd(port), env, log)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, proc)
            model = "spongebob" if name.startswith("spongebob") else str(gguf)
            results[name] = []
            n = full_length(base, model, args.tokens)
            if n != args.tokens:
                raise RuntimeError(f"{name}: a reply of {n} tokens, not {args.tokens}")
            for c in args.streams:
                r = round_of(base, model, c, args.requests, args.tokens)
                print(
                    f"{name:18s} streams={c:3d} {r['tokens_per_s']:8.1f} tok/s  "
                    f"p50 {r['latency_p50_s']:.2f}s p99 {r['latency_p99_s']:.2f}s  "
                    f"errors {len(r['errors'])}",
                    file=sys.stderr,
                )
                results[name].append(r)
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(30)

    ours, theirs = results["spongebob serve"], results["llama_cpp.server"]
    rows = [
        "| streams | server | tokens/s | latency p50 | p99 | TTFT p50 | errors | ours/llama.cpp |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for a, b in zip(ours, theirs, strict=True):
        for name, r in (("spongebob serve", a), ("llama_cpp.server", b)):
            ratio = f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}×" if r is a else ""
            rows.append(
                f"| {r['streams']} | {name} | {r['tokens_per_s']:.1f} | "
                f"{r['latency_p50_s']:.2f} s | {r['latency_p99_s']:.2f} s | "
                f"{r['ttft_p50_s']:.3f} s | {len(r['errors'])} | {ratio} |"
            )
    table = "\n".join(rows)
    print(table)
    out = {
        "benchmark": "bench_serve",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/bench_serve.py", *sys.argv[1:]]),
        "machine": machine_info(("torch", "tokenizers", "numpy", "spongebob", "llama_cpp")),
        "settings": {
            "preset": args.preset,
            "vocab": args.vocab,
            "threads": args.threads,
            "tokens": args.tokens,
            "requests_per_client": args.requests,
        },
        "results": results,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
