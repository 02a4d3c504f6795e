"""`spongebob eval`: perplexity, answer accuracy and reasoning format of a checkpoint.

For every file (pretrain `{"text"}` or chat `{"conversations"}` jsonl, detected per file):

* the one evaluation of contracts.md §6, also run by training-time validation: the file is read
  by the training loader, and the unweighted cross-entropy of exactly the tokens the loss
  trains (a text's tokens after `<s>`, a conversation's assistant contents and their `</s>`)
  gives loss, perplexity and bits per byte. Scoring the prompt too would mix "how well it
  predicts users" into the number; bits per byte compares models with different tokenizers.
* for chat lines that carry a reference `"answer"`: the conversation up to its last assistant
  turn is the prompt, the model answers greedily, and we count
  - exact: the reply (its `<answer>` part for reasoning prompts), stripped of surrounding
    whitespace and punctuation, equals the key or the reference reply;
  - contains: the key occurs in the reply; a number must be the reply's last number (so "13"
    is not in "130", nor in "13 + 5 = 18");
  - for reasoning prompts (the reference reply has `<think>` or `reasoning_content`, or
    `"mode": "reason"`): the share of well-formed replies (`<think>…</think><answer>…</answer>`;
    for a chatml-family model, prompted with its think block open, `…</think>` then the answer);
  - for `"task": "tool"` lines (a line's `tools` go into the prompt): the reply must call
    `calc` with an expression whose value is the key (exact = contains = that).
  Results are also broken down by the line's `"task"` (the demo's fact / identity / arith /
  recall / tool) and, where lines name one, by `"split"` within a task (the demo's
  `unseen_family` wordings vs `new_pairing`s of known wordings with held-out items).

Prints a table and writes everything, every reply included, as JSON.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spongebob.data import REASONING_TAGS
from spongebob.errors import UserError
from spongebob.generate import SamplingConfig, parse_reasoning

if TYPE_CHECKING:
    import torch

    from spongebob.runtime import Runtime

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
                text = raw.decode("utf-8")
                rec = json.loads(text.removeprefix("\ufeff") if line_no == 1 else text)
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


def token_byte_lengths(tok) -> torch.Tensor:
    """UTF-8 bytes of each token id's text (int64 [vocab]), contracts.md §6: the template's
    structural tokens (`<unk>`, `<s>`, `</s>`) count 0; an added token such as a reasoning tag
    counts the bytes of its text, as it would with a tokenizer that spells it in plain tokens.

    Byte-level BPE stores every other token as a string over GPT-2's 256-character byte
    alphabet, so its byte length is the length of that string once mapped back to bytes.
    """
    import torch

    tok_json = json.loads(Path(tok.path).read_text(encoding="utf-8"))
    added = {int(t["id"]): t["content"] for t in tok_json.get("added_tokens", [])}
    structural = {tok.pad_id, tok.bos_id, tok.eos_id}
    alphabet = _byte_alphabet()
    out = torch.zeros(tok.vocab_size, dtype=torch.int64)
    for i in range(tok.vocab_size):
        piece = tok.id_to_token(i)
        if piece is None or i in structural:
            continue
        if i in added:
            out[i] = len(added[i].encode("utf-8"))
        else:
            out[i] = sum(1 if ch in alphabet else len(ch.encode("utf-8")) for ch in piece)
    return out


def _byte_alphabet() -> set[str]:
    """The 256 characters GPT-2's byte-level encoding maps the bytes to."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = [b for b in range(256) if b not in keep]
    return {chr(c) for c in keep} | {chr(256 + n) for n in range(len(extra))}


def score_batches(
    model, batches, rt: Runtime, token_bytes: torch.Tensor, max_batches: int = 0
) -> dict:
    """The one evaluation (contracts.md §6) over loader batches, summed over all ranks:
    unweighted token cross-entropy of the trained tokens, its perplexity, and bits per byte.
    `loss_weights` are ignored (a think_weight never changes a reported perplexity)."""
    import torch

    was_training = model.training
    model.eval()
    ce = torch.zeros((), dtype=torch.float64, device=rt.device)
    counts = torch.zeros(2, dtype=torch.float64, device=rt.device)  # tokens, bytes
    one = torch.ones((), dtype=torch.float32, device=rt.device)
    nbytes = token_bytes.to(rt.device)
    n = 0
    with torch.no_grad():
        for batch in batches:
            b = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
            mask = b["labels"] != -100
            with rt.autocast():
                loss = model(
                    b["input_ids"],
                    b["position_ids"],
                    labels=b["labels"],
                    loss_weights=mask.to(torch.float32),
                    normalizer=one,
                )
            ce += loss.double()
            counts[0] += mask.sum()
            counts[1] += nbytes[b["labels"].clamp_min(0)][mask].sum()
            n += 1
            if max_batches and n >= max_batches:
                break
    rt.all_reduce_sum(ce)
    rt.all_reduce_sum(counts)
    model.train(was_training)
    tokens, n_bytes = int(counts[0]), int(counts[1])
    loss_v = ce.item() / tokens if tokens else None  # None, not NaN: the JSON stays standard
    return {
        "loss": loss_v,
        "ppl": None if loss_v is None else math.exp(min(loss_v, 700.0)),
        "bpb": ce.item() / (math.log(2) * n_bytes) if n_bytes else None,
        "tokens": tokens,
        "bytes": n_bytes,
    }


def perplexity(
    model,
    tok,
    path: Path,
    seq_len: int,
    kind: str | None = None,
    batch_size: int = 8,
    rt: Runtime | None = None,
) -> dict:
    """`score_batches` over one jsonl file, read by the training loader (the same rows,
    truncation and mask as training-time validation of that file: seed 0, think weight 1).
    Lines that are not trainable records (a prompt without a reply) are skipped and counted."""
    from spongebob.data import PackedDataset
    from spongebob.data_cmd import detect_kind

    rt = rt or _runtime_of(model)
    kind = kind or detect_kind(Path(path))
    ds = PackedDataset(
        [path], tok, kind=kind, seq_len=seq_len, batch_size=batch_size, seed=0,
        on_bad_line="skip", rank=rt.rank, world_size=rt.world_size,
    )  # fmt: skip
    stats = ds.stats()
    out = score_batches(model, ds, rt, token_byte_lengths(tok))
    out.update(
        kind=kind,
        records=int(stats.get("documents", 0)),
        truncated=int(stats.get("truncated", 0)),
        skipped=dict(stats.get("skipped") or {}),
    )
    return out


def _runtime_of(model) -> Runtime:
    """A single-process Runtime on the model's device, in the model's parameter dtype."""
    from spongebob.runtime import Runtime

    p = next(model.parameters())
    return Runtime(p.device, p.dtype)


def normalize(s: str) -> str:
    return s.strip().strip(PUNCT).casefold()


def contains(reply: str, key: str) -> bool:
    """`key` in `reply`; a number must be the reply's last number (the one it concludes with),
    so a worked line that passes through the value, or a run of guesses, does not count."""
    key = key.strip()
    if not key:
        return False
    if re.fullmatch(r"-?\d+(\.\d+)?", key):
        numbers = re.findall(r"-?\d+(?:\.\d+)?", reply)
        return bool(numbers) and float(numbers[-1]) == float(key)
    return key.casefold() in reply.casefold()


def is_reasoning(rec: dict) -> bool:
    if rec.get("mode") == "reason":
        return True
    last = [m for m in rec["conversations"] if m["role"] == "assistant"]
    return bool(last) and (
        REASONING_TAGS[0] in (last[-1].get("content") or "")
        or isinstance(last[-1].get("reasoning_content"), str)
    )


def split_prompt(rec: dict) -> tuple[list[dict], str | None]:
    """(messages before the last assistant turn, that turn's content) of an answer record."""
    msgs = rec["conversations"]
    idx = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if idx is None:
        return msgs, None
    return msgs[:idx], msgs[idx]["content"]


def calls_tool_correctly(reply: str, key: str) -> bool:
    """Does the reply call `calc` with an expression whose value is `key`?"""
    from spongebob.generate import find_tool_calls
    from spongebob.tools import calc

    parsed = find_tool_calls(reply)
    for c in parsed.calls if parsed else []:
        expr = c.arguments.get("expr")
        if c.name == "calc" and isinstance(expr, str):
            try:
                if calc(expr) == key:
                    return True
            except ValueError:
                pass
    return False


def score_reply(
    reply: str,
    key: str,
    reference: str | None,
    reasoning: bool,
    template: str = "minimind2",
    opened: bool = False,
) -> dict:
    """exact / contains / well_formed for one reply (see the module docstring); `opened`: the
    prompt ended in `<think>` (chatml), so the reply starts inside the reasoning."""
    parsed = parse_reasoning(reply, template, opened) if reasoning else None
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
    model,
    tok,
    records: list[tuple[int, dict]],
    cfg: SamplingConfig,
    batch_size: int = 16,
    task_tokens: Mapping[str, int] | None = None,
) -> dict:
    """Generate a reply for every record with an "answer" and score it. `task_tokens` caps the
    reply length of some tasks below `cfg.max_new_tokens`: a batch runs until its longest reply
    stops, so a task whose right replies are short need not pay for another task's long ones
    (nor for a base model that never stops)."""
    from spongebob.generate import Generator

    gen = Generator(model, tok)
    template = getattr(tok, "template", "minimind2")
    todo = []
    for line_no, rec in records:
        if "conversations" not in rec or "answer" not in rec:
            continue
        prompt, reference = split_prompt(rec)
        if not prompt or prompt[-1]["role"] != "user":
            continue
        opened = template == "chatml" and is_reasoning(rec)
        kw = {"tools": rec["tools"]} if rec.get("tools") else {}
        ids = [int(i) for i in tok.encode_prompt(prompt, thinking=opened, **kw)]
        todo.append((line_no, rec, ids, reference))
    task_tokens = task_tokens or {}

    def task_of(k: int) -> str:
        return str(todo[k][1].get("task", "all"))

    # One task per batch (one reply budget), similar prompt lengths together (less padding).
    order = sorted(range(len(todo)), key=lambda k: (task_of(k), len(todo[k][2])))
    replies: dict[int, str] = {}
    for task, group in groupby(order, key=task_of):
        budget = min(cfg.max_new_tokens, task_tokens.get(task, cfg.max_new_tokens))
        task_cfg = replace(cfg, max_new_tokens=budget)
        ks = list(group)
        for start in range(0, len(ks), batch_size):
            chunk = ks[start : start + batch_size]
            outs = gen.generate([todo[k][2] for k in chunk], task_cfg)
            for k, g in zip(chunk, outs, strict=True):
                replies[k] = g.text
    rows = []
    for k, (line_no, rec, _, reference) in enumerate(todo):
        reasoning = is_reasoning(rec)
        key = str(rec["answer"])
        task = str(rec.get("task", "all"))
        opened = template == "chatml" and reasoning
        if task == "tool":
            ok = calls_tool_correctly(replies[k], key)
            scores: dict = {"exact": ok, "contains": ok}
        else:
            scores = score_reply(replies[k], key, reference, reasoning, template, opened)
        row = {
            "line": line_no,
            "task": task,
            "split": rec.get("split"),
            "answer": key,
            "prompt": split_prompt(rec)[0][-1]["content"],
            "reply": replies[k],
            "reasoning": reasoning,
            **scores,
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
    # Records may name the split they test (e.g. "unseen_family" vs "new_pairing" wordings):
    # generalisation is read per split, never only as the average over both.
    splits = {t: sorted({r["split"] for r in rows if r["task"] == t and r.get("split")})
              for t in tasks}  # fmt: skip
    return {
        "all": agg(rows),
        "by_task": {t: agg([r for r in rows if r["task"] == t]) for t in tasks},
        "by_split": {
            t: {s: agg([r for r in rows if r["task"] == t and r.get("split") == s]) for s in ss}
            for t, ss in splits.items()
            if ss
        },
    }


def evaluate(
    model,
    tok,
    paths: list[Path],
    cfg: SamplingConfig | None = None,
    seq_len: int | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    task_tokens: Mapping[str, int] | None = None,
) -> dict:
    """The whole evaluation as a dict (what `spongebob eval` prints and writes). Perplexity
    covers each whole file; `limit` caps the answer records generated for; `task_tokens` as in
    `answer_accuracy`."""
    cfg = cfg or SamplingConfig(max_new_tokens=256, temperature=0.0)
    seq_len = seq_len or min(model.config.max_seq_len - 1, 1024)
    result: dict[str, Any] = {"files": {}}
    for path in paths:
        t0 = time.perf_counter()
        records = list(read_records(Path(path), limit))
        entry: dict[str, Any] = {"perplexity": perplexity(model, tok, Path(path), seq_len)}
        if any("answer" in r and "conversations" in r for _, r in records):
            entry["answers"] = answer_accuracy(model, tok, records, cfg, batch_size, task_tokens)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        result["files"][str(path)] = entry
    return result


def format_table(result: dict) -> str:
    """A plain-text table: one line per file and, under it, one per task."""

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:5.1f}%"

    head = (
        f"{'file / task':<32} {'tokens':>8} {'ppl':>9} {'bpb':>6} {'n':>5} {'exact':>7} "
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
            + (f"{ppl['bpb']:>6.3f} " if ppl.get("bpb") is not None else f"{'—':>6} ")
            + (
                f"{s['n']:>5} {pct(s['exact']):>7} {pct(s['contains']):>8} "
                f"{pct(s['well_formed']):>7}"
                if s
                else f"{'':>5} {'—':>7} {'—':>8} {'—':>7}"
            )
        )
        if a and len(a["by_task"]) > 1:
            for task, t in a["by_task"].items():
                rows = [("  " + task, t)]
                rows += [(f"    {s}", v) for s, v in a.get("by_split", {}).get(task, {}).items()]
                for label, v in rows:
                    lines.append(
                        f"{label:<32} {'':>8} {'':>9} {'':>6} {v['n']:>5} "
                        f"{pct(v['exact']):>7} {pct(v['contains']):>8} "
                        f"{pct(v['well_formed']):>7}"
                    )
    return "\n".join(lines)


def _fmt_ppl(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 1e5 else f"{x:.2e}"


# --- command line --------------------------------------------------------------------------


def add_commands(sub) -> None:
    """`spongebob eval`."""
    from spongebob.chat import add_model_args, add_sampling_args

    p = sub.add_parser("eval", help="perplexity, answer accuracy and reasoning format")
    add_model_args(p)
    p.add_argument("--data", required=True, nargs="+", type=Path, metavar="FILE")
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="JSON results (default: eval.json in the checkpoint dir)",
    )
    p.add_argument(
        "--limit", type=int, metavar="N", help="generate for the first N answer records per file"
    )
    p.add_argument(
        "--seq-len",
        type=int,
        help="row length for perplexity, as in training (default: min(1024, model context))",
    )
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    add_sampling_args(p, greedy=True)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from spongebob import checkpoint
    from spongebob.chat import sampling_from_args

    for path in args.data:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such file")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--batch-size and --limit must be at least 1")
    cfg = sampling_from_args(args)
    loaded = checkpoint.load(args.ckpt, args.device, tokenizer=args.tokenizer, kernels=args.kernels)
    model, tok, meta = loaded.model, loaded.tokenizer, loaded.meta
    result = evaluate(model, tok, args.data, cfg, args.seq_len, args.limit, args.batch_size)
    result["ckpt"] = meta["path"]
    result["sampling"] = {k: v for k, v in vars(cfg).items() if k != "stop_ids"}
    print(format_table(result))
    out = args.out or Path(meta["path"]) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
    return 0
