"""The reduced demo (`spongebob demo --plan fast`): every stage runs, chains, and teaches."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from spongebob import demo_data
from spongebob.demo import POST_TRAINING, STAGE_DATA, run_demo


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, "fast", seed=0)


def test_unknown_model_preset_is_refused_before_any_work(tmp_path):
    from spongebob.errors import UserError

    with pytest.raises(UserError, match=r"unknown model preset 'huge'.*demo-wide"):
        run_demo(tmp_path / "demo", "fast", model_preset="huge")
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_reduced_demo_runs_every_stage_and_chains_the_checkpoints(fast_demo):
    _, card = fast_demo
    stages = card["stages"]
    assert [s["stage"] for s in stages] == list(STAGE_DATA)
    assert all(s["steps"] > 0 and s["final_loss"] is not None for s in stages)
    assert stages[0]["init"] is None  # pretraining starts from random weights
    for prev, cur in itertools.pairwise(stages):
        assert Path(cur["init"]) == Path(prev["checkpoint"]), cur["stage"]
    for s in stages:
        assert (Path(s["checkpoint"]) / "model.safetensors").is_file()


@pytest.mark.slow
def test_reduced_demo_learns_the_reasoning_format_the_untrained_model_lacks(fast_demo):
    _, card = fast_demo
    before = card["untrained"]["reasoning_format"]
    after = card["stages"][-1]["reasoning_format"]
    assert before is not None and after is not None
    assert before <= 0.05
    assert after >= 0.5, f"reasoning format after distillation: {after:.0%}"


@pytest.mark.slow
def test_reduced_demo_writes_scorecard_report_and_loss_curves(fast_demo):
    out, card = fast_demo
    on_disk = json.loads((out / "scorecard.json").read_text())
    assert on_disk["stages"] == card["stages"]
    assert on_disk["preset"] == "tiny"  # the fast plan's model
    assert card["untrained"]["eval_s"] > 0  # timed apart from pretraining
    report = (out / "report.md").read_text()
    for stage in STAGE_DATA:
        assert (out / f"loss_{stage}.png").is_file()
        assert f"loss_{stage}.png" in report
    # Samples are the first eval items of every task and split, marked right or wrong.
    tasks = {(s["task"], s["split"]) for s in card["samples"]}
    assert {t for t, _ in tasks} == {"fact", "identity", "arith", "recall"}
    assert ("fact", "unseen_family") in tasks and ("fact", "new_pairing") in tasks
    assert report.count("✓") + report.count("✗") == len(card["samples"])
    assert card["continuation"]["reply"]


@pytest.mark.slow
def test_reduced_demo_scores_every_column_per_split_and_saves_every_reply(fast_demo):
    out, card = fast_demo
    final = card["stages"][-1]
    for key in ("fact_accuracy", "fact_new_pairing", "identity", "arithmetic_accuracy", "recall"):
        assert final[key] is not None, key
    splits = final["extra"]["by_split"]
    assert set(splits["fact"]) == {"unseen_family", "new_pairing"}
    assert splits["fact"]["unseen_family"]["contains"] == final["fact_accuracy"]
    rows = json.loads((out / f"eval_{final['stage']}.json").read_text())
    assert len(rows) == sum(t["n"] for t in final["extra"]["by_task"].values())


@pytest.mark.slow
def test_reduced_demo_dpo_learns_the_held_out_preference_and_grpo_logs_rewards(fast_demo):
    """DPO's reward accuracy on held-out pairs (unseen wordings) against its starting model,
    which scores every pair a tie; GRPO logs a mean reward for its rollouts; and the
    reasoning format distillation taught survives both (at least four fifths of it: the fast
    plan's tiny model scores the format on 80 items, and one item is 1.25 points)."""
    _, card = fast_demo
    by = {s["stage"]: s for s in card["stages"]}
    val = by["dpo"]["extra"]["validation"]
    assert val["eval_pairs"] == demo_data.SIZES["dpo_eval"]
    assert val["eval_accuracy"] >= 0.9 and val["eval_margin"] > 0
    rewards = by["grpo"]["extra"]["reward_mean_by_step"]
    assert rewards and all(0.0 <= r <= 2.0 for r in rewards)  # arithmetic + format, each 0/1
    for stage in ("dpo", "grpo"):
        assert by[stage]["preference"] is not None and by[stage]["sign_off"] is not None
        assert by[stage]["reasoning_format"] >= 0.8 * by["distill"]["reasoning_format"]


@pytest.fixture(scope="module")
def chatml_demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo_chatml")
    return out, run_demo(out, "fast", seed=0, template="chatml")


def test_reduced_chatml_demo_chains_learns_the_format_and_scores_tool_use(chatml_demo):
    """`spongebob demo --template chatml`: the same stages on MiniMind-3's format (a chatml
    tokenizer, reasoning_content, calculator dialogues); the reasoning format is learned, and
    the tool-use task is scored on held-out problems at every stage."""
    from spongebob.data import ChatTokenizer

    out, card = chatml_demo
    stages = card["stages"]
    # Post-training stops before DPO/GRPO here: the built-in rewards read <answer> tags.
    assert card["template"] == "chatml"
    assert [s["stage"] for s in stages] == [s for s in STAGE_DATA if s not in POST_TRAINING]
    for prev, cur in itertools.pairwise(stages):
        assert Path(cur["init"]) == Path(prev["checkpoint"]), cur["stage"]
    assert ChatTokenizer.from_dir(stages[-1]["checkpoint"]).template == "chatml"
    assert card["untrained"]["reasoning_format"] <= 0.05
    assert stages[-1]["reasoning_format"] >= 0.5
    assert all(s["tool_use"] is not None for s in stages)
    tool = stages[-1]["extra"]["by_task"]["tool"]
    assert tool["n"] == sum(demo_data.SIZES["eval_arith"].values())  # one per held-out pair
    assert "tool use" in (out / "report.md").read_text()
    assert {s["task"] for s in card["samples"]} == {"fact", "identity", "arith", "recall", "tool"}
