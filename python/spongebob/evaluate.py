"""`spongebob eval`: perplexity, answer accuracy and reasoning format of a checkpoint.

For every file (pretrain `{"text"}` or chat `{"conversations"}` jsonl, detected per line):

* perplexity over the *trained* tokens only — exactly the tokens the loss trains (contracts.md §2):
  a text's tokens after `<s>`, a conversation's assistant contents and their `</s>`. Scoring
  the prompt too would mix "how well it predicts users" into the number.
* for chat lines that carry a reference `"answer"`: the conversation up to its last assistant
  turn is the prompt, the model answers greedily, and we count
  - exact: the reply (its `<answer>` part for reasoning prompts), stripped of surrounding
    whitespace and punctuation, equals the key or the reference reply;
  - contains: the key occurs in the reply (digit-bounded for numbers, so "13" is not in "130");
  - for reasoning prompts (the reference reply has `<think>`, or `"mode": "reason"`): the share
    of well-formed `<think>…</think><answer>…</answer>` replies.
  Results are also broken down by the line's `"task"` (the demo's fact / identity / arith).

Prints a table and writes everything, every reply included, as JSON.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spongebob.errors import UserError
from spongebob.generate import SamplingConfig, parse_reasoning

PUNCT = " \t\r\n。．.，,！!？?；;：:、\"'“”‘’「」《》()（）"


# --- reading -------------------------------------------------------------------------------


def read_records(path: Path, limit: int | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a jsonl file, streamed; bad lines are `file:line` errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    n = 0
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise UserError(f"{path}:{line_no}: invalid UTF-8") from None
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{line_no}: expected a JSON object")
            if isinstance(rec.get("text"), str):
                pass
            elif isinstance(rec.get("conversations"), list) and rec["conversations"]:
                for m in rec["conversations"]:
                    if not (
                        isinstance(m, dict)
                        and isinstance(m.get("content"), str)
                        and m.get("role") in ("system", "user", "assistant")
                    ):
                        raise UserError(f"{path}:{line_no}: bad message {str(m)[:60]}")
            else:
                raise UserError(f'{path}:{line_no}: neither a "text" nor a "conversations" record')
            yield line_no, rec
            n += 1
            if limit is not None and n >= limit:
                return
    if n == 0:
        raise UserError(f"{path}: empty file")


# --- scoring -------------------------------------------------------------------------------


def _trained(tok, rec: dict) -> tuple[list[int], list[bool]] | None:
    """Token ids and, per token, whether predicting it is trained; None if nothing is."""
    if "text" in rec:
        ids = [int(i) for i in tok.encode_document(rec["text"])]
        return ids, [False] + [True] * (len(ids) - 1)
    if not any(m["role"] == "assistant" for m in rec["conversations"]):
        return None
    ids, weights = tok.encode_conversation(rec["conversations"], think_weight=1.0)
    return [int(i) for i in ids], [bool(w > 0) for w in weights]


def perplexity(model, tok, records: list[dict], seq_len: int, max_batch_tokens: int = 8192) -> dict:
    """Mean negative log-likelihood over trained tokens → perplexity. A record longer than
    `seq_len + 1` tokens is cut there (and counted)."""
    import torch
    import torch.nn.functional as F

    items, truncated = [], 0
    for rec in records:
        enc = _trained(tok, rec)
        if enc is None:
            continue
        ids, mask = enc
        if len(ids) > seq_len + 1:
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            truncated += 1
        if len(ids) >= 2 and any(mask[1:]):
            items.append((ids, mask))
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    i = 0
    with torch.inference_mode():
        while i < len(items):
            batch = [items[i]]
            width = len(items[i][0]) - 1
            i += 1
            while (
                i < len(items)
                and max(width, len(items[i][0]) - 1) * (len(batch) + 1) <= max_batch_tokens
            ):
                width = max(width, len(items[i][0]) - 1)
                batch.append(items[i])
                i += 1
            x = torch.zeros(len(batch), width, dtype=torch.long)
            y = torch.full((len(batch), width), -100, dtype=torch.long)
            for r, (ids, mask) in enumerate(batch):
                n = len(ids) - 1
                x[r, :n] = torch.tensor(ids[:-1])
                tgt = torch.tensor(ids[1:])
                tgt[~torch.tensor(mask[1:])] = -100
                y[r, :n] = tgt
            logits = model(x.to(dev))  # causal; right padding never affects real tokens
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                y.to(dev).reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            nll += float(loss)
            count += int((y != -100).sum())
    mean = nll / count if count else None  # None, not NaN: the JSON stays standard
    ppl = None if mean is None else (math.exp(mean) if mean < 700 else 1e300)
    return {
        "records": len(items),
        "tokens": count,
        "truncated": truncated,
        "loss": mean,
        "ppl": ppl,
    }


def normalize(s: str) -> str:
    return s.strip().strip(PUNCT).casefold()


def contains(reply: str, key: str) -> bool:
    """`key` in `reply`; a number must stand alone (not part of a longer number)."""
    key = key.strip()
    if not key:
        return False
    if re.fullmatch(r"-?\d+(\.\d+)?", key):
        return re.search(rf"(?<![\d.]){re.escape(key)}(?![\d]|\.\d)", reply) is not None
    return key.casefold() in reply.casefold()


def is_reasoning(rec: dict) -> bool:
    if rec.get("mode") == "reason":
        return True
    last = [m["content"] for m in rec["conversations"] if m["role"] == "assistant"]
    return bool(last) and "<think>" in last[-1]


def split_prompt(rec: dict) -> tuple[list[dict], str | None]:
    """(messages before the last assistant turn, that turn's content) of an answer record."""
    msgs = rec["conversations"]
    idx = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if idx is None:
        return msgs, None
    return msgs[:idx], msgs[idx]["content"]


def score_reply(reply: str, key: str, reference: str | None, reasoning: bool) -> dict:
    """exact / contains / well_formed for one reply (see the module docstring)."""
    parsed = parse_reasoning(reply) if reasoning else None
    answer = parsed.answer if parsed is not None and parsed.answer else reply
    targets = {normalize(key)}
    if reference is not None:
        ref = parse_reasoning(reference).answer if reasoning else reference
        targets.add(normalize(ref))
    out = {"exact": normalize(answer) in targets, "contains": contains(answer, key)}
    if parsed is not None:
        out["well_formed"] = parsed.well_formed
    return out


def answer_accuracy(
    model, tok, records: list[tuple[int, dict]], cfg: SamplingConfig, batch_size: int = 16
) -> dict:
    """Generate a reply for every record with an "answer" and score it."""
    from spongebob.generate import Generator

    gen = Generator(model, tok)
    todo = []
    for line_no, rec in records:
        if "conversations" not in rec or "answer" not in rec:
            continue
        prompt, reference = split_prompt(rec)
        if not prompt or prompt[-1]["role"] != "user":
            continue
        ids = [int(i) for i in tok.encode_prompt(prompt)]
        todo.append((line_no, rec, ids, reference))
    # Similar lengths together: less padding per batch.
    order = sorted(range(len(todo)), key=lambda k: len(todo[k][2]))
    replies: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        outs = gen.generate([todo[k][2] for k in chunk], cfg)
        for k, g in zip(chunk, outs, strict=True):
            replies[k] = g.text
    rows = []
    for k, (line_no, rec, _, reference) in enumerate(todo):
        reasoning = is_reasoning(rec)
        key = str(rec["answer"])
        row = {
            "line": line_no,
            "task": str(rec.get("task", "all")),
            "answer": key,
            "prompt": split_prompt(rec)[0][-1]["content"],
            "reply": replies[k],
            "reasoning": reasoning,
            **score_reply(replies[k], key, reference, reasoning),
        }
        rows.append(row)
    return {"summary": summarize(rows), "rows": rows}


def summarize(rows: list[dict]) -> dict:
    def agg(rs: list[dict]) -> dict:
        n = len(rs)
        reasoning = [r for r in rs if r["reasoning"]]
        out = {
            "n": n,
            "exact": sum(r["exact"] for r in rs) / n if n else None,
            "contains": sum(r["contains"] for r in rs) / n if n else None,
            "reasoning_n": len(reasoning),
            "well_formed": (
                sum(r["well_formed"] for r in reasoning) / len(reasoning) if reasoning else None
            ),
        }
        return out

    tasks = sorted({r["task"] for r in rows})
    return {
        "all": agg(rows),
        "by_task": {t: agg([r for r in rows if r["task"] == t]) for t in tasks},
    }


def evaluate(
    model,
    tok,
    paths: list[Path],
    cfg: SamplingConfig | None = None,
    seq_len: int | None = None,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict:
    """The whole evaluation as a dict (what `spongebob eval` prints and writes)."""
    cfg = cfg or SamplingConfig(max_new_tokens=256, temperature=0.0)
    seq_len = seq_len or min(model.config.max_seq_len - 1, 1024)
    result: dict[str, Any] = {"files": {}}
    for path in paths:
        t0 = time.perf_counter()
        records = list(read_records(Path(path), limit))
        entry: dict[str, Any] = {
            "perplexity": perplexity(model, tok, [r for _, r in records], seq_len)
        }
        if any("answer" in r and "conversations" in r for _, r in records):
            entry["answers"] = answer_accuracy(model, tok, records, cfg, batch_size)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        result["files"][str(path)] = entry
    return result


def format_table(result: dict) -> str:
    """A plain-text table: one line per file and, under it, one per task."""

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:5.1f}%"

    head = (
        f"{'file / task':<32} {'tokens':>8} {'ppl':>9} {'n':>5} {'exact':>7} "
        f"{'contains':>8} {'format':>7}"
    )
    lines = [head, "-" * len(head)]
    for path, e in result["files"].items():
        ppl = e["perplexity"]
        name = Path(path).name
        a = e.get("answers", {}).get("summary")
        s = a["all"] if a else None
        lines.append(
            f"{name[:32]:<32} {ppl['tokens']:>8} "
            + f"{_fmt_ppl(ppl['ppl']):>9} "
            + (
                f"{s['n']:>5} {pct(s['exact']):>7} {pct(s['contains']):>8} "
                f"{pct(s['well_formed']):>7}"
                if s
                else f"{'':>5} {'—':>7} {'—':>8} {'—':>7}"
            )
        )
        if a and len(a["by_task"]) > 1:
            for task, t in a["by_task"].items():
                lines.append(
                    f"{'  ' + task:<32} {'':>8} {'':>9} {t['n']:>5} "
                    f"{pct(t['exact']):>7} {pct(t['contains']):>8} "
                    f"{pct(t['well_formed']):>7}"
                )
    return "\n".join(lines)


def _fmt_ppl(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 1e5 else f"{x:.2e}"


# --- command line --------------------------------------------------------------------------


def add_commands(sub) -> None:
    """`spongebob eval`."""
    from spongebob.chat import add_sampling_args

    p = sub.add_parser("eval", help="perplexity, answer accuracy and reasoning format")
    p.add_argument(
        "--ckpt",
        required=True,
        type=Path,
        metavar="PATH",
        help="run folder, stage folder, checkpoint dir or file, or exported HF dir",
    )
    p.add_argument("--data", required=True, nargs="+", type=Path, metavar="FILE")
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="JSON results (default: eval.json in the checkpoint dir)",
    )
    p.add_argument("--limit", type=int, metavar="N", help="only the first N records per file")
    p.add_argument(
        "--seq-len",
        type=int,
        help="cut longer records for perplexity (default: min(1024, model context))",
    )
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    add_sampling_args(p, greedy=True)
    p.add_argument("--tokenizer", type=Path, metavar="DIR")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from spongebob.chat import sampling_from_args
    from spongebob.generate import load_for_inference

    for path in args.data:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such file")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--batch-size and --limit must be at least 1")
    cfg = sampling_from_args(args)
    model, tok, meta = load_for_inference(args.ckpt, args.device, args.tokenizer)
    result = evaluate(model, tok, args.data, cfg, args.seq_len, args.limit, args.batch_size)
    result["ckpt"] = meta["path"]
    result["sampling"] = {k: v for k, v in vars(cfg).items() if k != "stop_ids"}
    print(format_table(result))
    out = args.out or Path(meta["path"]) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
    return 0
