"""LoRA for any stage: frozen base, PEFT-compatible adapters, small checkpoints, exact resume.

The base is the `tiny` preset (random weights, embeddings sharpened so logits are not ~0) saved
as a checkpoint; runs are seq 32 on generated text lines with the real loader, as in
tests/test_train.py. PEFT and transformers are the references for the adapter maths and files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from spongebob import checkpoint, lora
from spongebob.cli import build_parser
from spongebob.cli import main as cli_main
from spongebob.config import LORA_TARGETS
from spongebob.errors import UserError
from spongebob.export import export_hf
from spongebob.model import SpongeBob, preset
from spongebob.train import config_from_args, train

sys.path.insert(0, str(Path(__file__).parent))
import transformers

from test_train import batches_per_epoch, small
from test_train_helpers import KillAfter, Killed, write_lines

# fp32 logits of two implementations of the same maths (different summation orders): the
# logits here are O(1-10), so 1e-4 is ~1e-5 relative.
LOGITS_ATOL = LOGITS_RTOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_base(path: Path, tok_dir: Path, seed: int = 7) -> Path:
    """A `tiny`-preset checkpoint in the trainer's layout."""
    from spongebob.tokenizer import load as load_tokenizer

    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=load_tokenizer(tok_dir).vocab_size, max_seq_len=256)
    model = SpongeBob(cfg, kernels="torch", attention="sdpa")
    with torch.no_grad():
        model.embed_tokens.weight.mul_(3.0)
        model.norm.weight.normal_()
    meta = {"model": asdict(cfg), "stage": "pretrain", "step": 0}
    return checkpoint.save_checkpoint(path, model, meta, tokenizer_dir=tok_dir)


def lora_checkpoint(path: Path, base: Path, rank=4, alpha=8.0, targets=LORA_TARGETS, seed=3):
    """A LoRA checkpoint of `base` whose B (and A) are random, so the adapter matters."""
    loaded = checkpoint.load(base, kernels="torch", attention="sdpa")
    model = lora.apply_lora(loaded.model, rank, alpha, 0.0, targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    info = {**lora.lora_spec(model).to_dict(), "base": checkpoint.base_reference(base)}
    meta = {"model": asdict(model.config), "stage": "sft", "step": 0, "lora": info}
    return checkpoint.save_checkpoint(path, model, meta, tokenizer_dir=base)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok_dir) -> Path:
    return make_base(tmp_path_factory.mktemp("lora_base") / "base", tok_dir)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, base) -> Path:
    return lora_checkpoint(tmp_path_factory.mktemp("lora_ckpt") / "adapted", base)


@pytest.fixture
def data(tmp_path) -> Path:
    return write_lines(tmp_path / "train.jsonl", 40, seed=1)


def ids_for(model, n=2, t=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n, t), generator=g)


def lora_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, lora.LoRALinear)]


# --- the layer ---------------------------------------------------------------------------------


def test_a_fresh_adapter_leaves_the_logits_of_the_base_model(base):
    plain = checkpoint.load(base, kernels="torch").model
    wrapped = lora.apply_lora(checkpoint.load(base, kernels="torch").model, 8, 16.0)
    layers = lora_layers(wrapped)
    assert len(layers) == 7 * plain.config.n_layers
    for m in layers:
        assert not m.lora_B.weight.any()  # B = 0
        bound = 1 / m.in_features**0.5  # kaiming_uniform(a=√5) on [r, in]: U(±1/√in)
        assert 0.5 * bound < m.lora_A.weight.abs().max() <= bound
    ids = ids_for(plain)
    with torch.no_grad():
        assert torch.equal(wrapped(ids), plain(ids))


def test_the_adapters_initialise_and_are_named_exactly_as_peft_does(base):
    """Same seed, same model: PEFT's get_peft_model draws the same A (bitwise), and its own
    state dict has our names and shapes."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from spongebob.model import hf_config_dict, hf_state_dict

    ours = checkpoint.load(base, kernels="torch").model
    hf_cfg = {k: v for k, v in hf_config_dict(ours.config).items() if k != "architectures"}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg))
    hf.load_state_dict(hf_state_dict(ours))
    torch.manual_seed(5)
    lora.apply_lora(ours, 4, 8.0)
    torch.manual_seed(5)
    theirs = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_TARGETS)))
    want, got = get_peft_model_state_dict(theirs), lora.adapter_state_dict(ours)
    assert sorted(want) == sorted(got) and len(got) == 2 * 7 * ours.config.n_layers
    for k in got:
        assert torch.equal(want[k], got[k]), k


def test_merge_gives_w_plus_scaled_ba_and_plain_linear_layers_again(adapted):
    unmerged = checkpoint.load(adapted, kernels="torch", merge_lora=False).model
    q = unmerged.layers[0].self_attn.q_proj
    assert isinstance(q, lora.LoRALinear) and q.scaling == 8.0 / 4
    want = q.weight + 2.0 * q.lora_B.weight @ q.lora_A.weight
    ids = ids_for(unmerged)
    with torch.no_grad():
        before = unmerged(ids)
        lora.merge_lora(unmerged)
        after = unmerged(ids)
    merged_q = unmerged.layers[0].self_attn.q_proj
    assert type(merged_q) is torch.nn.Linear and not lora.has_lora(unmerged)
    torch.testing.assert_close(merged_q.weight, want, atol=1e-6, rtol=0)
    assert all(p.requires_grad for p in unmerged.parameters())
    torch.testing.assert_close(after, before, atol=LOGITS_ATOL, rtol=LOGITS_RTOL)


# --- peft and transformers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, base, adapted):
    root = tmp_path_factory.mktemp("lora_export")
    hf_base = export_hf(base, root / "hf-base")
    adapter = export_hf(adapted, root / "adapter", adapter_only=True, base_model=str(hf_base))
    merged = export_hf(adapted, root / "merged")
    return hf_base, adapter, merged


def test_adapter_folder_has_peft_files_and_config(exported, adapted):
    hf_base, adapter, _ = exported
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (4, 8, False)
    assert cfg["target_modules"] == list(LORA_TARGETS)
    assert cfg["base_model_name_or_path"] == str(hf_base)
    want = load_file(str(adapted / "adapter_model.safetensors"))
    got = load_file(str(adapter / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_our_unmerged_lora_logits_equal_peft_on_the_exported_base(exported, adapted, base):
    from peft import PeftModel

    hf_base, adapter, _ = exported
    ours = checkpoint.load(adapted, kernels="torch", attention="sdpa", merge_lora=False).model
    assert lora.has_lora(ours)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(hf, adapter).eval()
    plain = checkpoint.load(base, kernels="torch").model
    ids = ids_for(ours)
    with torch.no_grad():
        want = ours(ids)
        got = theirs(input_ids=ids).logits.float()
        without = plain(ids)
    # The adapter moves the logits far more than the tolerance, so the comparison bites.
    assert (want - without).abs().max() > 100 * LOGITS_ATOL
    print(f"max |ours - peft| = {(got - want).abs().max().item():.2e}")
    torch.testing.assert_close(got, want, atol=LOGITS_ATOL, rtol=LOGITS_RTOL)


def test_the_merged_export_gives_the_same_logits_in_transformers(exported, adapted):
    _, _, merged = exported
    ours = checkpoint.load(adapted, kernels="torch", merge_lora=False).model
    hf = transformers.LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert not any("lora" in k for k in load_file(str(merged / "model.safetensors")))
    ids = ids_for(ours, seed=1)
    with torch.no_grad():
        want = ours(ids)
        got = hf(ids).logits.float()
    print(f"max |ours - merged transformers| = {(got - want).abs().max().item():.2e}")
    torch.testing.assert_close(got, want, atol=LOGITS_ATOL, rtol=LOGITS_RTOL)


def test_checkpoint_load_merges_so_every_consumer_sees_a_plain_model(adapted):
    loaded = checkpoint.load(adapted, kernels="torch")
    assert not lora.has_lora(loaded.model) and not loaded.model.training
    assert loaded.meta["lora"]["rank"] == 4 and loaded.meta["path"] == str(adapted)
    unmerged = checkpoint.load(adapted, kernels="torch", merge_lora=False).model
    ids = ids_for(unmerged, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), unmerged(ids), atol=1e-5, rtol=1e-5)


def test_adapter_only_export_refuses_a_full_checkpoint(base, tmp_path):
    with pytest.raises(UserError, match="not a LoRA checkpoint"):
        export_hf(base, tmp_path / "a", adapter_only=True)
    with pytest.raises(UserError, match="--adapter-only"):
        export_hf(base, tmp_path / "b", base_model="x")


# --- size ---------------------------------------------------------------------------------------


def test_a_rank_8_checkpoint_of_the_spongebob_preset_is_at_most_5_percent_of_the_full_one(
    tmp_path, tok_dir
):
    model = SpongeBob(preset("spongebob"), kernels="torch")
    assert model.num_parameters() == 28_975_616
    meta = {"model": asdict(model.config), "stage": "sft", "step": 0}
    full = checkpoint.save_checkpoint(tmp_path / "full", model, meta, tokenizer_dir=tok_dir)
    lora.apply_lora(model, 8, 16.0)
    meta["lora"] = {**lora.lora_spec(model).to_dict(), "base": checkpoint.base_reference(full)}
    small_ckpt = checkpoint.save_checkpoint(tmp_path / "lora", model, meta, tokenizer_dir=tok_dir)

    def size(d: Path) -> int:
        return sum(p.stat().st_size for p in d.iterdir())

    weights = (small_ckpt / "adapter_model.safetensors").stat().st_size / (
        full / "model.safetensors"
    ).stat().st_size
    ratio = size(small_ckpt) / size(full)
    print(
        f"rank-8 LoRA checkpoint: {size(small_ckpt):,} of {size(full):,} bytes = "
        f"{100 * ratio:.2f} % (weights file {100 * weights:.2f} %, "
        f"{lora.adapter_parameters(model):,} parameters)"
    )
    assert not (small_ckpt / "model.safetensors").exists()
    assert ratio <= 0.05 and weights <= 0.05


# --- training ---------------------------------------------------------------------------------


def test_only_the_adapters_change_during_training(tmp_path, data, tok_dir, base):
    from spongebob.runtime import Runtime
    from spongebob.stage import prepare
    from spongebob.step import optimizer_step

    cfg = small("pretrain", data, tmp_path / "r", tok_dir, init=str(base), lora_rank=4)
    rt = Runtime(torch.device("cpu"), torch.float32)
    st = prepare(cfg, rt)
    trainable = {n for n, p in st.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    in_opt = sum(p.numel() for g in st.opt.param_groups for p in g["params"])
    assert in_opt == lora.adapter_parameters(st.model)
    before = {k: v.clone() for k, v in st.model.state_dict().items()}
    base_weights = load_file(str(base / "model.safetensors"))
    stream = iter(st.data)
    params = list(st.model.parameters())
    for _ in range(4):
        res = optimizer_step(st.train_model, params, st.opt, [next(stream)], 1e-2, 1.0, rt)
        assert res.loss is not None
    after = st.model.state_dict()
    for k, v in after.items():
        if ".lora_" in k:
            assert not torch.equal(v, before[k]), f"{k} did not train"
        else:
            assert torch.equal(v, before[k]) and torch.equal(v, base_weights[k]), k


def test_a_lora_run_writes_a_small_checkpoint_that_refers_to_its_base(
    tmp_path, data, tok_dir, base
):
    r = train(small("pretrain", data, tmp_path / "r", tok_dir, init=str(base), lora_rank=4))
    names = {p.name for p in r.final.iterdir()}
    assert {"adapter_model.safetensors", "config.json", "tokenizer.json", "train_state.pt"} <= names
    assert "model.safetensors" not in names
    meta = json.loads((r.final / "config.json").read_text())
    info = meta["lora"]
    assert (info["rank"], info["alpha"], info["dropout"]) == (4, 16.0, 0.0)
    assert info["base"]["path"] == str(base.resolve())
    assert info["base"]["sha256"] == checkpoint.file_sha256(base / "model.safetensors")
    assert meta["parameters"] == checkpoint.load(base).model.num_parameters()
    state = torch.load(r.final / "train_state.pt", weights_only=True)
    n_adapters = len(load_file(str(r.final / "adapter_model.safetensors")))
    assert len(state["optimizer"]["state"]) == n_adapters
    # Trained: the merged model is not the base.
    merged = checkpoint.load(r.final, kernels="torch").model
    ids = ids_for(merged)
    with torch.no_grad():
        assert not torch.equal(merged(ids), checkpoint.load(base, kernels="torch").model(ids))


def test_resume_of_a_lora_run_continues_exactly(tmp_path, data, tok_dir, base):
    from spongebob.data import PackedDataset

    kw = dict(
        init=str(base), lora_rank=4, lora_alpha=8.0, lora_dropout=0.1,
        lora_targets=["q_proj", "v_proj", "down_proj"], batch_size=2, accum=2, max_steps=9,
        save_every=3,
    )  # fmt: skip
    a = train(small("pretrain", data, tmp_path / "a", tok_dir, **kw))

    def dies_in_step_5(paths, tok, **k):
        return KillAfter(PackedDataset(paths, tok, **k), n=9)

    with pytest.raises(Killed):
        train(small("pretrain", data, tmp_path / "b", tok_dir, **kw), dies_in_step_5)
    stage_b = tmp_path / "b" / "pretrain"
    assert checkpoint.latest_checkpoint(stage_b).name == "step_00000003"
    assert not (stage_b / "final").exists()
    b = train(small("pretrain", data, tmp_path / "b", tok_dir, **kw, resume=True))
    assert b.step == a.step == 9

    wa = load_file(str(a.final / "adapter_model.safetensors"))
    wb = load_file(str(b.final / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) == 2 * 3 * 2
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa = torch.load(a.final / "train_state.pt", weights_only=True)
    sb = torch.load(b.final / "train_state.pt", weights_only=True)
    assert sa["loader"] == sb["loader"]
    n = batches_per_epoch(data, tok_dir, batch_size=2)
    assert n < 18 and (sa["loader"][0]["epoch"], sa["loader"][0]["batches"]) == divmod(18, n)
    for x, y in zip(
        sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(), strict=True
    ):
        assert all(torch.equal(x[n], y[n]) for n in ("exp_avg", "exp_avg_sq", "step"))
    steps = [json.loads(x) for x in (stage_b / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in steps if "loss" in x] == list(range(1, 10))
    # Resuming with other LoRA settings is refused.
    c = small("pretrain", data, tmp_path / "c", tok_dir, **{**kw, "max_steps": 4})
    train(c)
    shutil.rmtree(tmp_path / "c" / "pretrain" / "final")
    other = small("pretrain", data, tmp_path / "c", tok_dir, **{**kw, "lora_rank": 8}, resume=True)
    with pytest.raises(UserError, match="lora_rank"):
        train(other)


def test_a_later_stage_starts_from_the_merged_weights_of_a_lora_stage(
    tmp_path, data, tok_dir, base
):
    from spongebob.runtime import Runtime
    from spongebob.stage import prepare

    run = tmp_path / "run"
    chat = write_lines(tmp_path / "chat.jsonl", 30, seed=2, kind="chat")
    train(small("sft", chat, run, tok_dir, init=str(base), lora_rank=4, seq_len=64))
    cfg = small("sft-long", chat, run, tok_dir, seq_len=64)
    st = prepare(cfg, Runtime(torch.device("cpu"), torch.float32))
    assert st.init == run / "sft" / "final" and not lora.has_lora(st.model)
    assert all(p.requires_grad for p in st.model.parameters())
    merged = checkpoint.load(run / "sft" / "final", kernels="torch").model.state_dict()
    got = st.model.state_dict()
    assert merged.keys() == got.keys()
    assert all(torch.equal(merged[k], got[k]) for k in merged)
    assert not torch.equal(merged["layers.0.mlp.up_proj.weight"], load_file(
        str(base / "model.safetensors"))["layers.0.mlp.up_proj.weight"])  # fmt: skip
    # LoRA on a LoRA stage: its base is that stage's checkpoint (merged when loaded).
    r = train(small("sft-long", chat, run, tok_dir, seq_len=64, lora_rank=2, max_steps=2))
    info = json.loads((r.final / "config.json").read_text())["lora"]
    assert info["base"]["path"] == str((run / "sft" / "final").resolve())
    chained = checkpoint.load(run, kernels="torch")
    assert chained.meta["path"] == str(r.final) and not lora.has_lora(chained.model)
    unmerged = checkpoint.load(r.final, kernels="torch", merge_lora=False).model
    ids = ids_for(unmerged)
    with torch.no_grad():
        torch.testing.assert_close(chained.model(ids), unmerged(ids), atol=1e-5, rtol=1e-5)


# --- refusals ---------------------------------------------------------------------------------


def test_a_lora_checkpoint_whose_base_is_gone_or_changed_is_a_one_line_user_error(
    tmp_path, tok_dir, capsys
):
    root = tmp_path / "run"
    base = make_base(root / "pretrain" / "final", tok_dir)
    adapted = lora_checkpoint(root / "sft" / "final", base)
    # The run folder moved as a whole: the base is found next to it again.
    moved = tmp_path / "moved"
    root.rename(moved)
    loaded = checkpoint.load(moved / "sft" / "final")
    assert loaded.meta["lora"]["base"]["path"] == str((moved / "pretrain" / "final").resolve())

    base, adapted = moved / "pretrain" / "final", moved / "sft" / "final"
    w = load_file(str(base / "model.safetensors"))
    w["norm.weight"] = w["norm.weight"] + 1e-3
    save_file(w, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="changed since the LoRA adapters were trained") as e:
        checkpoint.load(adapted)
    assert "\n" not in str(e.value)

    shutil.rmtree(base)
    with pytest.raises(UserError, match="is missing") as e:
        checkpoint.load(adapted)
    assert "\n" not in str(e.value)
    capsys.readouterr()
    assert cli_main(["export", "hf", "--ckpt", str(adapted), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "base checkpoint" in err[0] and "missing" in err[0]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lora_rank": -1}, "--lora-rank"),
        ({"lora_rank": 4, "lora_alpha": 0.0}, "--lora-alpha"),
        ({"lora_rank": 4, "lora_dropout": 1.0}, "--lora-dropout"),
        ({"lora_rank": 4, "lora_dropout": -0.1}, "--lora-dropout"),
        ({"lora_rank": 4, "lora_targets": ["lm_head"]}, "unknown projection 'lm_head'"),
        ({"lora_rank": 4, "lora_targets": []}, "--lora-targets"),
        ({"lora_rank": 4, "lora_targets": ["q_proj", "q_proj"]}, "twice"),
    ],
)
def test_bad_lora_flag_values_are_user_errors(kw, match, tmp_path, tok_dir):
    with pytest.raises(UserError, match=match) as e:
        small("pretrain", tmp_path / "x.jsonl", tmp_path / "r", tok_dir, **kw)
    assert "\n" not in str(e.value)


def test_lora_flags_parse_and_lora_without_a_base_is_refused(tmp_path, data, tok_dir, capsys):
    p = build_parser()
    base = ["train", "sft", "--data", "x.jsonl", "--out", "run"]
    cfg = config_from_args(p.parse_args(base))
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == (0, 16.0, 0.0)
    assert cfg.lora_targets == list(LORA_TARGETS)
    extra = "--lora-rank 8 --lora-alpha 32 --lora-dropout 0.05 --lora-targets q_proj v_proj"
    cfg = config_from_args(p.parse_args([*base, *extra.split()]))
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == (8, 32.0, 0.05)
    assert cfg.lora_targets == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match="--init CKPT"):
        train(small("pretrain", data, tmp_path / "r", tok_dir, lora_rank=4))
    argv = ["train", "pretrain", "--data", str(data), "--out", str(tmp_path / "r2"), "--tokenizer"]
    argv += [str(tok_dir), "--lora-rank", "-2", "--device", "cpu"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora-rank" in err[0]


def test_export_cli_writes_an_adapter_folder(adapted, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert (
        cli_main(["export", "hf", "--ckpt", str(adapted), "--out", str(out), "--adapter-only"]) == 0
    )
    err = capsys.readouterr().err
    assert "spongebob export hf --ckpt" in err  # how to export the base it needs
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (
        cfg["base_model_name_or_path"]
        == json.loads((adapted / "config.json").read_text())["lora"]["base"]["path"]
    )
    res = subprocess.run(
        [sys.executable, "-m", "spongebob", "export", "hf", "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "--adapter-only" in res.stdout and "--base-model" in res.stdout
