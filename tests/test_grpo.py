"""GRPO building blocks (spongebob.grpo, spongebob.rewards): the prompt reader, the rewards and
`load_reward`, group advantages, the clipped loss with its KL term, and the loss and gradients
against TRL's GRPOTrainer on fixed completions, rewards and old / reference log-probs.

Against TRL, its own code runs: `GRPOTrainer._compute_loss` on the exported model with the
inputs TRL's generation step would have built, and TRL's `nanstd` for the advantages.
Tolerances (fp32 on the CPU): loss and metrics rtol 1e-5 / atol 1e-6, advantages 1e-6, every
weight's gradient rtol 1e-4 and atol 1e-4 × that weight's largest gradient."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from spongebob import checkpoint
from spongebob.dpo import BadRecord, token_logps
from spongebob.errors import UserError
from spongebob.generate import Generation
from spongebob.grpo import (
    BAD_PROMPT_REASONS,
    GRPOLoss,
    PromptReader,
    collate_rollouts,
    completion_ids,
    group_advantages,
    grpo_loss,
    rollout_logps,
)
from spongebob.rewards import REWARDS, arithmetic, format_reward, load_reward, score
from spongebob.runtime import Runtime
from spongebob.step import optimizer_step
from test_generate import make_checkpoint

U, A = "user", "assistant"


def conv(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def write_jsonl(path: Path, records: list, raw_lines: dict[int, bytes] | None = None) -> Path:
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in records]
    for i, raw in (raw_lines or {}).items():
        lines.insert(i, raw)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


PROMPTS = [
    {"conversations": conv((U, "请问 12 + 30 等于多少？"), (A, "42")), "answer": "42"},
    {"conversations": conv(("system", "Think first."), (U, "What is 7 * 6?")), "answer": 42},
    {"conversations": conv((U, "你好"), (A, "你好！"), (U, "讲个笑话"))},
]


# --- prompts -----------------------------------------------------------------------------------


def test_prompt_reader_drops_a_trailing_assistant_turn(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "rlaif.jsonl", PROMPTS)
    got = list(PromptReader(path, chat_tok))
    assert [r.messages for r in got] == [
        PROMPTS[0]["conversations"][:1],
        PROMPTS[1]["conversations"],
        PROMPTS[2]["conversations"],
    ]
    assert [r.answer for r in got] == ["42", "42", None]
    assert [r.source for r in got] == [f"{path}:{i}" for i in (1, 2, 3)]
    for r in got:
        assert r.prompt_ids.tolist() == list(chat_tok.encode_prompt(r.messages))
    assert got[2].record == PROMPTS[2]
    assert all(r.prompt_ids is None for r in PromptReader(path))  # no tokenizer: messages only


BAD = [
    (b"{oops", "invalid_json", "invalid JSON"),
    (b'{"conversations": [{"role": "user", "content": "\\udc00"}]}', "invalid_json", "surrogate"),
    (b'{"text": "hi"}', "bad_schema", 'missing key "conversations"'),
    (json.dumps({"conversations": conv((U, "q")), "answer": [1]}).encode(), "bad_schema", "answer"),
    (json.dumps({"conversations": conv(("tool", "q"))}).encode(), "unknown_role", "unknown role"),
    (b'{"conversations": []}', "empty_conversation", "empty conversation"),
    (json.dumps({"conversations": conv((U, "q"), (A, "a"), (A, "b"))}).encode(), "no_user", "user"),
    (json.dumps({"conversations": conv(("system", "s"))}).encode(), "no_user", "user turn"),
]


@pytest.mark.parametrize("raw,reason,words", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_prompt_names_file_line_and_reason(tmp_path, raw, reason, words):
    path = write_jsonl(tmp_path / "p.jsonl", PROMPTS, {2: raw})
    with pytest.raises(BadRecord) as e:
        list(PromptReader(path))
    assert str(e.value).startswith(f"{path}:3: ") and words in str(e.value)
    assert e.value.reason == reason
    skip = PromptReader(path, on_bad_line="skip")
    assert len(list(skip)) == len(PROMPTS) and skip.skipped == {reason: 1}
    assert set(skip.stats()["skipped"]) == set(BAD_PROMPT_REASONS)


def test_empty_prompt_file(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("\n\n")
    with pytest.raises(BadRecord, match=r"e.jsonl: empty file"):
        list(PromptReader(path))


# --- rewards -----------------------------------------------------------------------------------


def test_arithmetic_reward_takes_the_answer_block_or_its_only_number():
    assert arithmetic("<think>\n12+30\n</think>\n<answer>\n 42 \n</answer>", answer="42") == 1.0
    assert arithmetic("<answer>42</answer>", answer=" 42\n") == 1.0
    assert arithmetic("<answer>41</answer>", answer="42") == 0.0
    assert arithmetic("42", answer="42") == 0.0  # no answer block
    assert arithmetic("<answer>42", answer="42") == 0.0  # not closed
    assert arithmetic("<answer>4 2</answer>", answer="42") == 0.0
    # A closing line after the number (DPO's sign-off) still counts; a second number does not.
    assert arithmetic("<answer>\n27 希望这个回答对你有帮助！\n</answer>", answer="27") == 1.0
    assert arithmetic("<answer>-3 Hope this helps!</answer>", answer="-3") == 1.0
    assert arithmetic("<answer>27 or 28</answer>", answer="27") == 0.0
    assert arithmetic("<answer>127 apples</answer>", answer="27") == 0.0
    with pytest.raises(ValueError, match="reference"):
        arithmetic("<answer>42</answer>", answer=None)


def test_format_reward_is_parse_reasoning_well_formed():
    assert format_reward("<think>\nx\n</think>\n<answer>\ny\n</answer>") == 1.0
    assert format_reward("  <think>x</think><answer>y</answer>\n") == 1.0
    assert format_reward("<answer>y</answer>") == 0.0
    assert format_reward("<think>x</think><answer>y</answer><answer>z</answer>") == 0.0
    assert format_reward("plain text") == 0.0


def test_load_reward_builtins_modules_and_files(tmp_path, monkeypatch):
    assert load_reward("arithmetic") is arithmetic and load_reward("format") is format_reward
    assert set(REWARDS) == {"arithmetic", "format"}
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            NOT_CALLABLE = 3

            def length(completion):
                return float(len(completion))

            def exact(completion, answer=None):
                return float(completion == answer)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rewards:length")("abc") == 3.0
    assert load_reward(f"{tmp_path / 'my_rewards.py'}:exact")("x", answer="x") == 1.0
    for spec, words in [
        ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
        ("my_rewards:missing", "has no attribute 'missing'"),
        ("my_rewards:NOT_CALLABLE", "is a int, not a function"),
        (f"{tmp_path / 'nope.py'}:f", "no such file"),
        ("accuracy", "unknown reward 'accuracy'"),
        ("my_rewards:", "unknown reward"),
    ]:
        with pytest.raises(UserError, match=words):
            load_reward(spec)


def test_score_passes_only_declared_keywords_and_weights(tmp_path):
    seen = {}

    def everything(completion, **kw):
        seen.update(kw)
        return 0.5

    completions = ["<think>a</think><answer>42</answer>", "<answer>7</answer>"]
    prompts = [conv((U, "q1")), conv((U, "q2"))]
    total, per = score(
        [arithmetic, format_reward, everything, lambda c: 2.0],
        completions,
        prompts,
        answers=["42", "42"],
        records=[{"k": 1}, {"k": 2}],
        weights=[1.0, 0.5, 2.0, 0.0],
    )
    assert per.tolist() == [[1.0, 1.0, 0.5, 2.0], [0.0, 0.0, 0.5, 2.0]]
    assert total.tolist() == [2.5, 1.0]
    assert seen == {"prompt": prompts[1], "answer": "42", "record": {"k": 2}}
    with pytest.raises(UserError, match=r"'arithmetic' failed \(f.jsonl:9\).*reference"):
        score([arithmetic], ["x"], [prompts[0]], answers=[None], sources=["f.jsonl:9"])
    with pytest.raises(UserError, match="returned str"):
        score([lambda c: "1"], ["x"], [prompts[0]])
    with pytest.raises(UserError, match="returned nan"):
        score([lambda c: float("nan")], ["x"], [prompts[0]])


# --- advantages --------------------------------------------------------------------------------


def trl_advantages(rewards: torch.Tensor, G: int, scale: str) -> torch.Tensor:
    """The lines of TRL's `_generate_and_score_completions` ("sum_then_normalize", one reward
    function), with TRL's own `nanstd`."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trl(scale):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 0.25, 2.0])
    got = group_advantages(rewards, 4, scale=scale)
    torch.testing.assert_close(got, trl_advantages(rewards, 4, scale), rtol=1e-6, atol=1e-6)


def test_equal_rewards_give_zero_advantage_and_std_is_the_sample_std():
    adv = group_advantages([2.0, 2.0, 2.0, 0.0, 1.0, 2.0], 3)
    assert torch.isfinite(adv).all() and adv[:3].tolist() == [0.0, 0.0, 0.0]
    s = torch.tensor([0.0, 1.0, 2.0]).std().item()  # n - 1 = 2: std 1.0 (n: 0.816)
    assert s == pytest.approx(1.0)
    assert adv[3:].tolist() == pytest.approx([-1 / (s + 1e-4), 0.0, 1 / (s + 1e-4)], rel=1e-6)
    assert group_advantages([5.0, 7.0], 1).tolist() == [0.0, 0.0]  # G = 1: nothing to compare
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages([1.0, 2.0, 3.0], 4)
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages([1.0, float("nan")], 2)


# --- the loss ----------------------------------------------------------------------------------


def toy(ratio: list[float], adv: float):
    """One row whose tokens have the given ratios exp(logp - old) and one advantage."""
    logps = torch.tensor([[-1.0] * len(ratio)], requires_grad=True)
    old = logps.detach() - torch.log(torch.tensor([ratio]))
    return logps, old, torch.tensor([adv]), torch.ones(1, len(ratio), dtype=torch.bool)


def test_clipping_engages_outside_the_trust_region():
    # A > 0: ratios above 1 + eps are clipped (no gradient); below 1 - eps are not (min picks them)
    logps, old, adv, mask = toy([1.5, 1.0, 0.5, 1.1], 1.0)
    loss, m = grpo_loss(logps, old, None, adv, mask, clip_eps=0.2)
    loss.backward()
    assert logps.grad[0, 0] == 0.0 and (logps.grad[0, 1:] != 0).all()
    assert loss.item() == pytest.approx(-(1.2 + 1.0 + 0.5 + 1.1) / 4, rel=1e-6)
    assert m["clip_ratio/high"].item() == 0.25 and m["clip_ratio/low"].item() == 0.0
    assert m["clip_fraction"].item() == 0.25
    # A < 0: ratios below 1 - eps are clipped; above 1 + eps are not
    logps, old, adv, mask = toy([1.5, 1.0, 0.5, 0.9], -1.0)
    loss, m = grpo_loss(logps, old, None, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    loss.backward()
    assert logps.grad[0, 2] == 0.0 and (logps.grad[0, [0, 1, 3]] != 0).all()
    assert loss.item() == pytest.approx((1.5 + 1.0 + 0.8 + 0.9) / 4, rel=1e-6)
    assert m["clip_ratio/low"].item() == 0.25 and m["clip_fraction"].item() == 0.25
    # on-policy (old = None): ratio 1, nothing clipped, gradient -A / tokens
    logps, _, adv, mask = toy([1.0, 1.0], 2.0)
    loss, m = grpo_loss(logps, None, None, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-2.0) and logps.grad.tolist() == [[-1.0, -1.0]]
    assert m["clip_fraction"].item() == 0.0


def test_beta_zero_drops_the_kl_term_and_k3_is_exact():
    g = torch.Generator().manual_seed(0)
    logps = (-torch.rand(3, 5, generator=g) * 3).requires_grad_()
    old = logps.detach() + 0.1 * torch.randn(3, 5, generator=g)
    ref = logps.detach() + torch.randn(3, 5, generator=g)
    adv, mask = torch.tensor([1.0, -0.5, 0.0]), torch.rand(3, 5, generator=g) > 0.3
    no_kl, _ = grpo_loss(logps, old, None, adv, mask, beta=0.0)
    with_ref, m0 = grpo_loss(logps, old, ref, adv, mask, beta=0.0)
    assert with_ref.item() == no_kl.item()  # beta 0: the reference changes nothing
    beta = 0.04
    with_kl, m = grpo_loss(logps, old, ref, adv, mask, beta=beta)
    d = ref - logps.detach()
    k3 = torch.exp(d) - d - 1
    assert (k3[mask] >= 0).all()
    want = no_kl.item() + beta * k3[mask].sum().item() / mask.sum().item()
    assert with_kl.item() == pytest.approx(want, rel=1e-6)
    assert m["kl"].item() == pytest.approx(k3[mask].mean().item(), rel=1e-6) == m0["kl"].item()
    same, m1 = grpo_loss(logps, old, logps.detach(), adv, mask, beta=beta)
    assert m1["kl"].item() == 0.0 and same.item() == pytest.approx(no_kl.item(), abs=1e-7)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, None, adv, mask, beta=beta)


def test_positions_outside_the_mask_never_count():
    logps, old, adv, mask = toy([1.3, 0.9, 1.0], 1.0)
    mask[0, 1] = False
    base, _ = grpo_loss(logps, old, old, adv, mask, beta=0.1)
    junk = old.clone()
    junk[0, 1] = 1e4  # exp(1e4) would overflow, inside the mask
    loss, m = grpo_loss(logps, junk, junk, adv, mask, beta=0.1)
    assert torch.isfinite(loss) and loss.item() == base.item() and torch.isfinite(m["kl"])


def test_normalisations_and_step_accumulation():
    """dapo: Σ / step tokens, so micro-batches add up to the whole batch; grpo: mean of the
    sequence means; dr_grpo: Σ / (sequences × max_completion_length)."""
    g = torch.Generator().manual_seed(1)
    logps = -torch.rand(4, 6, generator=g) * 2
    old = logps + 0.2 * torch.randn(4, 6, generator=g)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    mask = torch.rand(4, 6, generator=g) > 0.4
    mask[:, 0] = True
    full, _ = grpo_loss(logps, old, None, adv, mask)
    n = mask.sum()
    parts = [
        grpo_loss(logps[s], old[s], None, adv[s], mask[s], normalizer=n)[0]
        for s in (slice(0, 1), slice(1, 4))
    ]
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-6)
    per_token = (
        -torch.min(
            torch.exp(logps - old) * adv[:, None],
            torch.clamp(torch.exp(logps - old), 0.8, 1.2) * adv[:, None],
        )
        * mask
    )
    grpo, _ = grpo_loss(logps, old, None, adv, mask, loss_type="grpo")
    assert grpo.item() == pytest.approx((per_token.sum(1) / mask.sum(1)).mean().item(), rel=1e-6)
    dr, _ = grpo_loss(logps, old, None, adv, mask, loss_type="dr_grpo", max_completion_length=10)
    assert dr.item() == pytest.approx(per_token.sum().item() / 40, rel=1e-6)
    assert full.item() == pytest.approx(per_token.sum().item() / n.item(), rel=1e-6)


# --- rollouts and the step ---------------------------------------------------------------------


def test_collate_rollouts_labels_only_the_completion():
    b = collate_rollouts([[1, 5, 6], [1, 7]], [[8, 9, 2], [10]], advantages=[0.5, -0.5])
    assert b["input_ids"].tolist() == [[1, 5, 6, 8, 9], [1, 7, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 8, 9, 2], [-100, 10, -100, -100, -100]]
    assert b["advantages"].dtype == torch.float32
    stop = Generation([8, 9], "stop")
    assert completion_ids(stop, 2) == [8, 9, 2] and completion_ids(
        Generation([8], "length"), 2
    ) == [8]
    # chatml stops on <|im_end|> or <|endoftext|>: the one that ended the reply is trained.
    assert completion_ids(Generation([8], "stop", stop_id=0), 2) == [8, 0]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tok_dir):
    root = tmp_path_factory.mktemp("grpo_ckpt")
    pol = make_checkpoint(root / "policy", tok_dir, seed=21, sharpen=3.0)
    ref = make_checkpoint(root / "ref", tok_dir, seed=22, sharpen=3.0)
    return pol, ref


def load(path):
    return checkpoint.load(path, "cpu", kernels="torch").model


PROMPT_IDS = [[1, 40, 41, 42, 43, 2, 5], [1, 50, 51, 5], [1, 60, 61, 62, 5]]
G = 3
COMPLETIONS = [  # G per prompt, rows i·G … i·G+G−1; some end on </s> (2), some are cut at C
    [100, 101, 102, 2], [103, 104, 105, 106, 107, 108], [109, 2],
    [110, 111, 112, 113, 114, 2], [115], [116, 117, 2],
    [118, 119, 120, 121, 122, 123], [124, 125, 2], [126, 127, 128, 2],
]  # fmt: skip
C = 6
REWARDS_FIXED = [1.0, 0.0, 0.5, 0.3, 0.3, 0.3, 2.0, -1.0, 0.0]  # group 2: all equal


def test_grpo_loss_plugs_into_optimizer_step(ckpts):
    """accumulation over two micro-batches = one batch (dapo: normalizer = step tokens)."""
    policy, ref = load(ckpts[0]), load(ckpts[1])
    prompts = [PROMPT_IDS[i // G] for i in range(len(COMPLETIONS))]
    adv = group_advantages(REWARDS_FIXED, G)
    full = collate_rollouts(prompts, COMPLETIONS, adv)
    full["ref_logps"] = rollout_logps(ref, full)
    full["old_logps"] = rollout_logps(policy, full) + 0.3 * torch.randn(
        full["labels"].shape, generator=torch.Generator().manual_seed(3)
    )
    halves = []
    for s in (slice(0, 4), slice(4, 9)):
        h = collate_rollouts(prompts[s], COMPLETIONS[s], adv[s])
        T = h["input_ids"].shape[1]
        h["ref_logps"], h["old_logps"] = full["ref_logps"][s, :T], full["old_logps"][s, :T]
        halves.append(h)
    rt = Runtime(torch.device("cpu"), torch.float32)
    grads = []
    for batches in ([full], halves):
        model = load(ckpts[0])
        opt = GradCapture(model)
        loss_fn = GRPOLoss(beta=0.04)
        res = optimizer_step(
            model,
            list(model.parameters()),
            opt,
            batches,
            0.0,
            1e9,
            rt,
            loss_fn=loss_fn,
            count_fn=loss_fn.count,
        )
        assert res.trained_tokens == sum(len(c) for c in COMPLETIONS) and res.skipped is None
        m = loss_fn.pop_metrics()
        assert m["tokens"] == res.trained_tokens and 0 < m["clip_fraction"] < 1 and m["kl"] > 0
        grads.append(opt.grads)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-8)
    with pytest.raises(UserError, match="bnpo"):
        GRPOLoss(loss_type="bnpo")


class GradCapture:
    """An optimizer stand-in for `optimizer_step`: its `step` records the gradients."""

    def __init__(self, model):
        self.model, self.param_groups, self.grads = model, [{}], {}

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters()}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


# --- against TRL -------------------------------------------------------------------------------

BETA = 0.04


@pytest.fixture(scope="module")
def trl_grpo(ckpts, tmp_path_factory):
    """TRL's GRPOTrainer on the exported policy (beta 0.04, epsilon 0.2, its default "dapo")."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.base_trainer import _BaseTrainer

    from spongebob.export import export_hf

    root = tmp_path_factory.mktemp("grpo_hf")
    hf_dir = export_hf(ckpts[0], root / "policy")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ds = Dataset.from_list([{"prompt": conv((U, "q"))}] * len(PROMPT_IDS))
    args = GRPOConfig(
        output_dir=str(root / "out"),
        beta=BETA,
        epsilon=0.2,
        num_generations=G,
        per_device_train_batch_size=len(COMPLETIONS),
        max_completion_length=C,
        use_bias_correction_kl=False,
        report_to="none",
        gradient_checkpointing=False,
        use_cpu=True,
        bf16=False,
        save_strategy="no",
    )
    assert args.loss_type == "dapo"  # TRL's default, and ours
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_BaseTrainer, "_send_telemetry", lambda self: None)  # no network in tests
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=args,
            train_dataset=ds,
            processing_class=tok,
        )
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train, which we skip
    return trainer


@pytest.fixture(scope="module")
def rollout(ckpts):
    """The fixed rollout both sides score: TRL's tensors (prompts left-padded, completions
    right-padded, [N, C] log-probs) and ours (one right-padded row per rollout)."""
    policy, ref = load(ckpts[0]), load(ckpts[1])
    prompts = [PROMPT_IDS[i // G] for i in range(len(COMPLETIONS))]
    adv = group_advantages(REWARDS_FIXED, G)
    ours = collate_rollouts(prompts, COMPLETIONS, adv)
    mask = ours["labels"] != -100
    g = torch.Generator().manual_seed(7)
    # old: the current policy shifted by noise, so ratios leave [0.8, 1.2] both ways
    ours["old_logps"] = torch.where(
        mask, rollout_logps(policy, ours) + 0.3 * torch.randn(mask.shape, generator=g), 0.0
    )
    ours["ref_logps"] = rollout_logps(ref, ours)
    N, P = len(COMPLETIONS), max(len(p) for p in PROMPT_IDS)
    prompt_ids, prompt_mask = (
        torch.zeros(N, P, dtype=torch.long),
        torch.zeros(N, P, dtype=torch.long),
    )
    completion, completion_mask = (
        torch.zeros(N, C, dtype=torch.long),
        torch.zeros(N, C, dtype=torch.long),
    )
    old, ref_lp = torch.zeros(N, C), torch.zeros(N, C)
    for i, (p, c) in enumerate(zip(prompts, COMPLETIONS, strict=True)):
        prompt_ids[i, P - len(p) :], prompt_mask[i, P - len(p) :] = torch.tensor(p), 1
        completion[i, : len(c)], completion_mask[i, : len(c)] = torch.tensor(c), 1
        pos = slice(len(p) - 1, len(p) - 1 + len(c))  # our label positions of this completion
        old[i, : len(c)], ref_lp[i, : len(c)] = ours["old_logps"][i, pos], ours["ref_logps"][i, pos]
    theirs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion,
        "completion_mask": completion_mask,
        "advantages": adv.clone(),
        "old_per_token_logps": old,
        "ref_per_token_logps": ref_lp,
        "num_items_in_batch": completion_mask.sum(),
    }
    return ours, theirs


CASES = [  # (loss_type, beta, bias_correction_kl)
    ("dapo", BETA, False),
    ("dapo", 0.0, False),
    ("dapo", BETA, True),  # TRL's default use_bias_correction_kl=True
    ("grpo", BETA, False),
    ("bnpo", BETA, False),
    ("dr_grpo", BETA, False),
]


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")
@pytest.mark.parametrize(
    "loss_type,beta,bias_kl",
    CASES,
    ids=[f"{c[0]}-beta{c[1]}{'-biaskl' if c[2] else ''}" for c in CASES],
)
def test_loss_gradients_and_metrics_equal_trl_grpo_trainer(
    trl_grpo, rollout, ckpts, loss_type, beta, bias_kl
):
    trainer = trl_grpo
    ours, theirs = rollout
    # one trainer, TRL's attributes for the variant (read by _compute_loss at each call)
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.args.use_bias_correction_kl = bias_kl
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trl_loss = trainer._compute_loss(trainer.model, theirs)  # GRPOTrainer._compute_loss
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    policy = load(ckpts[0]).train()
    mask = ours["labels"] != -100
    logps = token_logps(policy, ours["input_ids"], ours["labels"])
    old, ref, adv = ours["old_logps"], ours["ref_logps"], ours["advantages"]
    loss, m = grpo_loss(
        logps, old, ref, adv, mask, clip_eps=0.2, beta=beta, loss_type=loss_type,
        max_completion_length=C, bias_correction_kl=bias_kl,
    )  # fmt: skip
    loss.backward()

    assert 0 < m["clip_fraction"].item() < 0.5 and m["kl"].item() > 1e-3  # both terms matter
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    for ours_key, theirs_key in [
        ("clip_ratio/low", "clip_ratio/low_mean"),
        ("clip_ratio/high", "clip_ratio/high_mean"),
        ("clip_fraction", "clip_ratio/region_mean"),
    ] + ([("kl", "kl")] if beta and not bias_kl else []):
        assert m[ours_key].item() == pytest.approx(trl_metrics[theirs_key], rel=1e-5, abs=1e-6)
    hf_params = dict(trainer.model.named_parameters())
    for name, p in policy.named_parameters():
        want = hf_params[f"model.{name}"].grad
        scale = float(want.abs().max())
        torch.testing.assert_close(
            p.grad, want, rtol=1e-4, atol=1e-4 * scale, msg=lambda s, n=name: f"{n}: {s}"
        )
