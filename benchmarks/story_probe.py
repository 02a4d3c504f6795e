"""Which words of a word problem break a demo model? Greedy replies to fixed problems per story.

    python benchmarks/story_probe.py /tmp/r23/run/distill/final /tmp/r23/tokenizer

The scorecard gives one arithmetic number per stage over six held-out stories; a story that
fails in every run hides there. This asks a checkpoint the same 24 problems (two-digit numbers,
seeded) in each held-out story and in that story with one piece changed (its question, a
clause, the receiver), plus two stories recombined from training pieces as a control, and
counts the right answers and the replies whose first line copies both numbers and the operator
("这是加法：51 + 29。").
A piece whose removal moves the count is what the model reads wrongly (README: arithmetic
misses). Prints one JSON line per story; `--out` also writes them as a JSON list.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from spongebob import checkpoint, demo_data
from spongebob.generate import Generator, SamplingConfig
from spongebob.tokenizer import load


def _held(op: str, start: str) -> str:
    """The held-out Chinese story of `op` that starts with `start` (`demo_data.STORIES`)."""
    return next(t for t in demo_data.STORIES["zh"][op][1] if t.startswith(start))


BIRTHDAY, SHELF = _held("+", "{n}原本有"), _held("+", "书架上有")
SCHOOL, SHOP = _held("-", "{n}带了"), _held("-", "店里原有")
# (operator, label, story): held-out stories, one-piece edits of them, and two stories recombined
# from training pieces as a control.
STORIES = [
    ("+", "held-out: 原本有…过生日时又收到…现在一共有几", BIRTHDAY),
    ("+", "  asking 现在一共有多少", BIRTHDAY.replace("现在一共有几", "现在一共有多少")),
    ("+", "  without 过生日时", BIRTHDAY.replace("过生日时", "")),
    ("+", "held-out: 书架上有…又拿来", SHELF),
    ("-", "held-out: 带了…去学校，分给同学", SCHOOL),
    ("-", "  分给朋友 (a training receiver)", SCHOOL.replace("分给同学", "分给朋友")),
    ("-", "held-out: 店里原有…卖出", SHOP),
    ("+", "training pieces: …又找到…", "{n}有{a}{u}{i}，又找到{b}{u}，一共有多少{u}？"),
    ("-", "training pieces: …送给{m}…", "{n}有{a}{u}{i}，送给{m}{b}{u}，还剩多少{u}？"),
]
NAMES = ["小明", "小红", "妈妈", "爷爷", "小丽", "小刚"]
ITEMS = [("个", "苹果"), ("颗", "糖果"), ("本", "故事书"), ("个", "气球")]


def problems(n: int = 24, seed: int = 7) -> list[tuple]:
    """(a, b, name, other name, measure word, item), a > b, both two-digit."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = sorted(rng.sample(range(10, 100), 2), reverse=True)
        out.append((a, b, *rng.sample(NAMES, 2), *rng.choice(ITEMS)))
    return out


def probe(model, tok, batch_size: int = 12) -> list[dict]:
    gen = Generator(model, tok)
    cfg = SamplingConfig(max_new_tokens=160, temperature=0.0)
    probs = problems()
    rows = []
    for op, label, story in STORIES:
        prompts = [story.format(a=a, b=b, n=n, m=m, u=u, i=i) for a, b, n, m, u, i in probs]
        ids = [
            [int(x) for x in tok.encode_prompt([{"role": "user", "content": p}])] for p in prompts
        ]
        outs = []
        for start in range(0, len(ids), batch_size):
            outs += gen.generate(ids[start : start + batch_size], cfg)
        right = copied = 0
        for (a, b, *_), g in zip(probs, outs, strict=True):
            m = re.search(r"<answer>\s*(-?\d+)", g.text)
            right += bool(m and int(m[1]) == (a + b if op == "+" else a - b))
            copied += f"{a} {op} {b}" in g.text
        rows.append({"story": label, "n": len(probs), "right": right, "copied": copied})
        print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a demo checkpoint folder (e.g. run/distill/final)")
    ap.add_argument("tokenizer", help="the demo's tokenizer folder")
    ap.add_argument("--out", type=Path, help="also write the rows here as JSON")
    args = ap.parse_args()
    model = checkpoint.load(args.checkpoint, "cpu", kernels="torch").model
    rows = probe(model, load(args.tokenizer))
    if args.out:
        args.out.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
