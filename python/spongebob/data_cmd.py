"""`spongebob data check|demo`: validate jsonl files, generate the demo corpus."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from spongebob.data import TEMPLATES
from spongebob.errors import UserError

BOM = b"\xef\xbb\xbf"


def detect_kind(path: Path) -> str:
    """ "text" or "chat" from the first record that parses; "chat" when none does. A UTF-8
    byte-order mark at the start of the file is skipped, as the loader does (contracts.md §1)."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            if i == 0 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            try:
                obj = json.loads(raw.decode("utf-8"))
            except ValueError:  # also UnicodeDecodeError
                continue
            if isinstance(obj, dict):
                return "text" if "text" in obj else "chat"
    return "chat"


def check_files(
    paths: list[Path],
    tokenizer_dir: Path | None = None,
    kind: str | None = None,
    seq_len: int = 512,
    template: str | None = None,
) -> tuple[list[dict], list[str]]:
    """Per-file report and every bad line as `file:line: reason`, validated by the loader's
    own Rust parser. The report has records and bad-line counts per file; with a tokenizer also
    token counts, length percentiles and how many chat records are longer than `seq_len + 1`
    tokens (they would be truncated). `template` overrides the family the tokenizer folder
    names ("minimind2" or "chatml")."""
    from spongebob.data import check_file, scan_file

    tok = None
    if tokenizer_dir is not None:
        from spongebob.tokenizer import load

        tok = load(tokenizer_dir, template=template)
    reports, problems = [], []
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"{p}: no such file")
        k = kind or detect_kind(p)
        if tok is None:
            records, bad = check_file(str(p), k)
            rep = {"file": str(p), "kind": k, "records": int(records), "bad": len(bad)}
        else:
            lens, bad = scan_file(str(p), tok, k)
            lens = np.asarray(lens, dtype=np.int64)
            rep = {"file": str(p), "kind": k, "records": int(lens.size), "bad": len(bad)}
            if lens.size:
                q = np.percentile(lens, [50, 90, 99])
                rep.update(
                    tokens=int(lens.sum()),
                    p50=float(q[0]),
                    p90=float(q[1]),
                    p99=float(q[2]),
                    max=int(lens.max()),
                    truncated=int((lens > seq_len + 1).sum()) if k == "chat" else 0,
                )
        reports.append(rep)
        for line, _code, msg in bad:
            problems.append(f"{p}:{line}: {msg}" if line else f"{p}: {msg}")
    return reports, problems


def add_commands(sub) -> None:
    p = sub.add_parser("data", help="check jsonl files or generate the demo corpus")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    c = dsub.add_parser(
        "check", help="validate every line; with --tokenizer also token lengths and truncation"
    )
    c.add_argument("files", nargs="+", type=Path, metavar="FILE")
    c.add_argument("--tokenizer", type=Path, metavar="DIR", help="also report token statistics")
    c.add_argument("--kind", choices=["text", "chat"], help="default: from the first record")
    c.add_argument("--seq-len", type=int, default=512)
    c.add_argument(
        "--template",
        choices=TEMPLATES,
        default=None,
        help="chat template family (default: the one the tokenizer folder names)",
    )
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=_cmd_check)

    d = dsub.add_parser("demo", help="generate the demo corpus (training, eval, DPO, GRPO files)")
    d.add_argument("--out", type=Path, required=True, metavar="DIR")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--scale", type=float, default=1.0, help="corpus size multiplier")
    d.set_defaults(func=_cmd_demo)


def _cmd_check(args) -> int:
    if args.template is not None and args.tokenizer is None:
        raise UserError("--template needs --tokenizer")
    reports, problems = check_files(
        args.files, args.tokenizer, args.kind, args.seq_len, template=args.template
    )
    if args.json:
        print(json.dumps({"files": reports, "bad_lines": problems}, ensure_ascii=False, indent=2))
    else:
        tokens = args.tokenizer is not None
        head = f"{'file':<40} {'kind':<5} {'records':>8} {'bad':>5}"
        if tokens:
            head += f" {'tokens':>10} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6} "
            head += f"{'trunc@' + str(args.seq_len):>10}"
        print(head)
        for r in reports:
            row = f"{r['file'][-40:]:<40} {r['kind']:<5} {r['records']:>8} {r['bad']:>5} "
            if tokens and r["records"]:
                row += f"{r['tokens']:>10} {r['p50']:>6.0f} {r['p90']:>6.0f} {r['p99']:>6.0f} "
                row += f"{r['max']:>6} {r['truncated']:>10}"
            print(row)
        for line in problems:
            print(line, file=sys.stderr)
    return 1 if problems else 0


def _cmd_demo(args) -> int:
    from spongebob.demo_data import generate

    files = generate(args.out, seed=args.seed, scale=args.scale)
    for name, path in files.items():
        print(f"{name:<10} {path}")
    return 0
