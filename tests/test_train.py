"""The training loop (issue 4): presets, loss normalisation, resume, DDP, failure handling.

Runs use the tiny preset at seq 32 on a few generated jsonl lines with the real Rust loader
(`spongebob.data.PackedDataset`); the fault-injection tests (steps without trained tokens, NaN
losses) use `FakePacked` from tests/test_train_helpers.py, which has the same interface.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spongebob import checkpoint
from spongebob.checkpoint import latest_checkpoint, list_step_checkpoints
from spongebob.cli import build_parser
from spongebob.cli import main as cli_main
from spongebob.config import stage_config
from spongebob.errors import UserError
from spongebob.step import lr_at
from spongebob.train import TrainingDiverged, config_from_args, train

sys.path.insert(0, str(Path(__file__).parent))
from test_train_helpers import FakePacked, write_lines

# Weights after several AdamW steps are compared at 1e-4, not 1e-6: Adam divides by √v, so an
# element whose gradient is ~1e-8 turns a last-bit difference in the summation order into a
# visible one. Gradients, losses and gradient norms are compared tightly.
ADAM_ATOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def data(tmp_path) -> Path:
    """40 short documents: ~24 rows of 33 tokens at seq 32 → ~12 batches of 2 per epoch."""
    return write_lines(tmp_path / "train.jsonl", 40, seed=1)


def batches_per_epoch(data: Path, tok_dir: Path, batch_size: int) -> int:
    from spongebob.data import PackedDataset

    return len(PackedDataset([data], str(tok_dir), seq_len=32, batch_size=batch_size))


def small(stage: str, data: Path, out: Path, tok_dir: Path | None, **kw):
    base = dict(
        data=[str(data)],
        out=str(out),
        tokenizer=str(tok_dir) if tok_dir else None,
        preset="tiny",
        seq_len=32,
        batch_size=4,
        accum=1,
        max_steps=4,
        device="cpu",
        progress=False,
        log_every=1,
        save_every=100,
        lr=1e-3,
        kernels="torch",
        attention="sdpa",
    )
    base.update(kw)
    return stage_config(stage, **base)


def small_args(stage: str, data: Path, out: Path, tok_dir: Path | None, *extra: str) -> list[str]:
    args = [stage, "--data", str(data), "--out", str(out)]
    if tok_dir:
        args += ["--tokenizer", str(tok_dir)]
    args += (
        "--preset tiny --seq-len 32 --batch-size 2 --device cpu --kernels torch --attention sdpa "
        "--no-progress --lr 1e-3 --log-every 1"
    ).split()
    return [*args, *extra]


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "spongebob", "train", *args]


# Runs `spongebob train` with a fault injected from outside the product: the process blocks
# forever at a chosen point of a chosen step so that the test can SIGKILL it there.
HANG = """
import sys, time
import spongebob.checkpoint as ck
where, step = sys.argv[1], int(sys.argv[2])
real_save, real_prune = ck.save_file, ck.prune_checkpoints
def hang():
    while True:
        time.sleep(1)
def save_file(tensors, path, metadata=None):
    real_save(tensors, path, metadata=metadata)
    if where == "in-save" and f"step_{step:08d}" in path:
        hang()
def prune_checkpoints(root, keep):
    out = real_prune(root, keep)
    last = ck.list_step_checkpoints(root)
    if where == "after-save" and last and last[-1][0] == step:
        hang()
    return out
ck.save_file, ck.prune_checkpoints = save_file, prune_checkpoints
from spongebob.cli import main
raise SystemExit(main(["train", *sys.argv[3:]]))
"""


def hanging_cli_cmd(where: str, step: int, *args: str) -> list[str]:
    return [sys.executable, "-c", HANG, where, str(step), *args]


def run_env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run_cli(args: list[str], timeout: float = 240, **env) -> subprocess.CompletedProcess:
    r = subprocess.run(args, env=run_env(**env), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ckpt) / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if atol == 0.0:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


def records(run: Path, stage: str = "pretrain") -> list[dict]:
    return [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]


def same_trajectory(run_a: Path, run_b: Path) -> None:
    """Per-step loss and gradient norm agree: the updates were computed from equal gradients."""
    ra = [r for r in records(run_a) if "loss" in r]
    rb = [r for r in records(run_b) if "loss" in r]
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert x["trained_tokens"] == y["trained_tokens"]


def _wait_for(cond, proc, timeout: float = 180.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


# --- configuration -------------------------------------------------------------------------


def test_stage_defaults_are_the_tutorial_presets_and_flags_override_them():
    p = build_parser()
    base = ["--data", "x.jsonl", "--out", "run"]
    pre = config_from_args(p.parse_args(["train", "pretrain", *base]))
    assert (pre.kind, pre.seq_len, pre.epochs, pre.batch_size, pre.accum, pre.lr) == (
        "text",
        512,
        2,
        84,
        2,
        5e-4,
    )
    sft = config_from_args(p.parse_args(["train", "sft", *base]))
    assert (sft.kind, sft.seq_len, sft.epochs, sft.batch_size, sft.accum, sft.lr) == (
        "chat",
        512,
        2,
        84,
        8,
        5e-4,
    )
    long = config_from_args(p.parse_args(["train", "sft-long", *base]))
    assert (long.seq_len, long.epochs, long.lr, long.batch_size * long.accum) == (
        1024,
        1,
        5e-5,
        224,
    )
    dist = config_from_args(p.parse_args(["train", "distill", *base]))
    assert (dist.seq_len, dist.lr, dist.think_weight) == (1024, 1e-6, 10.0)
    assert dist.batch_size * dist.accum == 600
    over = config_from_args(
        p.parse_args(
            [
                "train",
                "distill",
                *base,
                "--lr",
                "3e-4",
                "--accum",
                "2",
                "--think-weight",
                "5",
                "--seq-len",
                "256",
                "--max-steps",
                "7",
                "--compile",
                "--seed",
                "3",
                "--keep",
                "1",
            ]
        )
    )
    assert (over.lr, over.accum, over.think_weight, over.seq_len, over.max_steps) == (
        3e-4,
        2,
        5.0,
        256,
        7,
    )
    assert over.compile and over.seed == 3 and over.keep == 1


def test_fp16_is_refused_because_it_would_need_a_loss_scaler():
    with pytest.raises(UserError, match="bf16"):
        stage_config("pretrain", data=["x"], out="o", dtype="fp16")


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = stage_config("pretrain", data=["x"], out="o", lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)


def test_missing_data_file_is_a_user_error(tmp_path, tok_dir):
    cfg = small("pretrain", tmp_path / "nope.jsonl", tmp_path / "run", tok_dir)
    with pytest.raises(UserError, match="no such file"):
        train(cfg)


# --- loss normalisation --------------------------------------------------------------------


def test_accumulated_gradient_of_4_quarter_batches_equals_the_full_batch_gradient(data, tok_dir):
    from spongebob.data import PackedDataset
    from spongebob.model import ModelConfig, SpongeBob
    from spongebob.runtime import Runtime
    from spongebob.step import forward_backward
    from spongebob.tokenizer import load

    tok = load(tok_dir)
    full = next(iter(PackedDataset([data], tok, seq_len=32, batch_size=8)))
    quarters = list(PackedDataset([data], tok, seq_len=32, batch_size=2))[:4]
    n = torch.tensor(float((full["labels"] != -100).sum()))
    grads = []
    for batches in ([full], quarters):
        torch.manual_seed(0)
        model = SpongeBob(
            ModelConfig(
                vocab_size=tok.vocab_size,
                dim=64,
                n_layers=2,
                n_heads=4,
                n_kv_heads=2,
                ffn_dim=128,
            ),
            kernels="torch",
        )
        loss = forward_backward(model, batches, n, Runtime(torch.device("cpu"), torch.float32))
        grads.append((loss, {k: p.grad.clone() for k, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=0)
    for k, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][k], rtol=1e-5, atol=1e-7, msg=k)


def test_accumulating_4_quarter_batches_gives_the_update_of_one_full_batch(tmp_path, data, tok_dir):
    # 2 steps: both read rows 0–15 of epoch 0 (later steps could straddle the epoch boundary
    # differently for 8 × 1 and 2 × 4).
    assert batches_per_epoch(data, tok_dir, batch_size=2) >= 8
    kw = dict(max_steps=2)
    a = train(small("pretrain", data, tmp_path / "a", tok_dir, batch_size=8, accum=1, **kw))
    b = train(small("pretrain", data, tmp_path / "b", tok_dir, batch_size=2, accum=4, **kw))
    assert a.step == b.step == 2
    same_trajectory(tmp_path / "a", tmp_path / "b")
    assert_same_weights(a.final, b.final, atol=ADAM_ATOL)


@pytest.mark.slow
def test_two_gloo_ranks_give_the_update_of_one_process(tmp_path, data, tok_dir):
    one = train(small("pretrain", data, tmp_path / "one", tok_dir, batch_size=4))
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "spongebob",
        "train",
    ]
    args = small_args("pretrain", data, tmp_path / "two", tok_dir, "--max-steps", "4")
    run_cli([*torchrun, *args, "--accum", "1", "--batch-size", "2"])
    two = tmp_path / "two" / "pretrain" / "final"
    same_trajectory(tmp_path / "one", tmp_path / "two")
    assert_same_weights(one.final, two, atol=ADAM_ATOL)
    meta = json.loads((two / "config.json").read_text())
    assert meta["step"] == 4
    # Only rank 0 writes: one metrics file, one line per step.
    lines = (tmp_path / "two" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "loss" in json.loads(x)] == [1, 2, 3, 4]
    state = torch.load(two / "train_state.pt", weights_only=True)
    assert len(state["loader"]) == 2 and state["world_size"] == 2


def test_a_step_without_trained_tokens_is_skipped_without_nan(tmp_path, data, tok_dir):
    fac = functools.partial(FakePacked, empty_batches=(0, 1))
    r = train(small("pretrain", data, tmp_path / "r", tok_dir, batch_size=2, accum=2), fac)
    assert r.skipped_empty == 1 and r.skipped_nonfinite == 0
    assert all(torch.isfinite(w).all() for w in weights(r.final).values())


# --- non-finite losses ---------------------------------------------------------------------


def test_a_nonfinite_step_is_skipped_and_counted(tmp_path, data, tok_dir):
    fac = functools.partial(FakePacked, nan_batches=(1,))
    r = train(small("pretrain", data, tmp_path / "r", tok_dir), fac)
    assert r.step == 4 and r.skipped_nonfinite == 1
    assert all(torch.isfinite(w).all() for w in weights(r.final).values())


def test_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(
    tmp_path, data, tok_dir
):
    fac = functools.partial(FakePacked, nan_batches=(2, 3, 4, 5))
    cfg = small(
        "pretrain",
        data,
        tmp_path / "r",
        tok_dir,
        max_steps=8,
        save_every=1,
        max_bad_steps=2,
        keep=2,
    )
    with pytest.raises(TrainingDiverged, match="not finite for 2 optimizer steps") as e:
        train(cfg, fac)
    good = latest_checkpoint(tmp_path / "r" / "pretrain")
    assert good is not None and good.name == "step_00000002"
    assert str(good) in str(e.value)
    loaded = checkpoint.load(good)
    model, meta = loaded.model, loaded.meta
    assert meta["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (tmp_path / "r" / "pretrain" / "final").exists()


# --- checkpoints and resume ----------------------------------------------------------------


def test_checkpoints_keep_the_last_k_and_are_self_contained(tmp_path, data, tok_dir):
    r = train(small("pretrain", data, tmp_path / "r", tok_dir, max_steps=5, save_every=1, keep=2))
    steps = [s for s, _ in list_step_checkpoints(tmp_path / "r" / "pretrain" / "checkpoints")]
    assert steps == [3, 4]
    for ckpt in (r.final, tmp_path / "r" / "pretrain" / "checkpoints" / "step_00000004"):
        names = {p.name for p in ckpt.iterdir()}
        assert {"model.safetensors", "config.json", "tokenizer.json", "train_state.pt"} <= names
        meta = json.loads((ckpt / "config.json").read_text())
        assert meta["stage"] == "pretrain" and meta["model"]["dim"] == 128
        torch.load(ckpt / "train_state.pt", weights_only=True)


def test_an_existing_run_is_not_overwritten_without_resume(tmp_path, data, tok_dir):
    train(small("pretrain", data, tmp_path / "r", tok_dir, max_steps=1))
    with pytest.raises(UserError, match="--resume"):
        train(small("pretrain", data, tmp_path / "r", tok_dir, max_steps=1))


@pytest.mark.slow
def test_resume_after_sigkill_gives_bitwise_identical_weights(tmp_path, data, tok_dir):
    # ~12 batches per epoch at batch 2: 11 steps × accum 2 = 22 batches cross an epoch boundary
    # in the resumed part (steps 7–11).
    extra = ("--accum", "2", "--max-steps", "11", "--save-every", "3")
    run_cli(cli_cmd(*small_args("pretrain", data, tmp_path / "a", tok_dir, *extra)))

    args = hanging_cli_cmd(
        "after-save", 6, *small_args("pretrain", data, tmp_path / "b", tok_dir, *extra)
    )
    proc = subprocess.Popen(args, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt6 = tmp_path / "b" / "pretrain" / "checkpoints" / "step_00000006"
    _wait_for(lambda: ckpt6.is_dir() or proc.poll() is not None, proc)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (tmp_path / "b" / "pretrain" / "final").exists()

    resumed = run_cli(
        cli_cmd(*small_args("pretrain", data, tmp_path / "b", tok_dir, *extra, "--resume"))
    )
    assert "resumed from" in resumed.stderr and "step 6" in resumed.stderr
    final_a, final_b = (tmp_path / x / "pretrain" / "final" for x in "ab")
    assert_same_weights(final_a, final_b)
    sa = torch.load(final_a / "train_state.pt", weights_only=True)
    sb = torch.load(final_b / "train_state.pt", weights_only=True)
    assert sa["loader"] == sb["loader"]
    n = batches_per_epoch(data, tok_dir, batch_size=2)
    assert n < 22 and (sa["loader"][0]["epoch"], sa["loader"][0]["batches"]) == divmod(22, n)
    for ka, kb in zip(
        sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(), strict=True
    ):
        assert all(torch.equal(ka[n], kb[n]) for n in ("exp_avg", "exp_avg_sq", "step"))
    # The metrics of the redone steps are not duplicated.
    assert [x["step"] for x in records(tmp_path / "b") if "loss" in x] == list(range(1, 12))


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(
    tmp_path, data, tok_dir
):
    extra = ("--max-steps", "6", "--save-every", "2")
    args = hanging_cli_cmd(
        "in-save", 4, *small_args("pretrain", data, tmp_path / "r", tok_dir, *extra)
    )
    proc = subprocess.Popen(args, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = tmp_path / "r" / "pretrain" / "checkpoints"

    def half_written():
        return any((p / "model.safetensors").exists() for p in root.glob(".tmp-*"))

    _wait_for(lambda: half_written() or proc.poll() is not None, proc)
    time.sleep(0.5)  # safely inside the hang, with weights but no config.json written
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert list(root.glob(".tmp-*")), "the half-written checkpoint should still be there"
    assert [s for s, _ in list_step_checkpoints(root)] == [2]
    meta = checkpoint.load(tmp_path / "r" / "pretrain").meta
    assert meta["step"] == 2 and meta["path"].endswith("step_00000002")

    resumed = run_cli(
        cli_cmd(*small_args("pretrain", data, tmp_path / "r", tok_dir, *extra, "--resume"))
    )
    assert "step 2" in resumed.stderr
    assert not list(root.glob(".tmp-*"))
    final = tmp_path / "r" / "pretrain" / "final"
    assert json.loads((final / "config.json").read_text())["step"] == 6


# --- stages, eval, logging -----------------------------------------------------------------


def test_four_stages_chain_through_the_cli_each_starting_from_the_previous_final(
    tmp_path, data, tok_dir, capsys
):
    chat = write_lines(tmp_path / "chat.jsonl", 30, seed=2, kind="chat")
    run = tmp_path / "run"
    common = [
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--accum",
        "1",
        "--max-steps",
        "2",
        "--device",
        "cpu",
        "--kernels",
        "torch",
        "--no-progress",
        "--log-every",
        "1",
    ]
    pre = ["train", "pretrain", "--data", str(data), "--out", str(run), "--tokenizer", str(tok_dir)]
    assert cli_main([*pre, "--seq-len", "32", *common]) == 0
    finals = [run / "pretrain" / "final"]
    for stage in ("sft", "sft-long", "distill"):
        capsys.readouterr()
        argv = ["train", stage, "--data", str(chat), "--out", str(run), "--seq-len", "64", *common]
        assert cli_main(argv) == 0
        assert f"initialised from {finals[-1]}" in capsys.readouterr().err
        meta = json.loads((run / stage / "final" / "config.json").read_text())
        assert meta["init"] == str(finals[-1]) and meta["stage"] == stage
        assert meta["train"]["kind"] == "chat"
        finals.append(run / stage / "final")
    assert meta["train"]["think_weight"] == 10.0 and meta["train"]["lr"] == 1e-6
    # checkpoint.load: run folder → the latest stage's final; a stage folder; a checkpoint dir.
    for path in (run, run / "distill", finals[-1]):
        assert checkpoint.load(path).meta["path"] == str(finals[-1])
    loaded = checkpoint.load(run / "pretrain")
    assert loaded.meta["stage"] == "pretrain" and not loaded.model.training
    # The tokenizer travelled with every checkpoint.
    tok_json = (tok_dir / "tokenizer.json").read_bytes()
    assert all((f / "tokenizer.json").read_bytes() == tok_json for f in finals)


def test_a_user_error_prints_one_line_through_the_cli(tmp_path, data, capsys):
    argv = ["train", "sft", "--data", str(data), "--out", str(tmp_path / "run")]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spongebob: error:") and "--init" in err[0]


def test_a_later_stage_without_an_earlier_checkpoint_asks_for_init(tmp_path, data, tok_dir):
    with pytest.raises(UserError, match="--init none"):
        train(small("sft", data, tmp_path / "run", tok_dir))


def test_eval_data_logs_validation_loss_perplexity_and_bits_per_byte(tmp_path, data, tok_dir):
    held = write_lines(tmp_path / "held.jsonl", 10, seed=9)
    r = train(small("pretrain", data, tmp_path / "a", tok_dir, eval_data=[str(held)], eval_every=2))
    rec = records(tmp_path / "a")
    evals = [x for x in rec if "eval_loss" in x]
    assert [x["step"] for x in evals] == [2, 4]
    assert evals[-1]["eval_loss"] == pytest.approx(r.eval_loss)
    assert evals[-1]["eval_ppl"] == pytest.approx(torch.tensor(r.eval_loss).exp().item(), rel=1e-5)
    assert evals[-1]["eval_bpb"] > 0  # its exact value: tests/test_evaluate.py


def test_val_split_writes_no_copy_of_the_data_and_validates_on_held_out_documents(
    tmp_path, data, tok_dir
):
    cache = tmp_path / "cache"
    r = train(
        small("pretrain", data, tmp_path / "b", tok_dir, val_split=0.25, cache_dir=str(cache))
    )
    assert r.eval_loss is not None and r.eval_loss > 0
    written = [p for p in tmp_path.rglob("*.jsonl") if p.name != "metrics.jsonl"]
    assert written == [data], written  # no train.jsonl / val.jsonl copies anywhere
    # The resume state and the fingerprint know the split: a run with another split is refused.
    meta = json.loads((r.final / "config.json").read_text())
    assert meta["train"]["val_split"] == 0.25
    # A split that leaves one side empty is a one-line user error, not a traceback.
    tiny = write_lines(tmp_path / "two.jsonl", 2, seed=3)
    with pytest.raises(UserError, match="validation documents"):
        train(small("pretrain", tiny, tmp_path / "c", tok_dir, val_split=0.01))


def test_training_validation_equals_spongebob_eval_on_the_same_file_and_checkpoint(
    tmp_path, data, tok_dir
):
    from spongebob.evaluate import perplexity

    held = tmp_path / "held.jsonl"
    with open(held, "w") as f:
        for i in range(12):
            reply = f"<think>\n{i} + {i} = {2 * i}\n</think>\n<answer>\n{2 * i}\n</answer>"
            msgs = [{"role": "user", "content": f"{i} + {i} = ?"}]
            msgs.append({"role": "assistant", "content": reply})
            f.write(json.dumps({"conversations": msgs}) + "\n")
    r = train(
        small(
            "distill", held, tmp_path / "d", tok_dir, init="none", eval_data=[str(held)],
            eval_batches=0, seq_len=64,
        )
    )  # fmt: skip
    assert r.eval_loss is not None
    final = [x for x in records(tmp_path / "d", "distill") if "eval_loss" in x][-1]
    loaded = checkpoint.load(r.final)
    got = perplexity(loaded.model, loaded.tokenizer, held, seq_len=64)
    assert got["loss"] == pytest.approx(final["eval_loss"], rel=1e-6)
    assert got["ppl"] == pytest.approx(final["eval_ppl"], rel=1e-6)
    assert got["bpb"] == pytest.approx(final["eval_bpb"], rel=1e-6)
    assert got["tokens"] == final["eval_tokens"]
    # think_weight (10 in distill) weighs the training loss, never the reported perplexity.
    meta = json.loads((r.final / "config.json").read_text())
    assert meta["train"]["think_weight"] == 10.0


def test_metrics_jsonl_is_always_written_and_wandb_works_offline(
    tmp_path, data, tok_dir, monkeypatch
):
    import wandb  # noqa: F401  (a test dependency: this test needs it installed)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    r = train(small("pretrain", data, tmp_path / "r", tok_dir, wandb=True, wandb_project="t"))
    rec = records(tmp_path / "r")
    assert [x["step"] for x in rec] == [1, 2, 3, 4]
    assert all(k in rec[-1] for k in ("loss", "lr", "tokens_per_s", "trained_tokens", "epoch"))
    assert rec[-1]["loss"] == pytest.approx(r.loss)
    assert list((tmp_path / "r" / "pretrain" / "wandb").glob("offline-run-*"))
