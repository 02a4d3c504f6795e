"""Text generation: KV cache, batched prompts, sampling, and UTF-8-safe streaming.

Why its own engine: the tutorial recomputes attention over the whole sequence for every new
token, allocates full-size masks, and applies a repetition penalty that *rewards* repeated
tokens whose logit is negative (dividing −2 by 1.3 raises it). Here

* a prompt is run once and every later step feeds one token per row through a preallocated
  `KVCache` (O(T) per token instead of O(T²));
* prompts of different lengths are left-padded into one batch: padding keys are masked out and
  `position_ids` count only real tokens, so a padded row gives the same tokens as alone;
* the repetition penalty divides positive logits and multiplies negative ones (CTRL), so a seen
  token always becomes *less* likely;
* streamed text is decoded incrementally and held back while it ends in an incomplete UTF-8
  sequence (byte-level BPE splits a Chinese character or an emoji over several tokens), so a
  terminal never shows half a character.

Models come from `spongebob.checkpoint.load`, the one loader of weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from collections.abc import Generator as Generator_
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spongebob.data import REASONING_TAGS
from spongebob.errors import UserError

if TYPE_CHECKING:
    import torch

    from spongebob.data import ChatTokenizer

REPLACEMENT = "\ufffd"


# --- sampling ------------------------------------------------------------------------------


@dataclass
class SamplingConfig:
    """How to pick each next token. temperature 0 (or top_k 1) is greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.85
    top_p: float = 0.85
    top_k: int = 0  # 0 = no top-k filter
    repetition_penalty: float = 1.0  # 1 = off; > 1 makes seen tokens less likely
    seed: int | None = None
    stop_ids: Sequence[int] | None = None  # default: the tokenizer's stop_ids (its family's)

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max new tokens must be at least 1, not {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top-k must be >= 0, not {self.top_k}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition penalty must be > 0, not {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Make every seen token less likely: positive logits are divided by `penalty`, negative
    ones multiplied (dividing a negative logit, as MiniMind does, would raise it).

    logits float [B, V]; seen bool [B, V]. Returns a new tensor.
    """
    import torch

    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to −inf every token outside the top-k and outside the smallest set whose
    probability reaches top-p (the most likely token always survives)."""
    import torch

    out = logits
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def top_candidates(
    probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens sampling may pick and their weights (unnormalised), without sorting the
    vocabulary: `(weights [B, K], ids [B, K])`, most likely first, or `(probs, None)` when every
    token may be picked. The same set and weights as `filter_logits` (the reference; a test
    checks them equal), up to the order of exactly tied probabilities.

    Top-p takes the k most likely tokens (k = 64, ×4 until every row's top-k mass reaches
    top-p) and keeps those whose more likely tokens hold less than top-p; top-k, as in
    `filter_logits`, comes first and renormalises before top-p."""
    import torch

    V = probs.shape[-1]
    cap = top_k if 0 < top_k < V else V
    if top_p >= 1.0 and cap == V:
        return probs, None
    k = cap if (top_k or top_p >= 1.0) else min(64, V)
    while True:
        vals, ids = torch.topk(probs, k, dim=-1)  # sorted, most likely first
        if top_k:
            vals = vals / vals.sum(-1, keepdim=True)
        cum = vals.cumsum(-1)
        if top_p >= 1.0 or k == cap or bool((cum[:, -1] >= top_p).all()):
            break
        k = min(4 * k, cap)
    if top_p < 1.0:
        vals = vals.masked_fill(cum - vals >= top_p, 0.0)  # the first always stays
    return vals, ids


def next_tokens(
    logits: torch.Tensor,
    cfg: SamplingConfig,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from logits [B, V]: penalty, then greedy or temperature/top-k/top-p.

    Sampling draws by inverse CDF over `top_candidates`: one uniform number per row, found in
    the running sum of the weights. That is the distribution `torch.multinomial` draws from
    after `filter_logits`, without the full-vocabulary sort and multinomial's per-token
    exponential draws, which took most of a small model's decoding step."""
    import torch

    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    weights, ids = top_candidates(probs, cfg.top_k, cfg.top_p)
    cum = weights.cumsum(-1)
    u = torch.rand(cum.shape[0], 1, generator=generator, device=cum.device) * cum[:, -1:]
    j = torch.searchsorted(cum, u, right=True).clamp_max(cum.shape[-1] - 1)
    # Rounding can put u on the very end of the sum; never return a token of weight 0.
    j = torch.where(weights.gather(-1, j) > 0, j, weights.argmax(-1, keepdim=True))
    return (j if ids is None else ids.gather(-1, j)).squeeze(-1)


# --- streaming decode ----------------------------------------------------------------------


class StreamDecoder:
    """Turns token ids into text pieces, never one that ends inside a UTF-8 character.

    Byte-level BPE decodes an incomplete byte sequence to U+FFFD. We decode the tokens since
    the last emitted boundary and only emit once the text no longer ends in U+FFFD; the ids
    then become the new boundary. `flush` returns whatever is left at the end.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already emitted
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self.decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        text = self.decode(self.ids[self.prefix :])
        if len(text) > len(done) and not text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done) :]
        return ""

    def flush(self) -> str:
        done = self.decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        text = self.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(done) :]


# --- the engine ----------------------------------------------------------------------------


@dataclass
class Generation:
    """The new tokens of one prompt (without the stop token) and why it ended."""

    ids: list[int]
    finish: str  # "stop" (a stop token) | "length" (max_new_tokens) | "interrupted"
    text: str = ""
    prompt_len: int = 0
    stop_id: int | None = None  # the stop token that ended it (chatml has two)


class Generator:
    """Batched incremental decoding with a KV cache for a `SpongeBob` model."""

    def __init__(self, model: torch.nn.Module, tokenizer: ChatTokenizer | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _stop_ids(self, cfg: SamplingConfig) -> list[int]:
        if cfg.stop_ids is not None:
            return list(cfg.stop_ids)
        if self.tokenizer is None:
            return [2]
        return [int(i) for i in self.tokenizer.stop_ids]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Generation]:
        """Continue every prompt; returns one `Generation` per prompt, in order."""
        steps = self.iter_tokens(prompts, cfg, should_stop)
        while True:
            try:
                next(steps)
            except StopIteration as fin:
                return fin.value

    def iter_tokens(
        self,
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Generator_[tuple[int, int], None, list[Generation]]:
        """Yield `(row, token id)` as each new token is chosen; return the `Generation`s.

        Prompts are left-padded into one batch. Rows that hit a stop token are done; the batch
        runs until all are, or `max_new_tokens`, or `should_stop()`. A prompt longer than the
        model's context minus `max_new_tokens` keeps its last tokens.
        """
        import torch

        from spongebob.model import KVCache, SpongeBob

        cfg = cfg or SamplingConfig()
        cfg.check()
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise UserError("empty prompt: nothing to continue")
        vocab = self.config.vocab_size
        for p in prompts:
            bad = [int(t) for t in p if not 0 <= int(t) < vocab]
            if bad:
                raise UserError(f"token id {bad[0]} is outside the model's vocab of {vocab}")
        limit = self.config.max_seq_len
        max_new = min(cfg.max_new_tokens, limit - 1)
        prompts = [[int(t) for t in p][-(limit - max_new) :] for p in prompts]
        B, L = len(prompts), max(len(p) for p in prompts)
        dev = self.device
        stops = torch.tensor(self._stop_ids(cfg), device=dev)
        penalize = cfg.repetition_penalty != 1.0

        ids = torch.zeros(B, L, dtype=torch.long, device=dev)  # pad id 0 (<unk>)
        valid = torch.zeros(B, L + max_new, dtype=torch.bool, device=dev)
        seen = torch.zeros(B, vocab, dtype=torch.bool, device=dev) if penalize else None
        for i, p in enumerate(prompts):
            row = torch.tensor(p, device=dev)
            ids[i, L - len(p) :] = row
            valid[i, L - len(p) :] = True  # generated positions are set as they come
            if seen is not None:
                seen[i, row] = True
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        gen = None
        if cfg.seed is not None and not cfg.greedy:
            gen = torch.Generator(device=dev)
            gen.manual_seed(cfg.seed)

        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.config, B, L + max_new, device=dev, dtype=dtype)
        padded = bool((lengths < L).any())
        # Positions count real tokens only, so a left-padded row sees the positions it would
        # see alone; padding keys are masked out.
        pos = (valid[:, :L].long().cumsum(1) - 1).clamp_min(0)
        mask = valid[:, None, None, :L].expand(B, 1, L, L) if padded else None
        out: list[list[int]] = [[] for _ in range(B)]
        finish = ["length"] * B
        stop_at: list[int | None] = [None] * B
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        with torch.inference_mode():
            if isinstance(self.model, SpongeBob):  # the output layer at the last position only
                last = torch.zeros(B, L, dtype=torch.bool, device=dev)
                last[:, -1] = True
                kw = {"logits_mask": last}
                logits = self.model(ids, position_ids=pos, kv_cache=cache, attn_mask=mask, **kw)
            else:
                logits = self.model(ids, position_ids=pos, kv_cache=cache, attn_mask=mask)[:, -1]
        next_pos = lengths.clone()
        for step in range(max_new):
            tok = next_tokens(logits, cfg, seen, gen)
            hit = torch.isin(tok, stops) & ~done
            tok_list, hit_list, done_list = tok.tolist(), hit.tolist(), done.tolist()
            for i in range(B):
                if done_list[i]:
                    continue
                if hit_list[i]:
                    finish[i], stop_at[i] = "stop", tok_list[i]
                    continue
                out[i].append(tok_list[i])
                yield i, tok_list[i]
            done |= hit
            if bool(done.all()) or step == max_new - 1:
                break
            if should_stop is not None and should_stop():
                finish = ["interrupted" if f == "length" else f for f in finish]
                break
            if seen is not None:
                seen[torch.arange(B, device=dev), tok] = True
            valid[:, L + step] = True
            step_mask = valid[:, None, None, : L + step + 1] if padded else None
            with torch.inference_mode():
                logits = self.model(
                    tok[:, None],
                    position_ids=next_pos[:, None],
                    kv_cache=cache,
                    attn_mask=step_mask,
                )[:, -1]
            next_pos += 1
        results = []
        for i in range(B):
            text = self.tokenizer.decode(out[i]) if self.tokenizer is not None else ""
            results.append(Generation(out[i], finish[i], text, len(prompts[i]), stop_at[i]))
        return results

    def stream(
        self,
        prompt: Sequence[int],
        cfg: SamplingConfig | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Generator_[str, None, Generation]:
        """Yield the continuation of one prompt as text pieces, each ending on a whole
        character; return the `Generation`."""
        if self.tokenizer is None:
            raise ValueError("streaming needs a tokenizer")
        decoder = StreamDecoder(self.tokenizer.decode)
        steps = self.iter_tokens([prompt], cfg, should_stop)
        while True:
            try:
                _, tid = next(steps)
            except StopIteration as fin:
                result = fin.value[0]
                break
            piece = decoder.push(tid)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail
        return result


# --- reasoning replies ---------------------------------------------------------------------

TAGS = REASONING_TAGS  # <think> </think> <answer> </answer>, defined by the Rust side
_THINK, _END_THINK, _ANSWER, _END_ANSWER = (re.escape(t) for t in TAGS)
_WELL_FORMED = re.compile(
    rf"\A\s*{_THINK}(?P<think>.*?){_END_THINK}\s*{_ANSWER}(?P<answer>.*?){_END_ANSWER}\s*\Z", re.S
)


@dataclass
class Reasoning:
    """A reply split into its thinking and its answer. `well_formed`: exactly
    `<think>…</think><answer>…</answer>` (whitespace around the blocks allowed), each tag once
    (minimind2), or one `</think>` block without answer tags, `<think>` at most once before it
    (chatml: `<think>\n…\n</think>\n\nanswer`, the `<think>` possibly in the prompt)."""

    think: str
    answer: str
    well_formed: bool


def parse_reasoning(text: str, template: str = "minimind2", opened: bool = False) -> Reasoning:
    """Split a reasoning reply; a malformed one keeps whatever parts can be found. `opened`:
    the prompt itself ended in `<think>` (chatml with thinking on), so the reply starts inside
    the reasoning block (an unfinished one is all thinking, not all answer).

    `template` is the family the reply was generated under (`ChatTokenizer.template`):
    "minimind2" replies read `<think>…</think><answer>…</answer>`; "chatml" replies
    `<think>\n…\n</think>\n\nanswer`, where the `<think>` may be missing (it ends the prompt
    when thinking is on): the thinking is what comes before the one `</think>`, the answer what
    follows it, well formed when `</think>` occurs once, `<think>` at most once and only at
    the start, and no answer tag is used."""
    if opened:
        text = TAGS[0] + text
    if template == "chatml":
        return _parse_chatml_reasoning(text)
    if template != "minimind2":
        raise ValueError(f"unknown template {template!r}")
    m = _WELL_FORMED.match(text)
    once = all(text.count(t) == 1 for t in TAGS)
    if m and once:
        return Reasoning(m["think"].strip(), m["answer"].strip(), True)
    think = re.search(rf"{_THINK}(.*?)(?:{_END_THINK}|\Z)", text, re.S)
    answer = re.search(rf"{_ANSWER}(.*?)(?:{_END_ANSWER}|\Z)", text, re.S)
    if answer:
        ans = answer.group(1)
    elif TAGS[1] in text:
        ans = text.split(TAGS[1], 1)[1]
    else:
        ans = "" if think else text
    return Reasoning(think.group(1).strip() if think else "", ans.strip(), False)


def _parse_chatml_reasoning(text: str) -> Reasoning:
    think_tag, end_tag = TAGS[0], TAGS[1]
    no_answer_tags = TAGS[2] not in text and TAGS[3] not in text
    if end_tag not in text:
        # Unfinished thinking (`<think>` without its end) is all thinking; else all answer.
        if think_tag in text:
            lead, think = text.split(think_tag, 1)
            return Reasoning(think.strip(), lead.strip(), False)
        return Reasoning("", text.strip(), False)
    head, answer = text.split(end_tag, 1)
    opened = head.count(think_tag)
    lead, _, think = head.rpartition(think_tag) if opened else ("", "", head)
    well = (
        opened <= 1
        and not lead.strip()
        and end_tag not in answer
        and think_tag not in answer
        and no_answer_tags
    )
    return Reasoning(think.strip(), answer.strip(), well)


# --- tool calls ----------------------------------------------------------------------------

TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
_TOOL_CALL_BLOCK = re.compile(
    rf"{re.escape(TOOL_CALL)}(.*?)(?:{re.escape(END_TOOL_CALL)}|\Z)", re.S
)


class ToolCallError(UserError):
    """A generated `<tool_call>` block that is not `{"name": str, "arguments": {...}}` JSON."""


@dataclass
class ToolCall:
    """One call the model asked for: the function's name and its arguments."""

    name: str
    arguments: dict


def parse_tool_call(block: str) -> ToolCall:
    """The JSON inside one `<tool_call>…</tool_call>` block (the tags themselves optional), as
    the chatml template writes it: `{"name": ..., "arguments": {...}}`. Arguments given as a
    string of a JSON object are read too. Raises `ToolCallError` naming what is wrong."""
    body = block.strip()
    if body.startswith(TOOL_CALL):
        body = body[len(TOOL_CALL) :]
    if body.endswith(END_TOOL_CALL):
        body = body[: -len(END_TOOL_CALL)]
    body = body.strip()
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise ToolCallError(f"tool call is not valid JSON ({e}): {body[:200]!r}") from None
    if not isinstance(obj, dict):
        raise ToolCallError(f"tool call must be a JSON object, not {type(obj).__name__}")
    if isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ToolCallError(f"tool call has no function name: {body[:200]!r}")
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as e:
            raise ToolCallError(f"tool call {name!r}: arguments are not valid JSON ({e})") from None
    if not isinstance(args, dict):
        raise ToolCallError(f"tool call {name!r}: arguments must be a JSON object")
    return ToolCall(name, args)


@dataclass
class ToolCalls:
    """A reply split into its text (the tool-call blocks removed, stripped) and its calls."""

    content: str
    calls: list[ToolCall]


def parse_tool_calls(text: str) -> ToolCalls:
    """Every `<tool_call>…</tool_call>` block of a generated reply, in order (an unclosed last
    block runs to the end of the text). Raises `ToolCallError` for a block that is not a call."""
    calls = [parse_tool_call(m.group(1)) for m in _TOOL_CALL_BLOCK.finditer(text)]
    content = _TOOL_CALL_BLOCK.sub("", text).strip()
    return ToolCalls(content, calls)


def find_tool_calls(text: str) -> ToolCalls | None:
    """The calls of a generated reply, or None when it makes none or one of its blocks is not
    a valid call: then the reply stands as the model's text (how chat, serve and eval treat a
    malformed call; it is the model's output, not a user's error)."""
    try:
        parsed = parse_tool_calls(text)
    except ToolCallError:
        return None
    return parsed if parsed.calls else None
