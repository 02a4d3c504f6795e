"""The generation engine: cache = recomputation, batching = alone, sampling knobs, streaming."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from torch import nn

from spongebob import checkpoint
from spongebob.errors import UserError
from spongebob.generate import (
    REPLACEMENT,
    Generator,
    SamplingConfig,
    StreamDecoder,
    apply_repetition_penalty,
    filter_logits,
    next_tokens,
    top_candidates,
)
from spongebob.model import ModelConfig, SpongeBob

TINY = ModelConfig(
    vocab_size=800, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
    max_seq_len=256,
)  # fmt: skip
GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_ids=[])


def tiny_model(seed: int = 0, sharpen: float = 30.0, **kw) -> SpongeBob:
    """A random model whose logits are far apart (a larger embedding), so greedy choices are
    not decided by float rounding and two correct implementations pick the same tokens.

    The final norm gets random signed weights: with tied embeddings and a fresh init the
    hidden state is mostly the input embedding, so the model would just repeat its last
    token; this makes its output depend on the whole context instead."""
    torch.manual_seed(seed)
    model = SpongeBob(replace(TINY, **kw), kernels="torch", attention="sdpa").eval()
    with torch.no_grad():
        model.embed_tokens.weight.mul_(sharpen)
        model.norm.weight.normal_()
    return model


def load_ckpt(path, **kw):
    """(model, tokenizer, meta) of `checkpoint.load` on the CPU."""
    loaded = checkpoint.load(path, "cpu", **kw)
    return loaded.model, loaded.tokenizer, loaded.meta


def make_checkpoint(path: Path, tok_dir: Path, seed: int = 0, **kw) -> Path:
    """A checkpoint directory in the trainer's layout, holding a tiny random model."""
    from spongebob.checkpoint import save_checkpoint

    model = tiny_model(seed, **kw)
    meta = {"model": asdict(model.config), "stage": "sft", "step": 0}
    return save_checkpoint(path, model, meta, tokenizer_dir=tok_dir)


def full_recompute_greedy(model: SpongeBob, prompt: list[int], n: int) -> tuple[list, list]:
    """The slow reference: rerun the whole sequence for every new token."""
    seq, logits_seen = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1]
            logits_seen.append(logits)
            seq.append(int(logits.argmax()))
    return seq[len(prompt) :], logits_seen


def test_kv_cache_decoding_equals_full_recomputation():
    model = tiny_model()
    prompt = [5, 17, 300, 42, 9, 77, 123]
    expected, ref_logits = full_recompute_greedy(model, prompt, 12)
    got = Generator(model).generate([prompt], GREEDY)[0]
    assert got.ids == expected
    assert got.finish == "length"

    # The cached step logits themselves match the recomputed ones.
    from spongebob.model import KVCache

    cache = KVCache(model.config, 1, 64)
    seq = torch.tensor([prompt])
    with torch.no_grad():
        logits = model(seq, kv_cache=cache)[0, -1]
        for i, ref in enumerate(ref_logits):
            torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
            logits = model(torch.tensor([[expected[i]]]), kv_cache=cache)[0, -1]


def test_left_padded_batch_gives_each_prompt_the_tokens_it_gets_alone():
    model = tiny_model(seed=1)
    prompts = [[7, 8, 9], [100, 200, 300, 400, 500, 600, 700], [3, 1, 4, 1, 5]]
    gen = Generator(model)
    batched = gen.generate(prompts, GREEDY)
    for p, b in zip(prompts, batched, strict=True):
        assert b.ids == gen.generate([p], GREEDY)[0].ids
        assert b.prompt_len == len(p)


def test_greedy_is_deterministic_and_a_seed_fixes_sampling():
    model = tiny_model(seed=2, sharpen=1.0)
    gen = Generator(model)
    prompt = [[11, 12, 13]]
    assert gen.generate(prompt, GREEDY)[0].ids == gen.generate(prompt, GREEDY)[0].ids
    hot = SamplingConfig(max_new_tokens=30, temperature=1.5, top_p=1.0, stop_ids=[], seed=7)
    a = gen.generate(prompt, hot)[0].ids
    assert a == gen.generate(prompt, hot)[0].ids
    assert a != gen.generate(prompt, replace(hot, seed=8))[0].ids


def test_generation_stops_at_the_stop_token_and_drops_it():
    model = tiny_model(seed=3)
    prompt = [20, 21, 22]
    free = Generator(model).generate([prompt], GREEDY)[0].ids
    stop = free[4]
    first = free.index(stop)
    got = Generator(model).generate([prompt], replace(GREEDY, stop_ids=[stop]))[0]
    assert got.finish == "stop"
    assert got.ids == free[:first]


def test_repetition_penalty_lowers_negative_logits_instead_of_raising_them():
    logits = torch.tensor([[2.0, -2.0, 0.5, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 0.5, -1.0]]
    # MiniMind's `logits / penalty` would have given -1.0 for the seen negative logit.
    assert out[0, 1] < logits[0, 1]


def test_repetition_penalty_never_raises_a_seen_logit_nor_touches_unseen_ones():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 50, generator=g) * 5
    seen = torch.rand(8, 50, generator=g) < 0.3
    for penalty in (1.0, 1.1, 1.5, 3.0):
        out = apply_repetition_penalty(logits, seen, penalty)
        assert (out[seen] <= logits[seen]).all()
        assert torch.equal(out[~seen], logits[~seen])


def test_repetition_penalty_in_generation_avoids_a_token_the_model_prefers():
    model = tiny_model(seed=4)
    prompt = [30, 31, 32]
    plain = Generator(model).generate([prompt], replace(GREEDY, max_new_tokens=1))[0].ids[0]
    penalized = SamplingConfig(
        max_new_tokens=1, temperature=0.0, stop_ids=[], repetition_penalty=1e6
    )
    # The favourite is in the prompt now, so a huge penalty must push it off the top.
    got = Generator(model).generate([[*prompt, plain]], penalized)[0].ids[0]
    assert got != plain


def test_top_k_and_top_p_filters_keep_the_right_tokens():
    logits = torch.tensor([[3.0, 1.0, 2.0, -1.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=1e-6)).tolist() == [
        [True, False, False, False]
    ]
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()
    p = torch.softmax(logits, -1)[0]
    # top-p = p(best) + a bit: the two best survive, the others go.
    kept = torch.isfinite(filter_logits(logits, top_p=float(p[0]) + 0.01))
    assert kept.tolist() == [[True, False, True, False]]


@pytest.mark.parametrize("top_k", [0, 1, 5, 50])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5, 1e-6, 0.999999])
def test_top_candidates_give_filter_logits_distribution(top_k, top_p):
    """The fast candidate set (top-k by `topk`, growing k for top-p) gives exactly the
    distribution of the reference `filter_logits` + softmax, on flat and peaked rows. On a row
    of exact ties the reference's top-k keeps every token tied with the k-th; ours keeps k."""
    g = torch.Generator().manual_seed(top_k * 100 + int(top_p * 1000))
    V = 6400
    logits = torch.cat(
        [
            torch.randn(3, V, generator=g) * 0.1,  # flat: top-p needs thousands of tokens
            torch.randn(3, V, generator=g) * 4.0,  # peaked
            torch.full((1, V), 2.0),  # all tied
        ]
    )
    ref = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)
    w, ids = top_candidates(torch.softmax(logits, -1), top_k, top_p)
    got = w if ids is None else torch.zeros_like(ref).scatter(-1, ids, w)
    got = got / got.sum(-1, keepdim=True)
    n = top_k or V  # tied row: top-p over n equal tokens, any n of them
    want = torch.isfinite(filter_logits(torch.full((1, n), 2.0), 0, top_p)).sum()
    assert int((got[-1] > 0).sum()) == int(want)
    torch.testing.assert_close(got[:-1], ref[:-1], rtol=1e-5, atol=1e-7)


def test_sampling_frequencies_follow_the_filtered_distribution():
    """Inverse-CDF draws: each kept token's frequency within 4 standard errors of its
    probability over 40,000 seeded draws; dropped tokens never drawn."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0, 0.0, 0.5]]).repeat(40_000, 1)
    cfg = SamplingConfig(temperature=0.8, top_p=0.9, top_k=0)
    toks = next_tokens(logits, cfg, generator=torch.Generator().manual_seed(0))
    want = torch.softmax(filter_logits(logits[:1] / 0.8, 0, 0.9), -1)[0]
    freq = torch.bincount(toks, minlength=8).double() / len(toks)
    se = (want * (1 - want) / len(toks)).sqrt()
    assert ((freq - want).abs() <= 4 * se + 1e-12).all(), (freq, want)
    assert (freq[want == 0] == 0).all() and (want == 0).any()


def test_empty_prompt_and_out_of_vocab_ids_are_user_errors():
    gen = Generator(tiny_model())
    with pytest.raises(UserError, match="empty prompt"):
        gen.generate([[]], GREEDY)
    with pytest.raises(UserError, match="outside the model's vocab"):
        gen.generate([[1, 900]], GREEDY)


# --- streaming ------------------------------------------------------------------------------

MULTIBYTE = "海绵宝宝🍍 说：你好！Ünïcödé ✓ 𝔘 龘"


def test_stream_decoder_never_emits_half_a_character(chat_tok):
    ids = [int(i) for i in chat_tok.encode(MULTIBYTE)]
    # The test means something only if some token ends inside a character.
    assert any(REPLACEMENT in chat_tok.decode(ids[: i + 1]) for i in range(len(ids)))
    dec = StreamDecoder(chat_tok.decode)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == MULTIBYTE
    for p in pieces:
        p.encode("utf-8")  # whole characters only (a lone surrogate would raise)


class Scripted(nn.Module):
    """A stand-in model that 'predicts' a fixed token sequence, to drive the engine."""

    def __init__(self, script: list[int], vocab: int) -> None:
        super().__init__()
        self.config = replace(TINY, vocab_size=vocab, n_layers=1)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.script = script
        self.calls = 0

    def forward(self, input_ids, position_ids=None, kv_cache=None, attn_mask=None):
        B, T = input_ids.shape
        kv_cache.length += T
        logits = torch.zeros(B, T, self.config.vocab_size)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits


def test_streaming_generation_yields_whole_characters_and_stops_at_eos(chat_tok):
    ids = [int(i) for i in chat_tok.encode(MULTIBYTE)]
    model = Scripted([*ids, chat_tok.eos_id, 5, 6], chat_tok.vocab_size)
    gen = Generator(model, chat_tok)
    stream = gen.stream([1, 5], SamplingConfig(max_new_tokens=100, temperature=0))
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as fin:
            result = fin.value
            break
    assert all(p and REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == MULTIBYTE
    assert len(pieces) > 3  # streamed, not printed at the end
    assert result.ids == ids and result.finish == "stop"


# --- loading --------------------------------------------------------------------------------


def test_loader_takes_a_checkpoint_dir_its_weights_file_or_a_run_folder(tmp_path, tok_dir):
    ckpt = make_checkpoint(tmp_path / "run" / "sft" / "final", tok_dir)
    ref = tiny_model()
    prompt = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        want = ref(prompt)
    for path in (ckpt, ckpt / "model.safetensors", tmp_path / "run"):
        model, tok, meta = load_ckpt(path)
        assert meta["path"] == str(ckpt)
        assert tok.vocab_size == model.config.vocab_size
        with torch.no_grad():
            torch.testing.assert_close(model(prompt), want)


def test_loader_errors_are_one_line_user_errors(tmp_path, tok_dir, minimind_tok_dir):
    with pytest.raises(UserError, match="no such"):
        load_ckpt(tmp_path / "missing")
    ckpt = make_checkpoint(tmp_path / "ckpt", tok_dir)
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="corrupt") as e:
        load_ckpt(ckpt)
    assert "\n" not in str(e.value)

    ckpt = make_checkpoint(tmp_path / "ckpt2", tok_dir)
    with pytest.raises(UserError, match="tokens but the model") as e:
        load_ckpt(ckpt, tokenizer=minimind_tok_dir)
    assert "\n" not in str(e.value)

    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["dim"] = 64
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not fit") as e:
        load_ckpt(ckpt)
    assert "\n" not in str(e.value)


def test_a_generation_records_which_stop_token_ended_it():
    model = Scripted([7, 7, 3, 5], TINY.vocab_size)
    got = Generator(model).generate([[1, 2]], SamplingConfig(temperature=0, stop_ids=[3, 4]))[0]
    assert (got.ids, got.finish, got.stop_id) == ([7, 7], "stop", 3)
    cut = Generator(Scripted([7], TINY.vocab_size)).generate(
        [[1, 2]], SamplingConfig(max_new_tokens=2, temperature=0, stop_ids=[3])
    )[0]
    assert (cut.finish, cut.stop_id) == ("length", None)
