"""Reward functions for GRPO: built-ins, a user's own, and scoring a batch of completions.

A reward function scores one completion (the decoded reply, without the prompt):

    def my_reward(completion: str, *, prompt: list[dict], answer: str | None, record: dict) -> float

Keyword arguments it does not declare are not passed (a function may take only
`completion`, or `completion` and `answer`, or `**kwargs` for all of them): `prompt` is the
conversation the completion answers, `answer` the record's optional reference answer (a
string), `record` the whole jsonl object.

Built-ins (`REWARDS`):

* `arithmetic` — 1.0 when the text inside the first `<answer>…</answer>` equals the reference
  answer, both whitespace-stripped, or, for an integer reference, holds that integer as its
  only number among words ("27 希望这个回答对你有帮助！": a closing line DPO taught must not
  zero the reward; two numbers score 0, so listing candidates earns nothing); else 0.0 (no
  answer block, or another answer). A record without an `"answer"` is an error: this reward
  has nothing to compare with.
* `format` — 1.0 for a well-formed `<think>…</think><answer>…</answer>` reply, each tag once
  (`spongebob.generate.parse_reasoning`), else 0.0.

`load_reward("arithmetic")` gives a built-in; `load_reward("package.module:function")` or
`load_reward("path/to/file.py:function")` imports a user's function, with a clear error when
the module, the file or the function is missing or not callable.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from spongebob.data import REASONING_TAGS
from spongebob.errors import UserError
from spongebob.generate import parse_reasoning

RewardFn = Callable[..., float]

_INTEGER = re.compile(r"-?\d+")
_ANSWER = re.compile(rf"{re.escape(REASONING_TAGS[2])}(.*?){re.escape(REASONING_TAGS[3])}", re.S)


def arithmetic(completion: str, answer: str | None = None, **_: Any) -> float:
    """1.0 when the first `<answer>…</answer>` block states `answer` (module docstring)."""
    if answer is None:
        raise ValueError('the arithmetic reward needs a reference "answer" in the prompt record')
    m = _ANSWER.search(completion)
    if m is None:
        return 0.0
    got, ref = m.group(1).strip(), str(answer).strip()
    if got == ref:
        return 1.0
    numbers = _INTEGER.findall(got)
    return 1.0 if _INTEGER.fullmatch(ref) and numbers == [ref] else 0.0


def format_reward(completion: str, **_: Any) -> float:
    """1.0 for a well-formed `<think>…</think><answer>…</answer>` reply, else 0.0."""
    return 1.0 if parse_reasoning(completion).well_formed else 0.0


REWARDS: dict[str, RewardFn] = {"arithmetic": arithmetic, "format": format_reward}


def _import(module: str, spec: str):
    if module.endswith(".py") or "/" in module or "\\" in module:
        path = Path(module)
        if not path.is_file():
            raise UserError(f"reward {spec!r}: no such file {path}")
        name = f"_spongebob_reward_{path.stem}"
        loader = importlib.util.spec_from_file_location(name, path)
        if loader is None or loader.loader is None:
            raise UserError(f"reward {spec!r}: cannot load {path} as a Python module")
        mod = importlib.util.module_from_spec(loader)
        sys.modules[name] = mod
        try:
            loader.loader.exec_module(mod)
        except Exception as e:
            del sys.modules[name]
            raise UserError(f"reward {spec!r}: importing {path} failed: {e!r}") from e
        return mod
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise UserError(f"reward {spec!r}: no module named {e.name!r}") from None
        raise UserError(f"reward {spec!r}: importing {module!r} failed: {e!r}") from e
    except Exception as e:
        raise UserError(f"reward {spec!r}: importing {module!r} failed: {e!r}") from e


def load_reward(spec: str) -> RewardFn:
    """A built-in by name (`arithmetic`, `format`), or `module:function` / `file.py:function`."""
    if spec in REWARDS:
        return REWARDS[spec]
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name:
        raise UserError(
            f"unknown reward {spec!r}: use a built-in ({', '.join(REWARDS)}) or "
            "'module:function' / 'path/to/file.py:function'"
        )
    mod = _import(module, spec)
    if not hasattr(mod, name):
        raise UserError(f"reward {spec!r}: module {module!r} has no attribute {name!r}")
    fn = getattr(mod, name)
    if not callable(fn):
        raise UserError(f"reward {spec!r}: {name!r} is a {type(fn).__name__}, not a function")
    return fn


def reward_name(fn: RewardFn) -> str:
    for name, builtin in REWARDS.items():
        if fn is builtin:
            return name
    return getattr(fn, "__name__", type(fn).__name__)


def _kwargs_for(fn: RewardFn, available: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments `fn` declares (all of them for a `**kwargs` function)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: try everything
        return available
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return available
    names = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }
    return {k: v for k, v in available.items() if k in names}


def score(
    fns: Sequence[RewardFn],
    completions: Sequence[str],
    prompts: Sequence[Any],
    answers: Sequence[str | None] | None = None,
    records: Sequence[dict] | None = None,
    sources: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
):
    """(total [N], per function [N, K]) fp32 rewards of N completions; row i answers
    `prompts[i]` (repeat each prompt G times for G completions). total = Σₖ weightₖ·rewardₖ
    (weights default to 1). A function that raises, or returns anything but a finite number,
    is a `UserError` naming the function and the record (`sources[i]`, its `file:line`)."""
    import torch

    n = len(completions)
    if weights is None:
        weights = [1.0] * len(fns)
    if len(weights) != len(fns):
        raise UserError(f"{len(weights)} reward weights for {len(fns)} reward functions")
    for name, seq in (("prompts", prompts), ("answers", answers), ("records", records)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"score: {len(seq)} {name} for {n} completions")
    per_fn = torch.zeros(n, len(fns), dtype=torch.float32)
    for k, fn in enumerate(fns):
        for i in range(n):
            available = {
                "prompt": prompts[i],
                "answer": None if answers is None else answers[i],
                "record": None if records is None else records[i],
            }
            where = f" ({sources[i]})" if sources is not None else ""
            try:
                value = fn(completions[i], **_kwargs_for(fn, available))
            except Exception as e:
                raise UserError(f"reward {reward_name(fn)!r} failed{where}: {e}") from e
            if torch.is_tensor(value) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise UserError(
                    f"reward {reward_name(fn)!r} returned {type(value).__name__} {value!r}{where}; "
                    "a reward function returns a number"
                )
            if not math.isfinite(float(value)):
                raise UserError(f"reward {reward_name(fn)!r} returned {value}{where}")
            per_fn[i, k] = float(value)
    total = per_fn @ torch.tensor([float(w) for w in weights], dtype=torch.float32)
    return total, per_fn
