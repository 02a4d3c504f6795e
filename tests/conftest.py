"""Shared fixtures: small tokenizers trained once per session, on generated data."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import reference as ref

# `python -m pytest` puts the repository root on sys.path, where the top-level `kernels` folder
# (a link to spongebob/kernels) shadows the PyPI package `kernels` that transformers ≥ 5.25
# imports as soon as it is installed (ImportError: cannot import name 'CUDAProperties').
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

VOCAB = 800


@pytest.fixture(scope="session")
def train_corpus(tmp_path_factory) -> list[Path]:
    """A mixed pretrain + chat corpus for tokenizer training (Chinese, English, tags, emoji)."""
    rng = random.Random(1234)
    d = tmp_path_factory.mktemp("train_corpus")
    text = ref.write_jsonl(d / "pretrain.jsonl", ref.text_objs(rng, 600))
    chat = ref.write_jsonl(d / "chat.jsonl", ref.chat_objs(rng, 300))
    return [text, chat]


@pytest.fixture(scope="session")
def tok_dir(train_corpus, tmp_path_factory) -> Path:
    """Our tokenizer (7 specials), trained by the project's own `train_tokenizer`."""
    from spongebob.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(train_corpus, out, vocab_size=VOCAB, show_progress=False)
    return out


@pytest.fixture(scope="session")
def chatml_tok_dir(train_corpus, tmp_path_factory) -> Path:
    """A chatml tokenizer (MiniMind-3's specials: `<|endoftext|> <|im_start|> <|im_end|>`, then
    the think and tool tags), trained by `train_tokenizer(..., template="chatml")`; its
    `tokenizer_config.json` holds our chatml Jinja template."""
    from spongebob.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("chatml_tok")
    train_tokenizer(train_corpus, out, vocab_size=VOCAB, show_progress=False, template="chatml")
    return out


@pytest.fixture(scope="session")
def chatml_tok(chatml_tok_dir):
    from spongebob.data import ChatTokenizer

    return ChatTokenizer.from_dir(str(chatml_tok_dir))


@pytest.fixture(scope="session")
def minimind_tok_dir(train_corpus, tmp_path_factory) -> Path:
    """A MiniMind-style tokenizer: byte-level BPE with only `<unk>`, `<s>`, `</s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from spongebob.data import TextStream

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TextStream([str(p) for p in train_corpus]), trainer=trainer)
    out = tmp_path_factory.mktemp("minimind_tok")
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="session")
def hf_tok(tok_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def chat_tok(tok_dir):
    from spongebob.data import ChatTokenizer

    return ChatTokenizer.from_dir(str(tok_dir))


@pytest.fixture(scope="session", params=["ours", "minimind"])
def tok_pair(request, tok_dir, minimind_tok_dir):
    """(name, Rust ChatTokenizer, reference encoder) for both tokenizer styles."""
    from tokenizers import Tokenizer

    from spongebob.data import DEFAULT_SYSTEM, ChatTokenizer

    d = tok_dir if request.param == "ours" else minimind_tok_dir
    hf = Tokenizer.from_file(str(d / "tokenizer.json"))
    return request.param, ChatTokenizer.from_dir(str(d)), ref.RefEncoder(hf, DEFAULT_SYSTEM)


@pytest.fixture(scope="session")
def loader_files(tmp_path_factory) -> dict[str, list[Path]]:
    """Small jsonl files for the loader: two text files and two chat files.

    Documents of many lengths (some longer than the test seq_lens), unknown extra keys, a few
    blank lines, literal markers and tags in the text.
    """
    rng = random.Random(4321)
    d = tmp_path_factory.mktemp("loader_data")
    t1 = ref.write_jsonl(d / "text_a.jsonl", ref.text_objs(rng, 45), extra_keys=True)
    t2 = ref.write_jsonl(d / "text_b.jsonl", ref.text_objs(rng, 30, long_every=3))
    c1 = ref.write_jsonl(d / "chat_a.jsonl", ref.chat_objs(rng, 45), extra_keys=True)
    c2 = ref.write_jsonl(d / "chat_b.jsonl", ref.chat_objs(rng, 30, long_every=3))
    for p in (t2, c2):  # blank lines are not records
        lines = p.read_bytes().split(b"\n")
        lines.insert(5, b"")
        lines.insert(9, b"   ")
        p.write_bytes(b"\n".join(lines))
    return {"text": [t1, t2], "chat": [c1, c2]}


# --- PackedDataset helpers

_REF_CACHE: dict = {}


@pytest.fixture(scope="session")
def make_ref():
    """make_ref(paths, tok_dir, kind, **kw) → reference dataset; encoding is memoised."""
    from tokenizers import Tokenizer

    from spongebob.data import DEFAULT_SYSTEM

    def make(paths, tok_dir, kind, memo=True, **kw) -> ref.RefPacked:
        key = (tuple(map(str, paths)), str(tok_dir), kind, kw.get("on_bad_line", "error"))
        if not memo or key not in _REF_CACHE:
            hf = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
            built = ref.RefPacked(paths, hf, DEFAULT_SYSTEM, kind=kind, **kw)
            if not memo:
                return built
            _REF_CACHE[key] = built
        r = ref.RefPacked.__new__(ref.RefPacked)
        r.__dict__.update(_REF_CACHE[key].__dict__)
        defaults = dict(
            seq_len=64,
            batch_size=2,
            seed=0,
            rank=0,
            world_size=1,
            think_weight=1.0,
            holdout=0.0,
            split="train",
        )
        for name, value in defaults.items():
            setattr(r, name, kw.get(name, value))
        return r

    return make


@pytest.fixture(scope="session")
def make_ds():
    """make_ds(paths, chat_tokenizer, kind, **kw) → PackedDataset."""
    from spongebob.data import PackedDataset

    def make(paths, tok, kind, **kw):
        return PackedDataset([str(p) for p in paths], tok, kind=kind, **kw)

    return make
