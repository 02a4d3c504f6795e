"""Loader benchmark: the Rust `PackedDataset` against a MiniMind-style Python baseline.

    python benchmarks/bench_loader.py                 # 50 MB chat + 50 MB pretrain corpus
    python benchmarks/bench_loader.py --size-mb 2     # quick smoke run
    python benchmarks/bench_loader.py --lp            # also bound chat packing by the LP (scipy)

Generates a Chinese-heavy chat corpus and a pretrain corpus with `corpus.py` in a scratch
directory, trains a tokenizer on a small sample of them (or uses `--tokenizer
DIR`), then measures, each run in its own subprocess so peak RSS is that run's alone:

* baseline: the MiniMind-style `Dataset`: `json.loads` of every line of the whole
  file into a list, tokenize in `__getitem__` with HF `tokenizers`, pad to max length, build the
  loss mask by scanning ids, batched by a torch `DataLoader` with `num_workers=0`;
* cold: `PackedDataset` with an empty cache directory (tokenizes and writes the cache);
* warm: `PackedDataset` again on the cache the cold run wrote.

Reported: real (non-padding) input tokens per second over the whole run (construction included),
fill ratio (real / B·T), time to the first batch, peak RSS (ru_maxrss and /proc VmHWM; also
peak minus the RSS after importing torch and tokenizers, i.e. what the loader itself holds), and the
ratio of each run's tokens/s to the baseline of the same corpus. For chat corpora it also bounds
the fewest rows any packing of whole conversations could use (`pack_bound.py`), so the fill can
be judged against what the corpus allows. Prints markdown tables and writes JSON (machine,
versions, date).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corpus import ChineseCorpus, write_jsonl
from machine import machine_info, peak_mb, rss_mb
from pack_bound import bounds, lengths_from_cache

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "loader.json"

# --------------------------------------------------------------------------------------------
# corpora (benchmarks/corpus.py)

# kind → (record maker, seed): conversations of 1–3 turns (up to ~2,000 characters, so some
# exceed a 512-token row and are truncated) and pretrain documents.
CORPORA = {
    "chat": (lambda g: g.conversation, 1),
    "text": (lambda g: g.document, 2),
}


def generate(kind: str, path: Path, size_mb: float) -> int:
    maker, seed = CORPORA[kind]
    return write_jsonl(path, size_mb, maker(ChineseCorpus(seed)))


def sample_file(src: Path, dst: Path, max_bytes: int) -> Path:
    with src.open("rb") as f, dst.open("wb") as out:
        n = 0
        for line in f:
            if n + len(line) > max_bytes:
                break
            out.write(line)
            n += len(line)
    return dst


# --------------------------------------------------------------------------------------------
# the MiniMind-style baseline


def _baseline_datasets():
    import torch
    from torch.utils.data import Dataset

    class PretrainDataset(Dataset):
        def __init__(self, path, tokenizer, max_length):
            self.tok, self.max_length = tokenizer, max_length
            self.pad = tokenizer.token_to_id("<unk>")
            self.samples = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    self.samples.append(json.loads(line.strip()))

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, i):
            ids = self.tok.encode(str(self.samples[i]["text"])).ids[: self.max_length]
            ids = ids + [self.pad] * (self.max_length - len(ids))
            input_ids = torch.tensor(ids, dtype=torch.long)
            loss_mask = input_ids != self.pad
            return input_ids[:-1], input_ids[1:], loss_mask[1:].long()

    class SFTDataset(Dataset):
        def __init__(self, path, tokenizer, max_length, system):
            self.tok, self.max_length, self.system = tokenizer, max_length, system
            self.pad = tokenizer.token_to_id("<unk>")
            self.bos_ids = tokenizer.encode("<s>assistant", add_special_tokens=False).ids
            self.eos_ids = tokenizer.encode("</s>", add_special_tokens=False).ids
            self.samples = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    self.samples.append(json.loads(line.strip()))

        def __len__(self):
            return len(self.samples)

        def _prompt(self, conversations):
            msgs = list(conversations)
            if msgs[0]["role"] != "system":
                msgs = [{"role": "system", "content": self.system}, *msgs]
            return "".join(f"<s>{m['role']}\n{m['content']}</s>\n" for m in msgs)

        def _loss_mask(self, ids):
            mask = [0] * len(ids)
            b, e = self.bos_ids, self.eos_ids
            i = 0
            while i < len(ids):
                if ids[i : i + len(b)] == b:
                    start = i + len(b)
                    end = start
                    while end < len(ids):
                        if ids[end : end + len(e)] == e:
                            break
                        end += 1
                    for j in range(start + 1, min(end + len(e) + 1, self.max_length)):
                        mask[j] = 1
                    i = end + len(e) if end < len(ids) else len(ids)
                else:
                    i += 1
            return mask

        def __getitem__(self, i):
            prompt = self._prompt(self.samples[i]["conversations"])
            ids = self.tok.encode(prompt, add_special_tokens=False).ids[: self.max_length]
            ids = ids + [self.pad] * (self.max_length - len(ids))
            mask = self._loss_mask(ids)
            x = torch.tensor(ids[:-1], dtype=torch.long)
            y = torch.tensor(ids[1:], dtype=torch.long)
            return x, y, torch.tensor(mask[1:], dtype=torch.long)

    return PretrainDataset, SFTDataset


# --------------------------------------------------------------------------------------------
# one measured run (in a subprocess)


def worker(spec: dict) -> dict:
    import tokenizers  # noqa: F401  (imported before the RSS baseline is taken)
    import torch

    import spongebob.data  # noqa: F401

    torch.set_num_threads(1)
    rss_import = rss_mb()
    seq_len, bs, kind = spec["seq_len"], spec["batch_size"], spec["kind"]
    max_seconds = spec.get("max_seconds") or float("inf")
    t0 = time.perf_counter()
    if spec["variant"] == "baseline":
        from tokenizers import Tokenizer

        from spongebob.data import DEFAULT_SYSTEM

        tok = Tokenizer.from_file(str(Path(spec["tokenizer"]) / "tokenizer.json"))
        pretrain_cls, sft_cls = _baseline_datasets()
        if kind == "chat":
            ds = sft_cls(spec["path"], tok, seq_len + 1, DEFAULT_SYSTEM)
        else:
            ds = pretrain_cls(spec["path"], tok, seq_len + 1)
        loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=0)
        pad = 0

        def batches():
            for x, _y, _m in loader:
                yield x
    else:
        from spongebob.data import PackedDataset

        ds = PackedDataset(
            [spec["path"]],
            spec["tokenizer"],
            kind=kind,
            seq_len=seq_len,
            batch_size=bs,
            seed=0,
            cache_dir=spec.get("cache_dir"),
        )
        pad = ds.tokenizer.pad_id

        def batches():
            for b in ds:
                yield b["input_ids"]

    t_init = time.perf_counter() - t0
    real = slots = n = 0
    t_first = None
    complete = True
    for x in batches():
        if t_first is None:
            t_first = time.perf_counter() - t0
        real += int((x != pad).sum())
        slots += x.numel()
        n += 1
        if time.perf_counter() - t0 > max_seconds:
            complete = False
            break
    elapsed = time.perf_counter() - t0
    res = {
        **spec,
        "batches": n,
        "real_tokens": real,
        "slots": slots,
        "fill": real / slots if slots else 0.0,
        "init_s": t_init,
        "first_batch_s": t_first,
        "elapsed_s": elapsed,
        "tokens_per_s": real / elapsed if elapsed > 0 else 0.0,
        "complete_epoch": complete,
        "rss_after_import": rss_import,
        "rss_peak": rss_mb(),
    }
    if spec["variant"] != "baseline":
        st = ds.stats()
        res["loader_stats"] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in st.items()}
    return res


def run_in_subprocess(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({spec['variant']} {spec['kind']}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# report


def table(results: list[dict]) -> str:
    base = {r["kind"]: r["tokens_per_s"] for r in results if r["variant"] == "baseline"}
    lines = [
        "| corpus | loader | real tokens/s | × baseline | fill | first batch (s) | total (s) "
        "| peak RSS (MB) | RSS over imports (MB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = {
        "baseline": "MiniMind-style Python",
        "cold": "PackedDataset cold",
        "warm": "PackedDataset warm",
    }
    for r in results:
        ratio = r["tokens_per_s"] / base[r["corpus"]] if base.get(r["corpus"]) else float("nan")
        peak = peak_mb(r["rss_peak"])
        base_rss = peak_mb(r["rss_after_import"])
        name = names.get(r["variant"], r["variant"]) + ("" if r["complete_epoch"] else " (partial)")
        lines.append(
            f"| {r['corpus']} ({r['size_mb']:.0f} MB) | {name} "
            f"| {r['tokens_per_s'] / 1e6:.3f} M | {ratio:.1f}× | {100 * r['fill']:.1f} % "
            f"| {r['first_batch_s'] or 0:.2f} | {r['elapsed_s']:.1f} | {peak:.0f} "
            f"| {peak - base_rss:.0f} |"
        )
    packed = [r for r in results if "pack_bound" in r]
    if packed:
        lines += [
            "",
            "| corpus | rows packed | fewest rows possible | fill of rows | best possible |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in packed:
            st, pb = r["loader_stats"], r["pack_bound"]
            kind = "LP" if "lp_rows" in pb else "L2"
            lines.append(
                f"| {r['corpus']} | {st['rows']} | {pb['best_rows']} ({kind}) "
                f"| {100 * st['fill']:.2f} % | {100 * pb['max_fill']:.2f} % |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mb", type=float, default=50.0, help="size of each corpus (default 50)")
    p.add_argument(
        "--scratch", type=Path, default=Path(tempfile.gettempdir()) / "spongebob_bench_loader"
    )
    p.add_argument("--tokenizer", type=Path, help="tokenizer dir (default: train one, vocab 6400)")
    p.add_argument("--vocab-size", type=int, default=6400)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--kinds", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    p.add_argument(
        "--lp", action="store_true", help="bound chat packing by the LP too (needs scipy)"
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=["baseline", "cold", "warm"],
        choices=["baseline", "cold", "warm"],
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=0,
        help="stop a run after this long (0 = the whole epoch)",
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
    tag = f"{args.size_mb:g}mb"
    paths = {kind: scratch / f"{kind}_{tag}.jsonl" for kind in args.kinds}
    for kind, path in paths.items():
        if args.regen or not path.exists():
            t = time.perf_counter()
            n = generate(kind, path, args.size_mb)
            print(
                f"generated {path} ({n} records, {time.perf_counter() - t:.1f}s)", file=sys.stderr
            )

    tok_dir = args.tokenizer
    if tok_dir is None:
        tok_dir = scratch / f"tokenizer_{args.vocab_size}"
        if args.regen or not (tok_dir / "tokenizer.json").exists():
            from spongebob.tokenizer import train_tokenizer

            budget = 4_000_000  # byte-level BPE on Chinese is memory-hungry: train on a sample
            samples = [
                sample_file(paths[k], scratch / f"sample_{k}.jsonl", budget // len(args.kinds))
                for k in args.kinds
            ]
            train_tokenizer(samples, tok_dir, vocab_size=args.vocab_size, show_progress=False)

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = []
    for kind in args.kinds:
        cache = scratch / f"cache_{kind}_{tag}"
        if cache.exists():
            for f in sorted(cache.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
        size_mb = paths[kind].stat().st_size / 1e6
        for variant in args.variants:
            spec = dict(
                variant=variant,
                corpus=kind,
                kind=kind,
                path=str(paths[kind]),
                size_mb=size_mb,
                tokenizer=str(tok_dir),
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                max_seconds=args.max_seconds,
                cache_dir=str(cache) if variant != "baseline" else None,
            )
            r = run_in_subprocess(spec)
            if variant == "cold" and spec["kind"] == "chat":
                lengths = lengths_from_cache(cache)
                r["pack_bound"] = bounds(lengths, args.seq_len + 1, lp=args.lp)
            print(
                f"{kind:9s} {variant:8s} {r['tokens_per_s'] / 1e6:8.3f} M tok/s  "
                f"fill {100 * r['fill']:5.1f} %  {r['elapsed_s']:6.1f} s",
                file=sys.stderr,
            )
            results.append(r)

    base = {r["corpus"]: r["tokens_per_s"] for r in results if r["variant"] == "baseline"}
    for r in results:
        r["ratio_to_baseline"] = (
            r["tokens_per_s"] / base[r["corpus"]] if base.get(r["corpus"]) else None
        )
    md = table(results)
    print(md)
    report = {
        "benchmark": "loader",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "loadavg_at_start": load_start},
        "args": {k: str(v) for k, v in vars(args).items() if k != "_worker"},
        "results": results,
        "table_markdown": md,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
