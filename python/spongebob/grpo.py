"""Group Relative Policy Optimization: prompt data, rollout rows, advantages, the loss.

Building blocks for `spongebob train grpo`, made to plug into `step.optimizer_step`
(`loss_fn=GRPOLoss(...)`, `count_fn=that_loss.count`). The formulas are TRL's `GRPOTrainer`
(trl 1.16, `_generate_and_score_completions` and `_compute_loss`):

* **Prompts.** `{"conversations": [..., {"role": "user", ...}]}` (MiniMind's RLAIF files): a
  trailing assistant turn, if any, is dropped; the prompt must then end with a user turn. An
  optional `"answer"` (a string, or an integer written as one) is the reference for
  `rewards.arithmetic`. `PromptReader` streams files with the bad-line rules of
  contracts.md §1 (`BAD_PROMPT_REASONS`).
* **Rollouts.** Each prompt gets G completions, rows `i·G … i·G+G−1` (TRL's order).
  `collate_rollouts` right-pads prompt + completion rows; `labels` mark the completion tokens
  only (the loader's convention `labels[t] = token t+1`, −100 elsewhere). A completion that
  ended on `</s>` keeps it (`completion_ids`), so stopping is learned too.
* **Advantages.** `group_advantages`: (r − mean of the group) / (std of the group + eps),
  with the *sample* std (Bessel-corrected, `torch.std`'s default, as TRL's `nanstd`) and
  TRL's eps 1e-4. A group whose rewards are all equal gets advantage 0 (no NaN).
* **Loss.** Per token: −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) + β·KL, ρ = exp(logp − old),
  KL the k3 estimator exp(ref − logp) − (ref − logp) − 1 (dropped when β = 0). Aggregation
  (`loss_type`): `"dapo"` (TRL's default) Σ over the completion tokens / the completion tokens
  of the whole optimizer step (all micro-batches and ranks: the step's normalizer, like Σ mᵢ of
  the LM loss); `"grpo"` the mean over sequences of each sequence's token mean; `"bnpo"` Σ /
  this batch's tokens; `"dr_grpo"` Σ / (sequences · max_completion_length).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spongebob.dpo import (
    IGNORE,
    EpochShards,
    RecordReader,
    _Bad,
    _rows,
    check_messages,
    token_logps,
)
from spongebob.errors import UserError

LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")

BAD_PROMPT_REASONS = (
    "invalid_utf8",
    "invalid_json",
    "bad_schema",
    "unknown_role",
    "empty_conversation",
    "no_user",  # nothing to answer: the prompt does not end with a user turn
    "empty_file",
)


# --- prompts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: its messages (ending with a user turn), the optional reference answer, its
    `file:line`, the whole jsonl object (for user rewards) and, when the reader has a
    tokenizer, the prompt ids (`encode_prompt`: the history then `<s>assistant\\n`)."""

    messages: list[dict[str, str]]
    answer: str | None = None
    source: str = ""
    record: dict | None = None
    prompt_ids: np.ndarray | None = None


class PromptReader(RecordReader):
    """Streams the prompts of jsonl files. A bad line is a `BadRecord` naming `file:line` and
    the reason; with `on_bad_line="skip"` it is skipped and counted by reason."""

    reasons = BAD_PROMPT_REASONS

    def __init__(
        self,
        paths: Sequence[str | os.PathLike] | str | os.PathLike,
        tokenizer=None,
        on_bad_line: str = "error",
    ) -> None:
        super().__init__(paths, on_bad_line)
        if tokenizer is not None and not hasattr(tokenizer, "encode_prompt"):
            from spongebob.data import ChatTokenizer

            tokenizer = ChatTokenizer.from_dir(str(tokenizer))
        self.tokenizer = tokenizer

    def _record(self, obj: Any, source: str) -> PromptRecord:
        if not isinstance(obj, dict):
            raise _Bad("bad_schema", "bad record: expected a JSON object")
        if "conversations" not in obj:
            raise _Bad("bad_schema", 'bad record: missing key "conversations"')
        answer = obj.get("answer")
        if answer is not None:
            if isinstance(answer, int) and not isinstance(answer, bool):
                answer = str(answer)
            elif not isinstance(answer, str):
                raise _Bad("bad_schema", 'bad record: "answer" must be a string')
        msgs = check_messages([("conversations", obj["conversations"])])["conversations"]
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs or msgs[-1]["role"] != "user":
            raise _Bad("no_user", "the prompt does not end with a user turn")
        ids = None
        if self.tokenizer is not None:
            ids = np.asarray(self.tokenizer.encode_prompt(msgs), dtype=np.int64)
        return PromptRecord(msgs, answer, source, obj, ids)


# --- rollouts --------------------------------------------------------------------------------


def completion_ids(generation, eos_id: int) -> list[int]:
    """The trained tokens of a `generate.Generation`: its new ids, plus the stop token it
    ended on (the generator strips it; `eos_id` when it does not say which; a reply cut at
    max_new_tokens has none)."""
    ids = [int(t) for t in generation.ids]
    if generation.finish != "stop":
        return ids
    stop = getattr(generation, "stop_id", None)
    return [*ids, int(eos_id if stop is None else stop)]


def collate_rollouts(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    advantages: torch.Tensor | Sequence[float] | None = None,
    pad_id: int = 0,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Rows of prompt + completion, right-padded: `input_ids`, `labels` [N, T] (the completion
    tokens only, −100 elsewhere) and, when given, `advantages` [N] (fp32). Add `old_logps` /
    `ref_logps` with `rollout_logps` on this batch."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(
            f"collate_rollouts: {len(prompts)} prompts, {len(completions)} completions"
        )
    seqs = []
    for p, c in zip(prompts, completions, strict=True):
        p, c = [int(t) for t in p], [int(t) for t in c]
        if not p:
            raise ValueError("collate_rollouts: an empty prompt")
        seqs.append((np.array(p + c, dtype=np.int64), np.array([0] * len(p) + [1] * len(c), bool)))
    input_ids, labels = _rows(seqs, pad_id, pad_to_multiple_of)
    batch = {"input_ids": input_ids, "labels": labels}
    if advantages is not None:
        adv = torch.as_tensor(advantages, dtype=torch.float32).reshape(-1)
        if adv.numel() != len(seqs):
            raise ValueError(f"collate_rollouts: {adv.numel()} advantages for {len(seqs)} rows")
        batch["advantages"] = adv
    return batch


@torch.no_grad()
def rollout_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """fp32 [N, T] per-token log-probs of the batch's labels under `model`, without gradient
    and in eval mode (restored after): the old policy's (`batch["old_logps"]`) or the frozen
    reference's (`batch["ref_logps"]`)."""
    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        return token_logps(model, batch["input_ids"].to(dev), batch["labels"].to(dev))
    finally:
        model.train(was_training)


# --- advantages ------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_size: int,
    eps: float = 1e-4,
    scale: str = "group",
) -> torch.Tensor:
    """fp32 [P·G] advantages of rewards [P·G] (group i = rows i·G … i·G+G−1):
    (r − mean of its group) / (std + eps), TRL's `scale_rewards`:

    * `"group"` (default): the std of the group; `"batch"`: the std of all P·G rewards;
      `"none"`: no division (Dr. GRPO).
    * std is the sample std (Bessel-corrected, n − 1), as TRL's `nanstd`; with one sample
      (G = 1) it is taken as 0, as TRL does, so the advantage is 0.

    Equal rewards in a group give exactly 0, never NaN. Non-finite rewards are refused."""
    r = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1)
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {', '.join(SCALE_REWARDS)}, not {scale!r}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError("group_advantages: non-finite rewards")
    grouped = r.view(-1, group_size)
    centered = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centered
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped)
        std = std.expand_as(grouped).reshape(-1)
    else:
        std = r.std().expand_as(r) if r.numel() > 1 else torch.zeros_like(r)
    return centered / (std + eps)


# --- the loss --------------------------------------------------------------------------------


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.0,
    *,
    clip_eps_high: float | None = None,
    loss_type: str = "dapo",
    normalizer: torch.Tensor | float | None = None,
    max_completion_length: int | None = None,
    bias_correction_kl: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of N rollouts and its metrics (TRL's `GRPOTrainer._compute_loss`).

    `logps` [N, T] the policy's per-token log-probs (with gradient); `old_logps` those of the
    policy that sampled (None: `logps.detach()`, one update per generation, ratio 1);
    `ref_logps` the frozen reference's (needed when `beta` > 0, ignored when `beta` = 0);
    `advantages` [N]; `mask` [N, T] the completion tokens. Positions outside the mask never
    count, whatever they hold.

    per token: −min(ρ·A, clip(ρ, 1 − clip_eps, 1 + clip_eps_high)·A) + β·(e^(ref−logp) −
    (ref − logp) − 1), ρ = e^(logp − old); `clip_eps_high` defaults to `clip_eps`.
    `bias_correction_kl` multiplies the KL term by ρ (TRL's `use_bias_correction_kl`, True by
    default in trl 1.16; the DeepSeek-V3.2 unbiased reverse-KL gradient); off by default here,
    the plain k3 term of GRPO. Aggregated by `loss_type` (module docstring); `normalizer` is
    the step's count — completion tokens for `"dapo"` (default: this batch's), sequences for
    `"grpo"` and `"dr_grpo"` (default: N) — and unused for `"bnpo"`.

    Metrics (detached, means over this batch's completion tokens, as TRL logs them): `kl`
    (when `ref_logps` is given), `clip_ratio/low` (ρ < 1 − ε with A < 0), `clip_ratio/high`
    (ρ > 1 + ε with A > 0), `clip_fraction` (either: the tokens whose gradient the clip cut),
    `ratio/mean`, `tokens`."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, not {loss_type!r}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, not {beta}")
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    logps = logps.float()
    m = mask.to(torch.bool)
    if logps.shape != m.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and mask {tuple(m.shape)} differ in shape")
    mf = m.float()
    zero = torch.zeros_like(logps)
    old = logps.detach() if old_logps is None else old_logps.detach().float()
    old = torch.where(m, old, logps.detach())  # outside the mask: ratio 1, a finite 0 below
    adv = advantages.detach().float().reshape(-1, 1).to(logps.device)
    if adv.shape[0] != logps.shape[0]:
        raise ValueError(f"{adv.shape[0]} advantages for {logps.shape[0]} rows")

    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if ref_logps is not None:
        ref = torch.where(m, ref_logps.detach().float(), logps.detach())
        delta = ref - logps
        kl = torch.exp(delta) - delta - 1
    if beta != 0.0:
        if kl is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_logps")
        per_token = per_token + beta * (kl * ratio if bias_correction_kl else kl)
    per_token = torch.where(m, per_token, zero)

    tokens_per_seq = mf.sum(dim=1)
    if loss_type == "dapo":
        n = mf.sum() if normalizer is None else normalizer
        total = per_token.sum()
    elif loss_type == "bnpo":
        n, total = mf.sum().clamp(min=1.0), per_token.sum()
    elif loss_type == "grpo":
        n = logps.shape[0] if normalizer is None else normalizer
        total = (per_token.sum(dim=1) / tokens_per_seq.clamp(min=1.0)).sum()
    else:  # dr_grpo
        if max_completion_length is None:
            raise ValueError('loss_type "dr_grpo" needs max_completion_length')
        seqs = logps.shape[0] if normalizer is None else normalizer
        n, total = seqs * max_completion_length, per_token.sum()
    if torch.is_tensor(n):
        n = n.to(total.device, torch.float32)
    loss = total / n

    with torch.no_grad():
        count = mf.sum()

        def masked_mean(x: torch.Tensor) -> torch.Tensor:
            return (torch.where(m, x.float(), zero)).sum() / count.clamp(min=1.0)

        low = (ratio < 1 - eps_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        metrics = {
            "clip_ratio/low": masked_mean(low),
            "clip_ratio/high": masked_mean(high),
            "clip_fraction": masked_mean(low | high),
            "ratio/mean": masked_mean(ratio),
            "tokens": count,
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl)
    return loss, {k: v.detach() for k, v in metrics.items()}


class GRPOLoss:
    """`loss_fn` for `step.optimizer_step` on `collate_rollouts` batches carrying
    `advantages` and, as needed, `old_logps` (else ratio 1) and `ref_logps` (for beta > 0).

    Its `count` is the matching `count_fn`: (completion tokens, tokens) for `"dapo"`,
    (sequences, tokens) for `"grpo"` and `"dr_grpo"`, so the step's normalizer is the global
    count the loss type divides by. `"bnpo"` normalizes each micro-batch by itself and does not
    fit a step-wide normalizer: use `"dapo"`. `pop_metrics()` returns the token-weighted means
    of the metrics since the last call."""

    def __init__(
        self,
        clip_eps: float = 0.2,
        beta: float = 0.0,
        clip_eps_high: float | None = None,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        bias_correction_kl: bool = False,
    ) -> None:
        if loss_type not in LOSS_TYPES or loss_type == "bnpo":
            raise UserError(f"GRPO loss type must be dapo, grpo or dr_grpo, not {loss_type!r}")
        if loss_type == "dr_grpo" and not max_completion_length:
            raise UserError('GRPO loss type "dr_grpo" needs max_completion_length')
        self.clip_eps, self.clip_eps_high, self.beta = clip_eps, clip_eps_high, beta
        self.loss_type, self.max_completion_length = loss_type, max_completion_length
        self.bias_correction_kl = bias_correction_kl
        self._sums: dict[str, float] = defaultdict(float)

    def count(self, batches: Sequence[dict]) -> tuple[int, int]:
        tokens = sum(b["input_ids"].numel() for b in batches)
        if self.loss_type == "dapo":
            return sum(int((b["labels"] != IGNORE).sum()) for b in batches), tokens
        return sum(b["input_ids"].shape[0] for b in batches), tokens

    def __call__(self, model: torch.nn.Module, b: dict, normalizer: torch.Tensor):
        logps = token_logps(model, b["input_ids"], b["labels"])
        loss, metrics = grpo_loss(
            logps,
            b.get("old_logps"),
            b.get("ref_logps"),
            b["advantages"],
            b["labels"] != IGNORE,
            self.clip_eps,
            self.beta,
            clip_eps_high=self.clip_eps_high,
            loss_type=self.loss_type,
            normalizer=normalizer,
            max_completion_length=self.max_completion_length,
            bias_correction_kl=self.bias_correction_kl,
        )
        n = float(metrics["tokens"])
        for k, v in metrics.items():
            self._sums[k] += float(v) * (n if k != "tokens" else 1.0)
        return loss

    def pop_metrics(self) -> dict[str, float]:
        sums, self._sums = self._sums, defaultdict(float)
        n = sums.get("tokens", 0.0)
        if not n:
            return {}
        return {k: (v if k == "tokens" else v / n) for k, v in sums.items()}


# --- the training stage's loader -------------------------------------------------------------


@dataclass
class RolloutConfig:
    """How a GRPO stage samples: G completions per prompt of at most `max_new_tokens`."""

    group: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.04
    rewards: Sequence[str] = ("arithmetic", "format")


class RolloutDataset(EpochShards):
    """Rollout batches with `spongebob.data.PackedDataset`'s interface, so the one training
    loop runs the `grpo` stage (order, shards and state: `dpo.EpochShards`; prompts of
    `seq_len` tokens or more are left out and counted as truncated).

    Pulling a batch samples G completions of each prompt from the *current* policy (`bind`), in
    eval mode without gradient, then scores them, so rollout and update never hold their memory
    at once. Sampling is seeded by (seed, epoch, batch, rank): a resumed run draws the same
    completions. One update per rollout, so the old policy is the current one (ratio 1 at the
    update, as TRL with one iteration); the frozen reference gives `ref_logps` when β > 0.
    """

    _what = "prompt"

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
        **_: Any,  # the token loader's options mean nothing here
    ) -> None:
        reader = PromptReader(paths, tokenizer, on_bad_line=on_bad_line)
        self.items = [p for p in reader if len(p.prompt_ids) < seq_len]
        self._stats = {**reader.stats(), "truncated": reader.records - len(self.items)}
        if not self.items:
            raise UserError(
                f"no prompt shorter than --seq-len {seq_len} in {list(map(str, paths))}"
            )
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self._shard_setup(reader.paths, tokenizer, seq_len, batch_size, seed, rank, world_size,
                          on_bad_line)  # fmt: skip
        self.policy = self.ref = None
        self.cfg = RolloutConfig()
        self._fns: list = []
        self._metrics: dict[str, float] = defaultdict(float)

    @property
    def prompts(self) -> list[PromptRecord]:
        return self.items

    def bind(self, policy, ref, cfg: RolloutConfig) -> None:
        """The models to sample from and to anchor to, and how to sample and score."""
        from spongebob.rewards import load_reward

        self.policy, self.ref, self.cfg = policy, ref, cfg
        self._fns = [load_reward(r) for r in cfg.rewards]

    def _batch(self, chunk: list, index: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, batch = index
        seed = np.random.default_rng([self.seed, epoch, batch, self.rank]).integers(2**31)
        return self.rollout(chunk, int(seed))

    def rollout(self, prompts: Sequence[PromptRecord], sample_seed: int, group: int | None = None,
                greedy: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
        """G completions of each prompt from the policy, scored: a `collate_rollouts` batch
        with `advantages` (and `ref_logps` when β > 0), plus `rewards` [P·G]."""
        import time

        from spongebob.generate import Generator, SamplingConfig
        from spongebob.rewards import score

        G = group or self.cfg.group
        max_new = min(
            self.cfg.max_new_tokens, self.seq_len - max(len(p.prompt_ids) for p in prompts)
        )
        sampling = SamplingConfig(
            max_new_tokens=max(1, max_new),
            temperature=0.0 if greedy else self.cfg.temperature,
            top_p=self.cfg.top_p, seed=sample_seed,
        )  # fmt: skip
        rows = [p for p in prompts for _ in range(G)]
        was_training = self.policy.training
        self.policy.eval()
        t0 = time.perf_counter()
        try:
            gens = Generator(self.policy, self.tokenizer).generate(
                [p.prompt_ids for p in rows], sampling
            )
        finally:
            self.policy.train(was_training)
        dt = time.perf_counter() - t0
        eos = int(self.tokenizer.eos_id)
        completions = [completion_ids(g, eos) for g in gens]
        total, _ = score(
            self._fns, [g.text for g in gens], [p.messages for p in rows],
            answers=[p.answer for p in rows], records=[p.record for p in rows],
            sources=[p.source for p in rows],
        )  # fmt: skip
        adv = group_advantages(total, G)
        batch = collate_rollouts(
            [p.prompt_ids for p in rows], completions, adv, pad_id=int(self.tokenizer.pad_id)
        )
        batch["rewards"] = total
        if self.ref is not None and self.cfg.beta > 0:
            batch["ref_logps"] = rollout_logps(self.ref, batch).cpu()
        n_new = sum(len(c) for c in completions)
        m = self._metrics
        m["rollouts"] += len(rows)
        m["reward_sum"] += float(total.sum())
        m["reward_sq"] += float((total**2).sum())
        m["completion_tokens"] += n_new
        m["rollout_s"] += dt
        return batch

    def pop_metrics(self) -> dict[str, float]:
        """Reward mean and std, completion length and rollout tokens/s since the last call."""
        m, self._metrics = self._metrics, defaultdict(float)
        n = m.get("rollouts", 0.0)
        if not n:
            return {}
        mean = m["reward_sum"] / n
        return {
            "reward_mean": mean,
            "reward_std": max(m["reward_sq"] / n - mean * mean, 0.0) ** 0.5,
            "completion_len": m["completion_tokens"] / n,
            "rollout_tokens_per_s": m["completion_tokens"] / max(m["rollout_s"], 1e-9),
        }


@torch.no_grad()
def evaluate_prompts(ds: RolloutDataset, rt, max_batches: int = 0) -> dict[str, float]:
    """Mean reward of greedy replies (one per prompt) over `ds` (all ranks)."""
    sums = torch.zeros(2, dtype=torch.float64)
    B, W = ds.batch_size, ds.world_size
    n_batches = max(1, -(-len(ds.prompts) // (B * W)))
    for g in range(n_batches if not max_batches else min(n_batches, max_batches)):
        chunk = ds.prompts[g * B * W + ds.rank * B : g * B * W + ds.rank * B + B]
        if chunk:
            r = ds.rollout(chunk, 0, group=1, greedy=True)["rewards"]
            sums += torch.tensor([len(chunk), float(r.sum())], dtype=torch.float64)
    ds.pop_metrics()  # evaluation rollouts are not training metrics
    sums = rt.all_reduce_sum(sums.to(rt.device)).cpu()
    return {"eval_reward": float(sums[1]) / max(float(sums[0]), 1.0), "eval_prompts": int(sums[0])}
