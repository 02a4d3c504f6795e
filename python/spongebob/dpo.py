"""Direct Preference Optimization: preference pairs, sequence log-probs, the DPO loss.

Building blocks for `spongebob train dpo`, made to plug into `step.optimizer_step`
(`loss_fn=DPOLoss(beta)`, `count_fn=count_pairs`):

* **Data.** MiniMind's `dpo.jsonl` as is: `{"chosen": [messages], "rejected": [messages]}`,
  the same prompt (every message but the last) on both sides, each side ending in its
  assistant reply. Each side is encoded by the Rust `ChatTokenizer.encode_conversation`; its
  weights > 0 mark the trained tokens by construction (contracts.md §2: assistant content and
  its `</s>`). Only the final reply is scored: the last run of trained tokens, which is that
  reply's content plus its `</s>` (an earlier assistant turn belongs to the prompt, as in TRL,
  and would cancel out of the loss anyway). `PairReader` streams files with the bad-line
  rules of contracts.md §1 plus three of its own (`BAD_PAIR_REASONS`).
* **Rows.** `collate_pairs` right-pads the chosen rows, then the rejected rows (TRL's layout),
  into `input_ids` / `labels` (−100 where untrained), the loader's convention
  `labels[t] = token t+1`.
* **Log-probs.** `sequence_logps` is the per-sequence *sum* of the trained tokens' log-probs,
  in fp32, through the model's `forward` (so DDP syncs the gradients).
* **Loss.** `dpo_loss` = Σ −log σ(β·[(π_c − ref_c) − (π_r − ref_r)]) / `num_pairs`, TRL's
  `loss_type="sigmoid"`; `num_pairs` defaults to this batch's pairs, and is the pairs of the
  whole optimizer step (all micro-batches, all ranks) when called from the step, like Σ mᵢ
  for the LM loss. Metrics as TRL logs them: rewards β·(π − ref), margin, accuracy, log-probs.
* **Reference.** `precompute_reference` runs the frozen reference model once (`no_grad`,
  eval mode) and stores each pair's two log-probs; `ReferenceCache` keeps them on disk, keyed
  by the pair's tokens and the reference model's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from spongebob.errors import UserError
from spongebob.model import SpongeBob

IGNORE = -100
ROLES = ("system", "user", "assistant")
ON_BAD_LINE = ("error", "skip")

# contracts.md §1 reasons, in their check order, then the pair's own.
BAD_PAIR_REASONS = (
    "invalid_utf8",
    "invalid_json",
    "bad_schema",
    "unknown_role",
    "empty_conversation",
    "no_assistant",
    "prompt_mismatch",  # chosen and rejected do not share the prompt
    "identical_pair",  # chosen and rejected are the same (within max_len)
    "no_trained_token",  # a side has no trained token left (within max_len)
    "empty_file",
)


# --- jsonl records (shared with spongebob.grpo) ------------------------------------------------


class BadRecord(UserError):
    """A bad line of a jsonl file: `file:line: reason` (`file: reason` for the whole file)."""

    def __init__(self, path: Path | str, line: int, reason: str, message: str) -> None:
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{path}:{line}" if line else f"{path}"
        super().__init__(f"{where}: {message}")


class _Bad(Exception):
    """Raised by a record check: a reason code and its message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def _lone_surrogate(obj: Any) -> str | None:
    """The first lone surrogate in any string of a parsed JSON value (json.loads lets
    `"\\ud800"` through; UTF-8 and the Rust side cannot hold it)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"\\u{ord(obj[e.start]):04x}"
        return None
    if isinstance(obj, dict):
        items: Iterable = [*obj.keys(), *obj.values()]
    elif isinstance(obj, list):
        items = obj
    else:
        return None
    for x in items:
        found = _lone_surrogate(x)
        if found:
            return found
    return None


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or `_Bad`) for every non-blank line, streamed, with the
    contracts.md §1 rules: a leading BOM is skipped, `\\r\\n` ends a line, blank lines are no
    records, a file without a record is bad as a whole (a `_Bad` at line 0)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    records = 0
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            records += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, _Bad("invalid_utf8", "invalid UTF-8")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, _Bad("invalid_json", f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            lone = _lone_surrogate(obj)
            if lone:
                yield line_no, _Bad("invalid_json", f"invalid JSON: lone surrogate escape {lone}")
                continue
            yield line_no, obj
    if records == 0:
        yield 0, _Bad("empty_file", "empty file (no records)")


def check_messages(sides: Sequence[tuple[str, Any]]) -> dict[str, list[dict[str, str]]]:
    """Message lists (`[{"role", "content"}, ...]`) under the given keys, checked in the
    contracts.md §1 order over all of them: schema, then roles, then empty. Returns plain
    `{"role", "content"}` dicts by key."""
    out: dict[str, list[dict[str, str]]] = {}
    for key, value in sides:
        if not isinstance(value, list):
            raise _Bad("bad_schema", f'bad record: "{key}" must be a list of messages')
        msgs = []
        for i, m in enumerate(value):
            if not isinstance(m, dict):
                raise _Bad("bad_schema", f'bad record: "{key}"[{i}] is not an object')
            for field in ("role", "content"):
                if not isinstance(m.get(field), str):
                    raise _Bad("bad_schema", f'bad record: "{key}"[{i}] needs a string "{field}"')
            msgs.append({"role": m["role"], "content": m["content"]})
        out[key] = msgs
    for key, msgs in out.items():
        for m in msgs:
            if m["role"] not in ROLES:
                raise _Bad(
                    "unknown_role",
                    f'unknown role {m["role"]!r} in "{key}" '
                    '(expected "system", "user" or "assistant")',
                )
    for key, msgs in out.items():
        if not msgs:
            raise _Bad("empty_conversation", f'empty conversation in "{key}"')
    return out


class RecordReader:
    """Shared skeleton of the pair and prompt readers: the files in order, the bad-line
    policy, the counts. Subclasses define `_record(obj) -> item` (raising `_Bad`)."""

    reasons: tuple[str, ...] = ()

    def __init__(self, paths: Sequence[str | os.PathLike] | str | os.PathLike, on_bad_line: str):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if on_bad_line not in ON_BAD_LINE:
            raise UserError(f"on_bad_line must be 'error' or 'skip', not {on_bad_line!r}")
        self.paths = [Path(p) for p in paths]
        self.on_bad_line = on_bad_line
        self.records = 0
        self.skipped: Counter[str] = Counter()

    def _record(self, obj: Any, source: str) -> Any:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        """The good records of every file, in order; counts restart with each pass."""
        self.records, self.skipped = 0, Counter()
        for path in self.paths:
            for line_no, obj in json_lines(path):
                try:
                    if isinstance(obj, _Bad):
                        raise obj
                    item = self._record(obj, f"{path}:{line_no}")
                except _Bad as bad:
                    if self.on_bad_line == "error":
                        raise BadRecord(path, line_no, bad.reason, bad.message) from None
                    self.skipped[bad.reason] += 1
                    continue
                self.records += 1
                yield item

    def stats(self) -> dict[str, Any]:
        """Records read and bad lines skipped by reason (every reason, 0 included)."""
        return {"records": self.records, "skipped": {r: self.skipped[r] for r in self.reasons}}


# --- preference pairs ------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferencePair:
    """One encoded pair. Each side: the ids of prompt + reply (`int64`) and which tokens are
    trained (`bool`, token-aligned: `mask[i]` is the class of predicting token i). The
    reference log-probs are filled in by `precompute_reference`."""

    chosen_ids: np.ndarray
    chosen_mask: np.ndarray
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray
    source: str = ""
    truncated: bool = False
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None


def _last_run(weights: np.ndarray) -> np.ndarray:
    """The last maximal run of weights > 0: the final assistant turn's content and `</s>`
    (contracts.md §2: an assistant turn is trained without a gap; turns are separated by the
    untrained `\\n` and header)."""
    trained = weights > 0
    mask = np.zeros(len(weights), dtype=bool)
    idx = np.flatnonzero(trained)
    if len(idx) == 0:
        return mask
    end = idx[-1]
    start = end
    while start > 0 and trained[start - 1]:
        start -= 1
    mask[start : end + 1] = True
    return mask


def encode_pair(
    tokenizer, chosen: Any, rejected: Any, max_len: int | None = None, source: str = ""
) -> PreferencePair:
    """Check and encode one pair (raises `_Bad` with the reason). `max_len` keeps the first
    `max_len` tokens of each side (prompt + reply), as the chat loader truncates."""
    sides = check_messages([("chosen", chosen), ("rejected", rejected)])
    for key, msgs in sides.items():
        if not any(m["role"] == "assistant" for m in msgs):
            raise _Bad("no_assistant", f'"{key}" has no assistant turn')
    for key, msgs in sides.items():
        if msgs[-1]["role"] != "assistant":
            raise _Bad("no_assistant", f'"{key}" does not end with an assistant reply')
    if sides["chosen"][:-1] != sides["rejected"][:-1]:
        raise _Bad("prompt_mismatch", "chosen and rejected have different prompts")
    if sides["chosen"] == sides["rejected"]:
        raise _Bad("identical_pair", "chosen and rejected are identical")
    encoded, truncated = {}, False
    for key, msgs in sides.items():
        ids, weights = tokenizer.encode_conversation(msgs)
        ids, mask = np.asarray(ids, dtype=np.int64), _last_run(np.asarray(weights))
        if max_len is not None and len(ids) > max_len:
            ids, mask, truncated = ids[:max_len], mask[:max_len], True
        if not mask.any():
            raise _Bad(
                "no_trained_token",
                f'"{key}" has no trained token within max_len {max_len}'
                if max_len is not None
                else f'"{key}" has no trained token',
            )
        encoded[key] = (ids, mask)
    (ci, cm), (ri, rm) = encoded["chosen"], encoded["rejected"]
    if np.array_equal(ci, ri) and np.array_equal(cm, rm):
        raise _Bad("identical_pair", f"chosen and rejected are identical within max_len {max_len}")
    return PreferencePair(ci, cm, ri, rm, source=source, truncated=truncated)


class PairReader(RecordReader):
    """Streams the preference pairs of jsonl files, encoded (see the module docstring).

    A bad line is a `BadRecord` naming `file:line` and the reason; with `on_bad_line="skip"`
    it is skipped and counted in `skipped` by reason (`BAD_PAIR_REASONS`). `truncated` counts
    the pairs with a side longer than `max_len`. Iterating again reads the files again."""

    reasons = BAD_PAIR_REASONS

    def __init__(
        self,
        paths: Sequence[str | os.PathLike] | str | os.PathLike,
        tokenizer,
        max_len: int | None = None,
        on_bad_line: str = "error",
    ) -> None:
        super().__init__(paths, on_bad_line)
        if max_len is not None and max_len < 2:
            raise UserError(f"max_len must be at least 2 tokens, not {max_len}")
        if not hasattr(tokenizer, "encode_conversation"):
            from spongebob.data import ChatTokenizer

            tokenizer = ChatTokenizer.from_dir(str(tokenizer))
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.truncated = 0

    def __iter__(self) -> Iterator[PreferencePair]:
        self.truncated = 0
        yield from super().__iter__()

    def _record(self, obj: Any, source: str) -> PreferencePair:
        if not isinstance(obj, dict):
            raise _Bad("bad_schema", "bad record: expected a JSON object")
        for key in ("chosen", "rejected"):
            if key not in obj:
                raise _Bad("bad_schema", f'bad record: missing key "{key}"')
        pair = encode_pair(self.tokenizer, obj["chosen"], obj["rejected"], self.max_len, source)
        self.truncated += pair.truncated
        return pair

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "truncated": self.truncated}


def _rows(
    seqs: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int, pad_to_multiple_of: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids`, `labels` [N, T] of (ids, token-aligned mask) sequences:
    `input_ids[t] = ids[t]`, `labels[t] = ids[t+1]` where token t+1 is trained, else −100."""
    T = max(len(ids) for ids, _ in seqs) - 1
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for i, (ids, mask) in enumerate(seqs):
        ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        mask_t = torch.as_tensor(np.asarray(mask, dtype=bool))
        n = len(ids_t) - 1
        input_ids[i, :n] = ids_t[:-1]
        labels[i, :n] = torch.where(mask_t[1:], ids_t[1:], IGNORE)
    return input_ids, labels


def collate_pairs(
    pairs: Sequence[PreferencePair], pad_id: int = 0, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """A batch of P pairs: `input_ids`, `labels` [2P, T], the P chosen rows first, then the P
    rejected rows in the same order; `ref_chosen_logps`, `ref_rejected_logps` [P] (fp32) when
    every pair has its reference log-probs. Every value is a tensor (the step moves them)."""
    if not pairs:
        raise ValueError("collate_pairs: no pairs")
    seqs = [(p.chosen_ids, p.chosen_mask) for p in pairs]
    seqs += [(p.rejected_ids, p.rejected_mask) for p in pairs]
    input_ids, labels = _rows(seqs, pad_id, pad_to_multiple_of)
    batch = {"input_ids": input_ids, "labels": labels}
    if all(p.ref_chosen_logp is not None and p.ref_rejected_logp is not None for p in pairs):
        batch["ref_chosen_logps"] = torch.tensor([p.ref_chosen_logp for p in pairs])
        batch["ref_rejected_logps"] = torch.tensor([p.ref_rejected_logp for p in pairs])
    return batch


# --- log-probs and the loss ------------------------------------------------------------------


def token_logps(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor):
    """fp32 [B, T]: log p(labels[t] | input_ids[: t+1]) where `labels != -100`, else 0.

    Right-padded rows need no attention mask (causal attention never looks ahead). Goes
    through `model(...)` so DDP hooks run. A SpongeBob computes logits at the trained
    positions only (`logits_mask`; most of a pair is prompt and padding, and the output layer
    dominates a small model's cost); a `transformers` model's full `.logits` are used.
    log p = logit[label] − logsumexp(logits), in fp32."""
    trained = labels != IGNORE
    inner = getattr(model, "module", model)  # DDP wraps the model
    inner = getattr(inner, "_orig_mod", inner)  # and so does torch.compile
    if isinstance(inner, SpongeBob):
        logits = model(input_ids, logits_mask=trained).float()  # [N, V]
        picked = logits.gather(-1, labels[trained].unsqueeze(-1)).squeeze(-1)
        logp = picked - torch.logsumexp(logits, dim=-1)
        return torch.zeros(labels.shape, dtype=logp.dtype, device=logp.device).masked_scatter(
            trained.to(logp.device), logp
        )
    out = model(input_ids)
    logits = getattr(out, "logits", out).float()
    picked = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(trained, logp, torch.zeros_like(logp))


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor):
    """fp32 [B]: the SUM (not the mean) of the trained tokens' log-probs of each row."""
    return token_logps(model, input_ids, labels).sum(dim=-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    num_pairs: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO (sigmoid) loss of P pairs and its metrics.

    loss = Σₚ −log σ(β·[(π_c − ref_c) − (π_r − ref_r)]) / num_pairs, each argument a [P]
    tensor of sequence log-prob sums. `num_pairs` defaults to P (TRL's mean over the batch);
    pass the pairs of the whole optimizer step (all micro-batches and ranks) so that the
    micro-batch losses add up to the mean over the step.

    Metrics (detached, means over these P pairs, as TRL logs them): `loss`, `rewards/chosen`
    = β·(π_c − ref_c), `rewards/rejected`, `rewards/margin` (chosen − rejected),
    `rewards/accuracy` (share with chosen reward > rejected reward), `logps/chosen`,
    `logps/rejected`, and `pairs` (P)."""
    pc, pr = policy_chosen.float(), policy_rejected.float()
    rc, rr = ref_chosen.detach().float().to(pc.device), ref_rejected.detach().float().to(pc.device)
    if not pc.shape == pr.shape == rc.shape == rr.shape or pc.dim() != 1:
        raise ValueError(
            "dpo_loss: policy and reference log-probs must all be [P] tensors, got "
            f"{tuple(pc.shape)}, {tuple(pr.shape)}, {tuple(rc.shape)}, {tuple(rr.shape)}"
        )
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    per_pair = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    n = per_pair.numel() if num_pairs is None else num_pairs
    if torch.is_tensor(n):
        n = n.to(per_pair.device, torch.float32)
    loss = per_pair.sum() / n
    with torch.no_grad():
        chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
        metrics = {
            "loss": per_pair.mean(),
            "rewards/chosen": chosen_reward.mean(),
            "rewards/rejected": rejected_reward.mean(),
            "rewards/margin": (chosen_reward - rejected_reward).mean(),
            "rewards/accuracy": (chosen_reward > rejected_reward).float().mean(),
            "logps/chosen": pc.mean(),
            "logps/rejected": pr.mean(),
            "pairs": torch.tensor(float(per_pair.numel())),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


def chosen_nll(token_lp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean −log p over the trained tokens of the chosen rows (the first half of a
    `collate_pairs` batch): TRL's `sft` loss term. Added to DPO it keeps the policy raising
    the chosen reply instead of only lowering both (DPO alone may push the rejected reply's
    tokens down faster than the chosen one's rise, and take the shared format with them)."""
    lp_chosen = token_lp.chunk(2)[0]
    trained = labels.chunk(2)[0] != IGNORE
    return -lp_chosen[trained].mean()


def count_pairs(batches: Sequence[dict]) -> tuple[int, int]:
    """`count_fn` for `step.optimizer_step`: (pairs, tokens) of this rank's micro-batches.
    The pairs are the DPO normalizer, all-reduced over the ranks by the step."""
    pairs = sum(b["input_ids"].shape[0] // 2 for b in batches)
    return pairs, sum(b["input_ids"].numel() for b in batches)


class DPOLoss:
    """`loss_fn` for `step.optimizer_step`: the DPO loss of one micro-batch of
    `collate_pairs`, normalized by the step's pairs (the `normalizer` the step passes).

    The reference log-probs come from the batch (`precompute_reference`), or, without them,
    from `ref_model` run here under `no_grad`. `pop_metrics()` returns the pair-weighted means
    of the metrics since the last call (this rank's pairs)."""

    def __init__(
        self, beta: float = 0.1, ref_model: torch.nn.Module | None = None, sft_weight: float = 0.0
    ) -> None:
        if beta <= 0:
            raise UserError(f"DPO beta must be > 0, not {beta}")
        if sft_weight < 0:
            raise UserError(f"the DPO SFT weight cannot be negative, not {sft_weight}")
        self.beta = beta
        self.ref_model = ref_model
        self.sft_weight = sft_weight
        self._sums: dict[str, float] = defaultdict(float)

    def __call__(self, model: torch.nn.Module, b: dict, normalizer: torch.Tensor):
        if "ref_chosen_logps" in b:
            ref_c, ref_r = b["ref_chosen_logps"], b["ref_rejected_logps"]
        elif self.ref_model is not None:
            ref_c, ref_r = reference_logps(self.ref_model, b)
        else:
            raise ValueError(
                "DPO batch without reference log-probs, and no ref_model to compute them"
            )
        token_lp = token_logps(model, b["input_ids"], b["labels"])
        pol_c, pol_r = token_lp.sum(dim=-1).chunk(2)
        loss, metrics = dpo_loss(pol_c, pol_r, ref_c, ref_r, self.beta, num_pairs=normalizer)
        if self.sft_weight:
            # TRL's sigmoid + sft with loss_weights [1, w]: the micro-batch's mean NLL, weighted
            # by its share of the step's pairs (exactly TRL's for one micro-batch a step).
            nll = chosen_nll(token_lp, b["labels"])
            loss = loss + self.sft_weight * nll * (pol_c.numel() / normalizer)
            metrics["nll/chosen"] = nll.detach()
        n = float(metrics["pairs"])
        for k, v in metrics.items():
            self._sums[k] += float(v) * (n if k != "pairs" else 1.0)
        return loss

    def pop_metrics(self) -> dict[str, float]:
        sums, self._sums = self._sums, defaultdict(float)
        n = sums.get("pairs", 0.0)
        if not n:
            return {}
        return {k: (v if k == "pairs" else v / n) for k, v in sums.items()}


# --- the reference model ---------------------------------------------------------------------


@torch.no_grad()
def reference_logps(ref_model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [P], rejected [P]) sequence log-probs of a `collate_pairs` batch under the frozen
    reference model: `no_grad`, eval mode (restored after), fp32."""
    was_training = ref_model.training
    ref_model.eval()
    try:
        dev = next(ref_model.parameters()).device
        logps = sequence_logps(ref_model, batch["input_ids"].to(dev), batch["labels"].to(dev))
    finally:
        ref_model.train(was_training)
    c, r = logps.chunk(2)
    return c, r


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's weights (names, dtypes, shapes, bytes): which reference model a
    cache was computed with."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pair_key(pair: PreferencePair) -> str:
    """A pair's identity for the cache: its tokens and trained masks, both sides."""
    h = hashlib.sha256()
    for a in (pair.chosen_ids, pair.chosen_mask, pair.rejected_ids, pair.rejected_mask):
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + len(a).to_bytes(8, "little") + a.tobytes())
    return h.hexdigest()


class ReferenceCache:
    """Reference log-probs by pair, optionally on disk (`path`, a `torch.save` file read with
    `weights_only=True`). A file written for another `fingerprint` (another reference model or
    tokenizer) is ignored, never mixed in; `save()` writes atomically."""

    VERSION = 1

    def __init__(self, path: str | os.PathLike | None = None, fingerprint: str = "") -> None:
        self.path = None if path is None else Path(path)
        self.fingerprint = fingerprint
        self._values: dict[str, tuple[float, float]] = {}
        self.stale = False  # a file was there but for another fingerprint or version
        if self.path is not None and self.path.is_file():
            data = torch.load(self.path, weights_only=True)
            if data.get("version") == self.VERSION and data.get("fingerprint") == fingerprint:
                vals = data["values"].tolist()
                self._values = {k: (c, r) for k, (c, r) in zip(data["keys"], vals, strict=True)}
            else:
                self.stale = True

    def __len__(self) -> int:
        return len(self._values)

    def get(self, pair: PreferencePair) -> tuple[float, float] | None:
        return self._values.get(pair_key(pair))

    def put(self, pair: PreferencePair, chosen: float, rejected: float) -> None:
        self._values[pair_key(pair)] = (float(chosen), float(rejected))

    def save(self) -> None:
        if self.path is None:
            return
        keys = list(self._values)
        values = torch.tensor([self._values[k] for k in keys], dtype=torch.float64).reshape(-1, 2)
        data = {"version": self.VERSION, "fingerprint": self.fingerprint, "keys": keys}
        data["values"] = values
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        torch.save(data, tmp)
        os.replace(tmp, self.path)


def precompute_reference(
    ref_model: torch.nn.Module,
    pairs: Iterable[PreferencePair],
    batch_size: int = 8,
    cache: ReferenceCache | None = None,
    pad_id: int = 0,
) -> Iterator[PreferencePair]:
    """The pairs, in order, with `ref_chosen_logp` / `ref_rejected_logp` filled in: from the
    cache when it has them, else from one `no_grad` pass of the frozen `ref_model` per batch
    of `batch_size` missing pairs (added to the cache; call `cache.save()` afterwards)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")

    def fill(chunk: list[PreferencePair]) -> list[PreferencePair]:
        out: list[PreferencePair | None] = [None] * len(chunk)
        missing = []
        for i, p in enumerate(chunk):
            hit = cache.get(p) if cache is not None else None
            if hit is None:
                missing.append(i)
            else:
                out[i] = replace(p, ref_chosen_logp=hit[0], ref_rejected_logp=hit[1])
        if missing:
            batch = collate_pairs([chunk[i] for i in missing], pad_id=pad_id)
            c, r = reference_logps(ref_model, batch)
            for i, cv, rv in zip(missing, c.tolist(), r.tolist(), strict=True):
                out[i] = replace(chunk[i], ref_chosen_logp=cv, ref_rejected_logp=rv)
                if cache is not None:
                    cache.put(chunk[i], cv, rv)
        return out  # type: ignore[return-value]

    chunk: list[PreferencePair] = []
    for p in pairs:
        chunk.append(p)
        if len(chunk) == batch_size:
            yield from fill(chunk)
            chunk = []
    if chunk:
        yield from fill(chunk)


# --- the training stage's loader -----------------------------------------------------------


class EpochShards:
    """What the pair and prompt loaders share with `spongebob.data.PackedDataset`'s interface:
    epoch order, rank shares, the resume state and its fingerprint (contracts.md §5).

    Epoch order: a permutation of the items seeded by (seed, epoch). Global batch g holds items
    [g·B·W, (g+1)·B·W) of that order; rank r takes its B at offset r·B. The tail of fewer than
    B·W items is dropped (another tail each epoch). The state is (epoch, batches handed out,
    fingerprint); a state of another configuration is refused. Subclasses set `items` and
    `_what`, and turn a chunk of items into a batch in `_batch`.
    """

    items: list
    _what = "items"

    def _shard_setup(self, paths, tokenizer, seq_len, batch_size, seed, rank, world_size,
                     on_bad_line) -> None:  # fmt: skip
        ident = [
            [str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths
        ]
        key = [ident, tokenizer.hash, seq_len, batch_size, seed, rank, world_size, on_bad_line]
        self.fingerprint = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.epoch = self.batches = 0

    def __len__(self) -> int:
        """Batches this rank gets per epoch."""
        return len(self.items) // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.items))
        B, W = self.batch_size, self.world_size
        while self.batches < len(self):
            start = self.batches * B * W + self.rank * B
            chunk = [self.items[i] for i in order[start : start + B]]
            index = (self.epoch, self.batches)
            self.batches += 1
            yield self._batch(chunk, index)
        self.epoch, self.batches = self.epoch + 1, 0

    def _batch(self, chunk: list, index: tuple[int, int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def every_batch(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's share of every item, in file order, the last batch possibly short:
        validation scores each held-out item once (training's epoch drops its tail)."""
        mine = self.items[self.rank :: self.world_size]
        for g in range(0, len(mine), self.batch_size):
            yield self._batch(mine[g : g + self.batch_size], (-1, g // self.batch_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"the {self._what} loader's state is from another configuration (files, "
                "tokenizer, seq_len, batch size, seed, rank or world size differ)"
            )
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)


class PairDataset(EpochShards):
    """Batches of `collate_pairs` with `spongebob.data.PackedDataset`'s interface, so the one
    training loop runs the `dpo` stage (order, shards and state: `EpochShards`). Sides longer
    than `seq_len + 1` tokens are cut there, as the chat loader cuts conversations."""

    _what = "pair"

    def __init__(
        self,
        paths: Sequence[str | os.PathLike] | str | os.PathLike,
        tokenizer,
        seq_len: int = 1024,
        batch_size: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        on_bad_line: str = "error",
        **_: Any,  # the token loader's options (think_weight, cache_dir) mean nothing here
    ) -> None:
        reader = PairReader(paths, tokenizer, max_len=seq_len + 1, on_bad_line=on_bad_line)
        self.items = list(reader)
        self._stats = {**reader.stats(), "pairs": len(self.items)}
        self.pad_id = int(tokenizer.pad_id)
        self._shard_setup(reader.paths, tokenizer, seq_len, batch_size, seed, rank, world_size,
                          on_bad_line)  # fmt: skip

    @property
    def pairs(self) -> list[PreferencePair]:
        return self.items

    def _batch(self, chunk: list, index: tuple[int, int]) -> dict[str, torch.Tensor]:
        return collate_pairs(chunk, pad_id=self.pad_id)

    def attach_reference(self, ref_model: torch.nn.Module, cache_path: Path | None) -> int:
        """Fill every pair's reference log-probs from `ref_model` (frozen, run once) or from
        the cache at `cache_path`; returns how many were computed (not cached)."""
        cache = ReferenceCache(cache_path, model_fingerprint(ref_model))
        before = len(cache)
        self.items = list(
            precompute_reference(ref_model, self.items, cache=cache, pad_id=self.pad_id)
        )
        computed = len(cache) - before
        if computed:
            cache.save()
        return computed


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, ds: PairDataset, rt, beta: float, max_batches: int = 0):
    """DPO loss, reward margin and preference accuracy over `ds` (all ranks): the share of
    pairs whose chosen reply gains more log-probability over the reference than the rejected.
    Every pair counts once; the ranks may run different numbers of batches, so the forward
    passes go to the unwrapped model (no DDP collective inside the loop)."""
    was_training = model.training
    model.eval()
    inner = getattr(model, "module", model)
    sums = torch.zeros(4, dtype=torch.float64)  # pairs, loss, margin, correct
    for n, b in enumerate(ds.every_batch(), 1):
        b = {k: v.to(rt.device) for k, v in b.items()}
        with rt.autocast():
            pol_c, pol_r = sequence_logps(inner, b["input_ids"], b["labels"]).chunk(2)
        ref_c, ref_r = b["ref_chosen_logps"], b["ref_rejected_logps"]
        loss, m = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta)
        p = float(m["pairs"])
        sums += torch.tensor([p, float(loss) * p, float(m["rewards/margin"]) * p,
                              float(m["rewards/accuracy"]) * p], dtype=torch.float64)  # fmt: skip
        if max_batches and n >= max_batches:
            break
    sums = rt.all_reduce_sum(sums.to(rt.device)).cpu()
    model.train(was_training)
    p = float(sums[0]) or 1.0
    return {
        "eval_loss": float(sums[1]) / p,
        "eval_margin": float(sums[2]) / p,
        "eval_accuracy": float(sums[3]) / p,
        "eval_pairs": int(sums[0]),
    }
