"""Tokenizer-training benchmark: the plain HF trainer against the bounded-memory trainer.

    python benchmarks/bench_tokenizer.py                          # 50, 100, 200 MB
    python benchmarks/bench_tokenizer.py --sizes 5 --max-memory 300MB     # quick smoke run

Generates one Chinese-heavy jsonl corpus (pretrain documents and chat records, in MiniMind's
formats) and uses prefixes of it for the sizes asked, so the distinct clauses grow with the
size as they do in real data. A held-out file is drawn from the same distribution (same
lexicon, another sampling seed). Each training runs in its own subprocess, so its peak RSS
(/proc VmHWM) is its own; compression (characters per token) is measured afterwards on the
held-out text. Prints a markdown table and writes JSON (machine, versions, date).

The generator is `corpus.py`: nearly every clause is new, so the number of distinct pre-tokens
grows almost linearly with the corpus (the case that makes byte-level BPE on Chinese expensive).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corpus import generate
from machine import machine_info, peak_mb, rss_mb

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "tokenizer.json"


def prefix_file(src: Path, dst: Path, size_mb: float) -> Path:
    """The first whole lines of `src` up to `size_mb` MB."""
    limit = int(size_mb * 1e6)
    with src.open("rb") as f, dst.open("wb") as out:
        n = 0
        for line in f:
            if n >= limit:
                break
            out.write(line)
            n += len(line)
    return dst


def read_texts(path: Path) -> list[str]:
    """The texts a trainer sees: text records (one marker pair stripped) and chat contents."""
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            if "text" in obj:
                t = obj["text"]
                t = t[3:] if t.startswith("<s>") else t
                out.append(t[:-4] if t.endswith("</s>") else t)
            else:
                out += [m["content"] for m in obj["conversations"]]
    return out


# --------------------------------------------------------------------------------------------
# one measured training (in a subprocess)


def worker(spec: dict) -> dict:
    from spongebob.tokenizer import train_tokenizer

    rss_start = rss_mb()
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    t0 = time.perf_counter()
    train_tokenizer(
        [Path(spec["data"])],
        Path(spec["out"]),
        vocab_size=spec["vocab_size"],
        show_progress=False,
        trainer=spec["trainer"],
        max_memory=spec["max_memory"],
    )
    wall = time.perf_counter() - t0
    return {
        **spec,
        "wall_s": wall,
        "loadavg_before": load,
        "rss_start": rss_start,
        "rss_peak": rss_mb(),
    }


def run_in_subprocess(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {**spec, "failed": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["log"] = proc.stderr.strip().splitlines()
    return res


def chars_per_token(tok_dir: Path, texts: list[str]) -> float:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return sum(len(t) for t in texts) / tokens


def mem_available_mb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


# --------------------------------------------------------------------------------------------
# report


def table(results: list[dict]) -> str:
    lines = [
        "| corpus | trainer | peak RSS (MB) | × plain | wall (s) | × plain "
        "| chars/token (held-out) | vs plain |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    plain = {r["size_mb"]: r for r in results if r["trainer"] == "plain" and "failed" not in r}
    for r in results:
        name = r["trainer"] + (f" ({r['max_memory']})" if r["trainer"] == "bounded" else "")
        if "failed" in r:
            lines.append(f"| {r['size_mb']:.0f} MB | {name} | {r['failed'][:60]} | | | | | |")
            continue
        p = plain.get(r["size_mb"])
        if p is not None and r is not p:
            rss = f"{peak_mb(r['rss_peak']) / peak_mb(p['rss_peak']):.3f}"
            wall = f"{r['wall_s'] / p['wall_s']:.3f}"
            cpt = f"{100 * (r['chars_per_token'] / p['chars_per_token'] - 1):+.2f} %"
        else:
            rss = wall = cpt = "—"
        lines.append(
            f"| {r['size_mb']:.0f} MB | {name} | {peak_mb(r['rss_peak']):.0f} | {rss} "
            f"| {r['wall_s']:.1f} "
            f"| {wall} | {r['chars_per_token']:.4f} | {cpt} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[50, 100, 200], metavar="MB")
    p.add_argument("--max-memory", default="512MB", help="the bounded trainer's cap")
    p.add_argument("--vocab-size", type=int, default=6400)
    p.add_argument("--heldout-mb", type=float, default=3.0)
    p.add_argument("--trainers", nargs="+", default=["plain", "bounded"])
    p.add_argument(
        "--plain-ram-factor",
        type=float,
        default=95.0,
        help="skip the plain trainer when MemAvailable < this × the corpus (default 95)",
    )
    p.add_argument(
        "--scratch", type=Path, default=Path(tempfile.gettempdir()) / "spongebob_bench_tokenizer"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--regen", action="store_true", help="regenerate the corpora")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))))
        return 0

    scratch = args.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    biggest = max(args.sizes)
    full = scratch / f"corpus_{biggest:g}mb.jsonl"
    heldout = scratch / "heldout.jsonl"
    for path, size, seed in ((full, biggest, 1), (heldout, args.heldout_mb, 99)):
        if args.regen or not path.exists():
            t = time.perf_counter()
            n = generate(path, size, seed)
            print(
                f"generated {path} ({n} records, {time.perf_counter() - t:.0f}s)", file=sys.stderr
            )
    held_texts = read_texts(heldout)

    results = []
    for size in sorted(args.sizes):
        data = full if size == biggest else scratch / f"corpus_{size:g}mb.jsonl"
        if data != full and (args.regen or not data.exists()):
            prefix_file(full, data, size)
        size_mb = data.stat().st_size / 1e6
        for trainer in args.trainers:
            spec = dict(
                trainer=trainer,
                size_mb=size_mb,
                data=str(data),
                out=str(scratch / f"tok_{trainer}_{size:g}mb"),
                vocab_size=args.vocab_size,
                max_memory=args.max_memory,
            )
            need = args.plain_ram_factor * size_mb
            if trainer == "plain" and mem_available_mb() < need:
                r = {
                    **spec,
                    "failed": f"skipped: needs ~{need / 1024:.1f} GB, "
                    f"{mem_available_mb() / 1024:.1f} GB available",
                }
            else:
                r = run_in_subprocess(spec)
            if "failed" not in r:
                r["chars_per_token"] = chars_per_token(Path(r["out"]), held_texts)
                print(
                    f"{size_mb:6.0f} MB {trainer:8s} peak {peak_mb(r['rss_peak']):7.0f} MB  "
                    f"{r['wall_s']:7.1f} s  {r['chars_per_token']:.4f} chars/token",
                    file=sys.stderr,
                )
            else:
                print(f"{size_mb:6.0f} MB {trainer:8s} {r['failed']}", file=sys.stderr)
            results.append(r)

    plain = {r["size_mb"]: r for r in results if r["trainer"] == "plain" and "failed" not in r}
    for r in results:
        pr = plain.get(r["size_mb"])
        if r["trainer"] != "plain" and pr is not None and "failed" not in r:
            r["vs_plain"] = {
                "peak_rss": peak_mb(r["rss_peak"]) / peak_mb(pr["rss_peak"]),
                "wall": r["wall_s"] / pr["wall_s"],
                "chars_per_token": r["chars_per_token"] / pr["chars_per_token"],
            }
    md = table(results)
    print(md)
    report = {
        "benchmark": "tokenizer",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(("tokenizers", "spongebob")),
        "command": "python benchmarks/bench_tokenizer.py " + " ".join(argv or sys.argv[1:]),
        "heldout": {"path": str(heldout), "chars": sum(len(t) for t in held_texts)},
        "results": results,
        "table": md,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
