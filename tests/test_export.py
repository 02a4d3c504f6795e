"""`spongebob export hf`: transformers loads the folder and computes what we compute."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers

from spongebob.errors import UserError
from spongebob.export import export_hf
from spongebob.generate import Generator, SamplingConfig
from test_generate import load_ckpt


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok_dir):
    from test_generate import make_checkpoint

    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root / "ckpt", tok_dir, seed=11, sharpen=3.0)
    return ckpt, export_hf(ckpt, root / "hf")


@pytest.fixture(scope="module")
def hf_model(exported):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        exported[1], dtype=torch.float32
    ).eval()
    return model


def test_export_writes_the_files_transformers_needs(exported):
    _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"]
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())


def test_transformers_logits_equal_ours_in_fp32(exported, hf_model):
    ckpt, _ = exported
    ours, _, _ = load_ckpt(ckpt)
    assert isinstance(hf_model, transformers.LlamaForCausalLM)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, ours.config.vocab_size, (2, 37), generator=g)
    with torch.no_grad():
        want = ours(ids)
        got = hf_model(ids).logits.float()
    assert want.abs().max() > 1.0  # logits that are not all ~0, so the comparison bites
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_transformers_greedy_generation_gives_our_tokens(exported, hf_model, chat_tok):
    ckpt, _ = exported
    ours, tok, _ = load_ckpt(ckpt)
    gen = Generator(ours, tok)
    generated = 0
    for text in ("你好，你是谁？", "法国的首都是哪里？", "What is 2 + 3?"):
        prompt = [int(i) for i in tok.encode_prompt([{"role": "user", "content": text}])]
        mine = gen.generate([prompt], SamplingConfig(max_new_tokens=16, temperature=0))[0]
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]),
                max_new_tokens=16,
                do_sample=False,
                eos_token_id=tok.eos_id,
                pad_token_id=tok.pad_id,
            )
        theirs = out[0, len(prompt) :].tolist()
        if tok.eos_id in theirs:
            theirs = theirs[: theirs.index(tok.eos_id)]
        assert mine.ids == theirs, text
        generated += len(mine.ids)
    assert generated >= 10  # not three empty replies


def test_exported_tokenizer_renders_and_encodes_the_chat_template_like_ours(exported, chat_tok):
    _, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    msgs = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "法国的首都是哪里？"},
    ]
    rendered = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == chat_tok.render(msgs, add_generation_prompt=True)
    ids = hf_tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids == [int(i) for i in chat_tok.encode_prompt(msgs)]
    assert hf_tok.eos_token_id == chat_tok.eos_id and hf_tok.pad_token_id == chat_tok.pad_id


def test_our_loader_reads_the_exported_folder_back(exported):
    ckpt, out = exported
    a, _, _ = load_ckpt(ckpt)
    b, _, meta = load_ckpt(out)
    assert meta["format"] == "hf"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.config.vocab_size, (1, 12), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids))


def test_bf16_export_and_refusing_to_overwrite(exported, tmp_path):
    ckpt, out = exported
    with pytest.raises(UserError, match="not empty"):
        export_hf(ckpt, out)
    bf = export_hf(ckpt, tmp_path / "bf16", dtype="bfloat16")
    from safetensors.torch import load_file

    weights = load_file(str(bf / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert "lm_head.weight" not in weights  # tied: stored once


def test_export_cli_reports_a_missing_checkpoint_in_one_line(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "spongebob",
            "export",
            "hf",
            "--ckpt",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "hf"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "no such" in res.stderr


def test_a_chatml_checkpoint_exports_its_family_template_specials_and_stops(
    tmp_path, chatml_tok_dir, chatml_tok
):
    """The HF folder of a chatml-family checkpoint formats chats (tools, tool calls, tool
    results, reasoning) as ours does, and generation stops at `<|im_end|>` or `<|endoftext|>`."""
    from test_generate import make_checkpoint

    vocab = chatml_tok.vocab_size
    ckpt = make_checkpoint(tmp_path / "ckpt", chatml_tok_dir, seed=3, vocab_size=vocab)
    out = export_hf(ckpt, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]
    msgs = [
        {"role": "user", "content": "12*3?"},
        {"role": "assistant", "content": "", "reasoning_content": "use the tool",
         "tool_calls": [{"type": "function",
                         "function": {"name": "calc", "arguments": {"expr": "12*3"}}}]},
        {"role": "tool", "content": "36"},
        {"role": "assistant", "content": "36", "reasoning_content": "done"},
        {"role": "user", "content": "谢谢"},
    ]  # fmt: skip
    rendered = hf_tok.apply_chat_template(
        msgs, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert rendered == chatml_tok.render(msgs, add_generation_prompt=True, tools=tools)
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token == "<|endoftext|>"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == list(chatml_tok.stop_ids) and len(gen["eos_token_id"]) == 2
