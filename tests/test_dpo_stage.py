"""`spongebob train dpo`: the one training loop on preference pairs (contracts.md §5).

A tiny random checkpoint learns a reply style from pairs (the chosen side answers politely,
the rejected side refuses); held-out pairs ask new questions in the same style. The DPO
building blocks themselves are checked against TRL in tests/test_dpo.py.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spongebob import checkpoint
from spongebob.config import stage_config
from spongebob.errors import UserError
from spongebob.train import train

sys.path.insert(0, str(Path(__file__).parent))
from test_generate import make_checkpoint
from test_train_helpers import KillAfter, Killed

ADAM_ATOL = 1e-4  # as in tests/test_train.py


def write_pairs(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            prompt = [{"role": "user", "content": f"{a} 和 {b} 哪个大？"}]
            good = f"好的！{max(a, b)} 更大。"
            bad = "不知道。"
            rec = {
                "chosen": [*prompt, {"role": "assistant", "content": good}],
                "rejected": [*prompt, {"role": "assistant", "content": bad}],
            }
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def base(tmp_path, tok_dir) -> Path:
    return make_checkpoint(tmp_path / "base" / "final", tok_dir, seed=3, sharpen=1.0)


def dpo(tmp_path: Path, data: Path, base: Path, out: str, **kw):
    cfg = dict(
        data=[str(data)], out=str(tmp_path / out), init=str(base), seq_len=128, batch_size=4,
        accum=1, max_steps=6, lr=3e-3, dpo_beta=0.5, device="cpu", kernels="torch",
        progress=False, log_every=1, save_every=100,
    )  # fmt: skip
    cfg.update(kw)
    return stage_config("dpo", **cfg)


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "dpo" / "metrics.jsonl").read_text().splitlines()]


def test_dpo_learns_the_preferred_style_on_held_out_pairs(tmp_path, base):
    data = write_pairs(tmp_path / "pairs.jsonl", 32, seed=1)
    held = write_pairs(tmp_path / "held.jsonl", 18, seed=2)  # not a multiple of the batch
    r = train(dpo(tmp_path, data, base, "run", eval_data=[str(held)], max_steps=16, eval_every=1))
    evals = [x for x in records(tmp_path / "run") if "eval_accuracy" in x]
    # Before any update the policy is the reference: every margin is 0, so no pair is won.
    assert evals[0]["step"] == 1 and evals[-1]["step"] == 16
    assert evals[-1]["eval_accuracy"] >= 0.9 and evals[-1]["eval_margin"] > 0
    assert all(x["eval_pairs"] == 18 for x in evals)  # every held-out pair, the short batch too
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < 0.70  # ln 2 = 0.693 at margin 0
    steps = [x for x in records(tmp_path / "run") if "loss" in x]
    assert {"rewards/accuracy", "rewards/margin", "logps/chosen", "pairs_per_s"} <= set(steps[-1])
    assert steps[-1]["pairs"] == 16 * 4  # the step's unit is pairs
    meta = json.loads((r.final / "config.json").read_text())
    assert meta["stage"] == "dpo" and meta["init"] == str(base)
    assert (tmp_path / "run" / "dpo" / "reference_logps.pt").is_file()
    # The run folder's latest stage is dpo: chat and eval load it.
    assert checkpoint.load(tmp_path / "run").meta["stage"] == "dpo"


def test_dpo_accumulation_gives_the_update_of_one_big_batch(tmp_path, base):
    data = write_pairs(tmp_path / "pairs.jsonl", 16, seed=1)
    a = train(dpo(tmp_path, data, base, "a", batch_size=4, accum=1, max_steps=2))
    b = train(dpo(tmp_path, data, base, "b", batch_size=2, accum=2, max_steps=2))
    wa, wb = (
        load_file(str(a.final / "model.safetensors")),
        load_file(str(b.final / "model.safetensors")),
    )
    moved = max(
        float((wa[k] - load_file(str(base / "model.safetensors"))[k]).abs().max()) for k in wa
    )
    assert moved > 1e-4  # the updates did something
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=ADAM_ATOL, rtol=0, msg=k)


def test_a_killed_dpo_run_resumes_exactly(tmp_path, base):
    from spongebob.stage import default_dataset_factory

    data = write_pairs(tmp_path / "pairs.jsonl", 12, seed=1)  # 3 batches of 4 per epoch
    kw = dict(max_steps=7, save_every=3)
    a = train(dpo(tmp_path, data, base, "a", **kw))

    def dies_in_step_5(paths, tok, **k):
        return KillAfter(default_dataset_factory(paths, tok, **k), n=4)

    with pytest.raises(Killed):
        train(dpo(tmp_path, data, base, "b", **kw), dies_in_step_5)
    assert checkpoint.latest_checkpoint(tmp_path / "b" / "dpo").name == "step_00000003"
    b = train(dpo(tmp_path, data, base, "b", **kw, resume=True))
    assert a.step == b.step == 7
    wa, wb = (
        load_file(str(a.final / "model.safetensors")),
        load_file(str(b.final / "model.safetensors")),
    )
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa = torch.load(a.final / "train_state.pt", weights_only=True)
    sb = torch.load(b.final / "train_state.pt", weights_only=True)
    assert sa["loader"] == sb["loader"] and (
        sa["loader"][0]["epoch"],
        sa["loader"][0]["batches"],
    ) == (2, 1)


def test_bad_pairs_and_bad_set_ups_are_one_line_errors(tmp_path, base):
    data = write_pairs(tmp_path / "pairs.jsonl", 8, seed=1)
    lines = data.read_text(encoding="utf-8").splitlines()
    same = json.loads(lines[0])
    same["rejected"] = same["chosen"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[1], json.dumps(same, ensure_ascii=False)]) + "\n", "utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: .*identical"):
        train(dpo(tmp_path, bad, base, "r1"))
    with pytest.raises(UserError, match="--init CKPT"):
        train(dpo(tmp_path, data, base, "r2", init="none"))
    with pytest.raises(UserError, match="--val-split"):
        dpo(tmp_path, data, base, "r3", val_split=0.1)
    with pytest.raises(UserError, match="--dpo-beta"):
        dpo(tmp_path, data, base, "r4", dpo_beta=0.0)


@pytest.mark.slow
def test_two_gloo_ranks_validate_every_held_out_pair_once(tmp_path, base):
    """17 held-out pairs over 2 ranks at batch 2: rank 0 runs 5 validation batches (the last
    short) and rank 1 runs 4, and the all-reduced count is every pair once, with the accuracy
    of one process at the same global batch (the same updates)."""
    from test_train import run_cli

    data = write_pairs(tmp_path / "pairs.jsonl", 32, seed=1)
    held = write_pairs(tmp_path / "held.jsonl", 17, seed=2)
    one = train(dpo(tmp_path, data, base, "one", eval_data=[str(held)], max_steps=2))
    args = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", "29531", "-m", "spongebob", "train", "dpo", "--data", str(data),
        "--eval-data", str(held), "--init", str(base), "--out", str(tmp_path / "two"),
        "--seq-len", "128", "--batch-size", "2", "--accum", "1", "--max-steps", "2",
        "--lr", "3e-3", "--dpo-beta", "0.5", "--device", "cpu", "--kernels", "torch",
        "--no-progress", "--log-every", "1",
    ]  # fmt: skip
    run_cli(args)
    assert one.step == 2
    ev_one = [x for x in records(tmp_path / "one") if "eval_accuracy" in x][-1]
    ev_two = [x for x in records(tmp_path / "two") if "eval_accuracy" in x][-1]
    assert ev_one["eval_pairs"] == ev_two["eval_pairs"] == 17
    assert ev_two["eval_accuracy"] == pytest.approx(ev_one["eval_accuracy"], abs=1e-6)
