"""`spongebob train grpo`: rollouts from the policy being trained, through the one loop.

A tiny random checkpoint is rewarded (by a user's reward file, `file.py:function`) when its
reply starts with an ASCII letter; GRPO must raise that share. The loss and advantages
themselves are checked against TRL in tests/test_grpo.py.
"""

from __future__ import annotations

import json
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

# Peaked enough that a few replies are likely at the start, so 8 samples a prompt see both
# rewards (a near-uniform model over 800 tokens would need far more steps).
SHARPEN = 16.0
REWARD = """
def starts_with_a_letter(completion):
    text = completion.lstrip()
    return 1.0 if text[:1].isascii() and text[:1].isalpha() else 0.0
"""


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def setup(tmp_path, tok_dir):
    base = make_checkpoint(tmp_path / "base" / "final", tok_dir, seed=3, sharpen=SHARPEN)
    prompts = tmp_path / "prompts.jsonl"
    with open(prompts, "w", encoding="utf-8") as f:
        for i in range(16):
            conv = [{"role": "user", "content": f"{i} + {i} = ?"}]
            f.write(json.dumps({"conversations": conv, "answer": str(2 * i)}) + "\n")
    reward = tmp_path / "my_reward.py"
    reward.write_text(REWARD)
    return base, prompts, f"{reward}:starts_with_a_letter"


def grpo(tmp_path, base, prompts, reward, out, **kw):
    cfg = dict(
        data=[str(prompts)], out=str(tmp_path / out), init=str(base), seq_len=128,
        batch_size=4, accum=1, max_steps=4, lr=1e-2, grpo_group=8, grpo_max_new_tokens=3,
        grpo_beta=0.04, rewards=[reward], device="cpu", kernels="torch", progress=False,
        log_every=1, save_every=100,
    )  # fmt: skip
    cfg.update(kw)
    return stage_config("grpo", **cfg)


def steps(run: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r]


def test_grpo_raises_the_reward_of_its_own_samples(tmp_path, setup):
    base, prompts, reward = setup
    r = train(grpo(tmp_path, base, prompts, reward, "run", max_steps=16))
    rec = steps(tmp_path / "run")
    assert len(rec) == 16
    first = sum(x["reward_mean"] for x in rec[:4]) / 4
    last = sum(x["reward_mean"] for x in rec[-4:]) / 4
    assert last > first + 0.25, (first, last)
    want = {"reward_std", "completion_len", "rollout_tokens_per_s", "kl", "clip_fraction"}
    assert want <= set(rec[-1]) and rec[-1]["completion_tokens_per_s"] > 0
    assert 0 < rec[-1]["completion_len"] <= 4  # 3 new tokens, plus </s> when it stopped
    assert all(x["kl"] >= 0 for x in rec) and rec[-1]["kl"] > 0  # it moved from the reference
    assert checkpoint.load(r.final).meta["stage"] == "grpo"


def test_grpo_top_p_reaches_the_sampler(tmp_path, setup):
    """One prompt, 16 times: rollouts from the top token only (top-p near 0) are all the same
    reply, so every step's reward has no spread; the default top-p 1 samples different ones."""
    base, _, reward = setup
    same = tmp_path / "same.jsonl"
    conv = [{"role": "user", "content": "3 + 3 = ?"}]
    same.write_text((json.dumps({"conversations": conv, "answer": "6"}) + "\n") * 16)
    train(grpo(tmp_path, base, same, reward, "narrow", max_steps=3, grpo_top_p=1e-6))
    train(grpo(tmp_path, base, same, reward, "wide", max_steps=3))
    assert [x["reward_std"] for x in steps(tmp_path / "narrow")] == [0.0, 0.0, 0.0]
    assert max(x["reward_std"] for x in steps(tmp_path / "wide")) > 0.1


def test_a_killed_grpo_run_resumes_with_the_same_rollouts(tmp_path, setup):
    from spongebob.stage import default_dataset_factory

    base, prompts, reward = setup
    kw = dict(max_steps=6, save_every=2)
    a = train(grpo(tmp_path, base, prompts, reward, "a", **kw))

    def dies_in_step_4(paths, tok, **k):
        return KillAfter(default_dataset_factory(paths, tok, **k), n=3)

    with pytest.raises(Killed):
        train(grpo(tmp_path, base, prompts, reward, "b", **kw), dies_in_step_4)
    b = train(grpo(tmp_path, base, prompts, reward, "b", **kw, resume=True))
    assert a.step == b.step == 6
    wa, wb = (
        load_file(str(a.final / "model.safetensors")),
        load_file(str(b.final / "model.safetensors")),
    )
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ra, rb = steps(tmp_path / "a"), steps(tmp_path / "b")
    assert [x["reward_mean"] for x in ra] == [x["reward_mean"] for x in rb]


def test_bad_grpo_set_ups_are_one_line_errors(tmp_path, setup):
    base, prompts, reward = setup
    with pytest.raises(UserError, match="--init CKPT"):
        train(grpo(tmp_path, base, prompts, reward, "r1", init="none", tokenizer=str(base)))
    with pytest.raises(UserError, match="--grpo-group"):
        grpo(tmp_path, base, prompts, reward, "r2", grpo_group=1)
    for p in (0.0, 1.5):
        with pytest.raises(UserError, match="--grpo-top-p must be in"):
            grpo(tmp_path, base, prompts, reward, "r5", grpo_top_p=p)
    with pytest.raises(UserError, match="no module named 'nowhere_module'"):
        train(grpo(tmp_path, base, prompts, "nowhere_module:fn", "r3"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"role": "assistant", "content": "hi"}]}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:1"):
        train(grpo(tmp_path, base, bad, reward, "r4"))
