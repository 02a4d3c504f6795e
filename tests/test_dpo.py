"""DPO building blocks (spongebob.dpo): the pair reader and its bad records, the collate,
sequence log-probs, the loss and its step normalisation, the reference cache, and the loss and
gradients against TRL's DPOTrainer on the same tiny model exported to Hugging Face.

Tolerances against TRL (fp32 on the CPU, two implementations of the same LLaMA): loss and
metrics rtol 1e-5 / atol 1e-6; every weight's gradient rtol 1e-4 and atol 1e-4 × that
weight's largest gradient. (Measured: the losses agree to the last bit, the gradients to
~1e-7 relative.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spongebob import checkpoint
from spongebob.dpo import (
    BAD_PAIR_REASONS,
    BadRecord,
    DPOLoss,
    PairReader,
    ReferenceCache,
    collate_pairs,
    count_pairs,
    dpo_loss,
    model_fingerprint,
    precompute_reference,
    reference_logps,
    sequence_logps,
    token_logps,
)
from spongebob.errors import UserError
from spongebob.runtime import Runtime
from spongebob.step import optimizer_step
from test_generate import make_checkpoint

BETA = 0.1

U = "user"
A = "assistant"


def conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


PAIRS = [
    {
        "chosen": conv((U, "法国的首都是哪里？"), (A, "法国的首都是巴黎。")),
        "rejected": conv((U, "法国的首都是哪里？"), (A, "我不知道。")),
    },
    {
        "chosen": conv(
            (U, "What is 2 + 3?"), (A, "<think>\n2 + 3 = 5\n</think>\n<answer>\n5\n</answer>")
        ),
        "rejected": conv((U, "What is 2 + 3?"), (A, "It is 6, obviously.")),
        "id": 7,  # unknown keys are ignored
    },
    {  # multi-turn: the earlier assistant turn is prompt, only the last reply is scored
        "chosen": conv(
            (U, "你好"), (A, "你好！"), (U, "你是谁？"), (A, "我是 SpongeBob，一个小模型。")
        ),
        "rejected": conv((U, "你好"), (A, "你好！"), (U, "你是谁？"), (A, "不告诉你")),
    },
    {
        "chosen": conv(("system", "Answer briefly."), (U, "Name a colour."), (A, "Blue.")),
        "rejected": conv(("system", "Answer briefly."), (U, "Name a colour."), (A, "")),
    },
]


def write_jsonl(path: Path, records: list, raw_lines: dict[int, bytes] | None = None) -> Path:
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in records]
    for i, raw in (raw_lines or {}).items():
        lines.insert(i, raw)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dpo") / "dpo.jsonl", PAIRS)


@pytest.fixture(scope="module")
def pairs(pair_file, chat_tok):
    return list(PairReader(pair_file, chat_tok))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tok_dir):
    """(policy, reference) tiny checkpoints with different weights."""
    root = tmp_path_factory.mktemp("dpo_ckpt")
    pol = make_checkpoint(root / "policy", tok_dir, seed=11, sharpen=3.0)
    ref = make_checkpoint(root / "ref", tok_dir, seed=12, sharpen=3.0)
    return pol, ref


def load(path):
    return checkpoint.load(path, "cpu", kernels="torch").model


# --- reading -----------------------------------------------------------------------------------


def test_reader_encodes_each_side_and_marks_only_the_final_reply(pairs, chat_tok):
    assert len(pairs) == len(PAIRS)
    for p, rec in zip(pairs, PAIRS, strict=True):
        for side in ("chosen", "rejected"):
            ids, mask = getattr(p, f"{side}_ids"), getattr(p, f"{side}_mask")
            want_ids, weights = chat_tok.encode_conversation(rec[side])
            assert ids.tolist() == list(want_ids)  # the Rust template, untouched
            reply = rec[side][-1]["content"]
            assert chat_tok.decode(ids[mask].tolist()) == reply + "</s>"
            # the mask is the weights > 0, less any earlier assistant turn (the prompt)
            assert not (mask & ~(np.asarray(weights) > 0)).any()
        s = int(np.flatnonzero(p.chosen_mask)[0])
        assert s == int(np.flatnonzero(p.rejected_mask)[0])
        assert p.chosen_ids[:s].tolist() == p.rejected_ids[:s].tolist()  # the shared prompt
        assert p.source.endswith(f"dpo.jsonl:{PAIRS.index(rec) + 1}")
    multi = pairs[2]
    w = np.asarray(chat_tok.encode_conversation(PAIRS[2]["chosen"])[1])
    assert (w > 0).sum() > multi.chosen_mask.sum()  # the first reply is not scored


BAD = [
    (b'{"chosen": [', "invalid_json", "invalid JSON"),
    (b"\xff\xfe", "invalid_utf8", "invalid UTF-8"),
    (b'{"chosen": "x\\ud800", "rejected": []}', "invalid_json", "lone surrogate"),
    (b"[1, 2]", "bad_schema", "expected a JSON object"),
    (json.dumps({"chosen": PAIRS[0]["chosen"]}).encode(), "bad_schema", 'missing key "rejected"'),
    (json.dumps({"chosen": [{"role": "user"}], "rejected": []}).encode(), "bad_schema", "content"),
    (
        json.dumps({"chosen": conv(("bot", "x"), (A, "y")), "rejected": conv((U, "x"), (A, "z"))}),
        "unknown_role",
        "unknown role 'bot'",
    ),
    (
        json.dumps({"chosen": [], "rejected": conv((U, "x"), (A, "z"))}),
        "empty_conversation",
        "empty",
    ),
    (
        json.dumps({"chosen": conv((U, "q")), "rejected": conv((U, "q"), (A, "z"))}),
        "no_assistant",
        "no assistant turn",
    ),
    (
        json.dumps(
            {"chosen": conv((U, "q"), (A, "a"), (U, "more")), "rejected": conv((U, "q"), (A, "b"))}
        ),
        "no_assistant",
        "does not end with an assistant reply",
    ),
    (
        json.dumps({"chosen": conv((U, "q1"), (A, "a")), "rejected": conv((U, "q2"), (A, "b"))}),
        "prompt_mismatch",
        "different prompts",
    ),
    (
        json.dumps({"chosen": PAIRS[0]["chosen"], "rejected": PAIRS[0]["chosen"]}),
        "identical_pair",
        "identical",
    ),
]


@pytest.mark.parametrize("raw,reason,words", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_record_names_file_line_and_reason(tmp_path, chat_tok, raw, reason, words):
    path = write_jsonl(
        tmp_path / "pairs.jsonl", PAIRS[:2], {1: raw if isinstance(raw, bytes) else raw.encode()}
    )
    with pytest.raises(BadRecord) as e:
        list(PairReader(path, chat_tok))
    assert str(e.value).startswith(f"{path}:2: ")
    assert words in str(e.value)
    assert (e.value.reason, e.value.line) == (reason, 2)


def test_a_side_without_a_trained_token_within_max_len_is_a_bad_record(tmp_path, chat_tok, pairs):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2])
    prompt_len = int(np.flatnonzero(pairs[0].chosen_mask)[0])
    with pytest.raises(BadRecord, match=r"pairs.jsonl:1: .*no trained token within max_len") as e:
        list(PairReader(path, chat_tok, max_len=prompt_len))
    assert e.value.reason == "no_trained_token"
    # one more token: both sides keep one trained token, different ones, so the pair is good
    short = list(PairReader(path, chat_tok, max_len=prompt_len + 1, on_bad_line="skip"))
    assert short and all(p.truncated and p.chosen_mask.sum() == 1 for p in short[:1])


def test_sides_equal_within_max_len_are_an_identical_pair(tmp_path, chat_tok):
    rec = {
        "chosen": conv((U, "q"), (A, "abc abc abc one")),
        "rejected": conv((U, "q"), (A, "abc abc abc two")),
    }
    path = write_jsonl(tmp_path / "pairs.jsonl", [rec])
    ids, _ = chat_tok.encode_conversation(rec["chosen"])
    prompt = len(chat_tok.encode_prompt(rec["chosen"][:1]))
    with pytest.raises(BadRecord, match="identical within max_len") as e:
        list(PairReader(path, chat_tok, max_len=prompt + 2))
    assert e.value.reason == "identical_pair"
    assert len(list(PairReader(path, chat_tok, max_len=len(ids)))) == 1


def test_skip_policy_counts_by_reason_and_keeps_every_good_line(tmp_path, chat_tok):
    raws = {
        1: b"not json",
        3: b"   ",
        4: json.dumps({"chosen": PAIRS[0]["chosen"], "rejected": PAIRS[0]["chosen"]}).encode(),
    }
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS, raws)
    reader = PairReader(path, chat_tok, on_bad_line="skip")
    got = list(reader)
    assert len(got) == len(PAIRS)
    stats = reader.stats()
    assert stats["records"] == len(PAIRS) and set(stats["skipped"]) == set(BAD_PAIR_REASONS)
    assert {k: v for k, v in stats["skipped"].items() if v} == {
        "invalid_json": 1,
        "identical_pair": 1,
    }
    assert [p.source.rsplit(":", 1)[1] for p in got] == ["1", "3", "6", "7"]  # real line numbers


def test_empty_file_bom_and_crlf(tmp_path, chat_tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n  \n")
    with pytest.raises(BadRecord, match=r"empty.jsonl: empty file") as e:
        list(PairReader(empty, chat_tok))
    assert e.value.line == 0 and e.value.reason == "empty_file"
    r = PairReader(empty, chat_tok, on_bad_line="skip")
    assert list(r) == [] and r.skipped["empty_file"] == 1
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps(PAIRS[0]).encode()
        + b"\r\n"
        + json.dumps(PAIRS[1]).encode()
        + b"\r\n"
    )
    assert len(list(PairReader(bom, chat_tok))) == 2


# --- rows, log-probs, loss ---------------------------------------------------------------------


def test_collate_right_pads_chosen_rows_then_rejected_rows(pairs):
    b = collate_pairs(pairs)
    P = len(pairs)
    assert b["input_ids"].shape == b["labels"].shape and b["input_ids"].shape[0] == 2 * P
    sides = [(p.chosen_ids, p.chosen_mask) for p in pairs] + [
        (p.rejected_ids, p.rejected_mask) for p in pairs
    ]
    for row, (ids, mask) in enumerate(sides):
        n = len(ids) - 1
        assert b["input_ids"][row, :n].tolist() == ids[:-1].tolist()
        assert (b["input_ids"][row, n:] == 0).all()  # padding id 0 (<unk>)
        want = [int(t) if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)]
        assert b["labels"][row, :n].tolist() == want and (b["labels"][row, n:] == -100).all()
    assert "ref_chosen_logps" not in b
    assert collate_pairs(pairs, pad_to_multiple_of=16)["input_ids"].shape[1] % 16 == 0


def test_sequence_logps_is_the_fp32_sum_over_trained_tokens(pairs, ckpts):
    model = load(ckpts[0])
    b = collate_pairs(pairs)
    got = sequence_logps(model, b["input_ids"], b["labels"])
    assert got.dtype == torch.float32 and got.shape == (2 * len(pairs),)
    with torch.no_grad():  # independent: float64 log-softmax over the full logits
        logp = torch.log_softmax(model(b["input_ids"]).double(), dim=-1)
    for row in range(b["input_ids"].shape[0]):
        pos = (b["labels"][row] != -100).nonzero().flatten()
        want = logp[row, pos, b["labels"][row, pos]].sum()
        assert got[row].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)
    per_token = token_logps(model, b["input_ids"], b["labels"])
    assert (per_token[b["labels"] == -100] == 0).all()


def test_scoring_only_trained_positions_gives_the_full_logits_gradients(pairs, ckpts):
    """token_logps asks a SpongeBob for logits at the trained positions only; the gradients
    equal those of the same log-probs taken from the full [B, T, V] logits."""
    model = load(ckpts[0]).train()
    b = collate_pairs(pairs)
    token_logps(model, b["input_ids"], b["labels"]).sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logp = torch.log_softmax(model(b["input_ids"]).float(), dim=-1)
    trained = b["labels"] != -100
    logp.gather(-1, b["labels"].clamp_min(0)[..., None])[..., 0][trained].sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_dpo_loss_formula_and_metrics():
    pc = torch.tensor([-10.0, -20.0, -5.0], requires_grad=True)
    pr = torch.tensor([-12.0, -18.0, -5.0], requires_grad=True)
    rc, rr = torch.tensor([-11.0, -19.0, -6.0]), torch.tensor([-11.0, -19.0, -4.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
    z = 0.5 * ((pc - rc) - (pr - rr))
    want = torch.log1p(torch.exp(-z)).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.5 * (1 - 1 + 1) / 3)
    assert m["rewards/rejected"].item() == pytest.approx(0.5 * (-1 + 1 - 1) / 3)
    assert m["rewards/margin"].item() == pytest.approx(z.mean().item())
    assert m["rewards/accuracy"].item() == pytest.approx(2 / 3)
    assert m["logps/chosen"].item() == pytest.approx(-35 / 3) and m["pairs"].item() == 3
    loss.backward()
    assert pc.grad is not None and rc.grad is None


def test_num_pairs_makes_micro_batch_losses_add_up_to_the_step_mean():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g) * 5 for _ in range(4))
    full, _ = dpo_loss(pc, pr, rc, rr, BETA)
    halves = [
        dpo_loss(pc[s], pr[s], rc[s], rr[s], BETA, num_pairs=torch.tensor(6.0))[0]
        for s in (slice(0, 2), slice(2, 6))
    ]
    assert sum(halves).item() == pytest.approx(full.item(), rel=1e-6)


def test_reference_logps_are_frozen_precomputed_and_cached(tmp_path, pairs, ckpts):
    ref = load(ckpts[1]).train()
    b = collate_pairs(pairs)
    c, r = reference_logps(ref, b)
    assert not c.requires_grad and ref.training  # no graph; the mode is restored
    done = list(precompute_reference(ref, pairs, batch_size=3))
    assert [p.ref_chosen_logp for p in done] == pytest.approx(c.tolist(), rel=1e-5, abs=1e-5)
    assert [p.ref_rejected_logp for p in done] == pytest.approx(r.tolist(), rel=1e-5, abs=1e-5)
    batch = collate_pairs(done)
    assert torch.allclose(batch["ref_chosen_logps"], c, atol=1e-5)

    fp = model_fingerprint(ref)
    cache = ReferenceCache(tmp_path / "ref.pt", fp)
    first = list(precompute_reference(ref, pairs, batch_size=2, cache=cache))
    cache.save()

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, ids):
            self.calls += 1
            return self.inner(ids)

    counting = Counting(ref)
    again = ReferenceCache(tmp_path / "ref.pt", fp)
    assert len(again) == len(pairs) and not again.stale
    cached = list(precompute_reference(counting, pairs, cache=again))
    assert counting.calls == 0  # every pair came from the file
    assert [p.ref_chosen_logp for p in cached] == [p.ref_chosen_logp for p in first]
    other = ReferenceCache(tmp_path / "ref.pt", model_fingerprint(load(ckpts[0])))
    assert len(other) == 0 and other.stale  # another reference model: never mixed in


class GradCapture:
    """An optimizer stand-in for `optimizer_step`: its `step` records the gradients."""

    def __init__(self, model):
        self.model, self.param_groups, self.grads = model, [{}], {}

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters()}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def test_dpo_loss_plugs_into_optimizer_step_with_accumulation(pairs, ckpts):
    """accumulation 2 × 2 pairs gives the gradient of one batch of 4 (normalizer = pairs)."""
    ref = load(ckpts[1])
    done = list(precompute_reference(ref, pairs))
    rt = Runtime(torch.device("cpu"), torch.float32)
    grads = []
    for batches in ([collate_pairs(done)], [collate_pairs(done[:2]), collate_pairs(done[2:])]):
        model = load(ckpts[0])
        opt = GradCapture(model)
        loss_fn = DPOLoss(BETA)
        params = list(model.parameters())
        res = optimizer_step(
            model, params, opt, batches, 0.0, 1e9, rt, loss_fn=loss_fn, count_fn=count_pairs
        )
        assert res.trained_tokens == len(pairs) and res.skipped is None
        metrics = loss_fn.pop_metrics()
        assert metrics["pairs"] == len(pairs)
        assert res.loss == pytest.approx(metrics["loss"], rel=1e-5)
        grads.append(opt.grads)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


# --- against TRL ---------------------------------------------------------------------------------


def _trl_trainer(ckpts, root: Path, loss_type: list[str], loss_weights=None):
    """TRL's DPOTrainer (beta BETA) on the exported policy and reference."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.base_trainer import _BaseTrainer

    from spongebob.export import export_hf

    hf_pol, hf_ref = export_hf(ckpts[0], root / "policy"), export_hf(ckpts[1], root / "ref")
    model = AutoModelForCausalLM.from_pretrained(hf_pol, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(hf_ref, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as ours
    tok = AutoTokenizer.from_pretrained(hf_pol)
    ds = Dataset.from_list(
        [{"prompt": conv((U, "q")), "chosen": conv((A, "a")), "rejected": conv((A, "b"))}]
    )
    args = DPOConfig(
        output_dir=str(root / "out"),
        beta=BETA,
        loss_type=loss_type,
        loss_weights=loss_weights,
        report_to="none",
        gradient_checkpointing=False,
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=len(PAIRS),
        max_length=None,
        save_strategy="no",
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_BaseTrainer, "_send_telemetry", lambda self: None)  # no network in tests
        trainer = DPOTrainer(
            model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok
        )
    return trainer


@pytest.fixture(scope="module")
def trl_dpo(ckpts, tmp_path_factory):
    """TRL's DPOTrainer, sigmoid loss."""
    return _trl_trainer(ckpts, tmp_path_factory.mktemp("dpo_hf"), ["sigmoid"])


def trl_examples(pairs) -> list[dict]:
    """Our pairs as TRL's tokenized examples: prompt ids, then each side's reply tokens (the
    content and its </s>, exactly our trained tokens)."""
    out = []
    for p in pairs:
        s = int(np.flatnonzero(p.chosen_mask)[0])
        assert p.chosen_ids[:s].tolist() == p.rejected_ids[:s].tolist()
        out.append(
            {
                "prompt_ids": p.chosen_ids[:s].tolist(),
                "chosen_ids": p.chosen_ids[p.chosen_mask].tolist(),
                "rejected_ids": p.rejected_ids[p.rejected_mask].tolist(),
            }
        )
    return out


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")
def test_loss_gradients_and_metrics_equal_trl_dpo_trainer(trl_dpo, pairs, ckpts):
    trainer = trl_dpo
    inputs = trainer.data_collator(trl_examples(pairs))  # TRL's DataCollatorForPreference
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trl_loss = trainer.compute_loss(trainer.model, inputs)  # DPOTrainer._compute_loss
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    policy, ref = load(ckpts[0]).train(), load(ckpts[1])
    batch = collate_pairs(pairs)
    ref_c, ref_r = reference_logps(ref, batch)
    pol_c, pol_r = sequence_logps(policy, batch["input_ids"], batch["labels"]).chunk(2)
    loss, m = dpo_loss(pol_c, pol_r, ref_c, ref_r, BETA)
    loss.backward()

    assert abs(m["rewards/margin"].item()) > 1e-3  # policy and reference differ: a real test
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    for ours, theirs in [
        ("rewards/chosen", "rewards/chosen"),
        ("rewards/rejected", "rewards/rejected"),
        ("rewards/margin", "rewards/margins"),
        ("rewards/accuracy", "rewards/accuracies"),
        ("logps/chosen", "logps/chosen"),
        ("logps/rejected", "logps/rejected"),
    ]:
        assert m[ours].item() == pytest.approx(trl_metrics[theirs], rel=1e-5, abs=1e-6), ours
    _grads_match(policy, trainer)


def _grads_match(policy, trainer) -> None:
    """Every weight's gradient equals TRL's (the tied lm_head is the embedding)."""
    hf_params = dict(trainer.model.named_parameters())
    assert len(dict(policy.named_parameters())) == len(hf_params)
    for name, p in policy.named_parameters():
        theirs = hf_params[f"model.{name}"].grad
        assert p.grad is not None and theirs is not None, name
        scale = float(theirs.abs().max())
        torch.testing.assert_close(
            p.grad, theirs, rtol=1e-4, atol=1e-4 * scale, msg=lambda s, n=name: f"{n}: {s}"
        )


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")
def test_sft_weight_equals_trl_sigmoid_plus_sft_loss_and_gradients(pairs, ckpts, tmp_path):
    """`--dpo-sft-weight w` is TRL's loss_type ["sigmoid", "sft"] with loss_weights [1, w]:
    the same loss and gradients on one batch; and it is more than the plain DPO loss."""
    w = 0.5
    trainer = _trl_trainer(ckpts, tmp_path, ["sigmoid", "sft"], [1.0, w])
    inputs = trainer.data_collator(trl_examples(pairs))
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()

    policy, ref = load(ckpts[0]).train(), load(ckpts[1])
    batch = collate_pairs(pairs)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = reference_logps(ref, batch)
    fn = DPOLoss(BETA, sft_weight=w)
    loss = fn(policy, batch, torch.tensor(float(len(pairs))))
    loss.backward()
    m = fn.pop_metrics()
    plain, _ = dpo_loss(
        *sequence_logps(policy, batch["input_ids"], batch["labels"]).chunk(2),
        batch["ref_chosen_logps"], batch["ref_rejected_logps"], BETA,
    )  # fmt: skip
    assert m["nll/chosen"] > 0.1  # the term is there and not negligible
    assert loss.item() == pytest.approx(plain.item() + w * m["nll/chosen"], rel=1e-5)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    _grads_match(policy, trainer)
    with pytest.raises(UserError, match="SFT weight"):
        DPOLoss(BETA, sft_weight=-1.0)
