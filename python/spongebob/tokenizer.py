"""Train, describe and save the byte-level BPE tokenizer (DESIGN §3).

Texts stream from jsonl through the Rust `TextStream` (the same record parser the loader uses,
so a line that would fail training also fails here, with its file and line). Training itself is
Hugging Face `tokenizers`' BPE trainer.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from spongebob.data import DEFAULT_SYSTEM, ChatTokenizer, TextStream
from spongebob.errors import UserError

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<think>", "</think>", "<answer>", "</answer>"]

# The Jinja twin of the Rust renderer (rust_dataloader/src/tokenizer.rs). A test renders both.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<s>system\\n" + DEFAULT_SYSTEM + "</s>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<s>assistant\\n' -}}{%- endif -%}"
)


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with no added prefix space (MiniMind's setup)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _check_inputs(paths: list[Path]) -> None:
    if not paths:
        raise UserError("no data files given")
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p}: no such file")


def train_tokenizer(
    paths: list[Path],
    out_dir: Path,
    vocab_size: int = 6400,
    on_bad_line: str = "error",
    show_progress: bool = True,
) -> Path:
    """Train on the texts of `paths` and write `tokenizer.json` + `tokenizer_config.json`."""
    paths = [Path(p) for p in paths]
    _check_inputs(paths)
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(
            f"vocab size {vocab_size} is below 256 bytes + {len(SPECIAL_TOKENS)} specials"
        )
    stream = TextStream([str(p) for p in paths], on_bad_line=on_bad_line)
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    t0 = time.perf_counter()
    log(f"training a {vocab_size}-token byte-level BPE on {len(paths)} file(s)")
    tok.train_from_iterator(stream, trainer=trainer)
    stats = stream.stats()
    log(
        f"read {stats['records']} records ({stats['bytes'] / 1e6:.1f} MB of text) "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    if stats["skipped"]:
        log(f"skipped bad lines: {dict(stats['skipped'])}")
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special {t} landed at {tok.token_to_id(t)}"
    return save_tokenizer(tok, out_dir)


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> Path:
    """Write the tokenizer files that both `ChatTokenizer` and `transformers` load."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
        if tok.token_to_id(t) is not None
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<unk>",
        "unk_token": "<unk>",
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    log(f"wrote {out_dir / 'tokenizer.json'} and tokenizer_config.json")
    return out_dir


def load(path: Path | str) -> ChatTokenizer:
    """Load a tokenizer directory (or tokenizer.json), as a `UserError` if it can't be read."""
    try:
        return ChatTokenizer.from_dir(str(path))
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None


def describe(path: Path | str, data: list[Path] | None = None) -> dict:
    """Vocab size, specials, and characters per token over the texts of `data`."""
    tok = load(path)
    specials = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    info: dict = {"path": str(tok.path), "vocab_size": tok.vocab_size, "specials": specials}
    if data:
        _check_inputs([Path(p) for p in data])
        chars = tokens = 0
        for chunk in TextStream([str(p) for p in data]):
            for text in chunk:
                chars += len(text)
                tokens += len(tok.encode(text))
        info.update(chars=chars, tokens=tokens, chars_per_token=chars / max(tokens, 1))
    return info


def log(msg: str) -> None:
    print(f"[tokenizer] {msg}", file=sys.stderr, flush=True)


def add_commands(sub) -> None:
    """`spongebob tokenizer train|info`."""
    p = sub.add_parser("tokenizer", help="train or inspect the byte-level BPE tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")

    t = tsub.add_parser("train", help="train a tokenizer on jsonl files (pretrain or chat)")
    t.add_argument("--data", nargs="+", type=Path, required=True, metavar="FILE")
    t.add_argument("--vocab-size", type=int, default=6400)
    t.add_argument("--out", type=Path, required=True, metavar="DIR")
    t.add_argument("--on-bad-line", choices=["error", "skip"], default="error")
    t.set_defaults(func=_cmd_train)

    i = tsub.add_parser("info", help="vocab size, specials and compression on a file")
    i.add_argument("dir", type=Path, metavar="DIR")
    i.add_argument("--data", nargs="+", type=Path, metavar="FILE")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=_cmd_info)


def _cmd_train(args) -> int:
    train_tokenizer(args.data, args.out, args.vocab_size, args.on_bad_line)
    return 0


def _cmd_info(args) -> int:
    info = describe(args.dir, args.data)
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=2))
        return 0
    print(f"tokenizer   {info['path']}")
    print(f"vocab size  {info['vocab_size']}")
    print("specials    " + ", ".join(f"{t}={i}" for t, i in info["specials"].items()))
    if "chars_per_token" in info:
        print(
            f"compression {info['chars_per_token']:.3f} chars/token "
            f"({info['chars']} chars, {info['tokens']} tokens)"
        )
    return 0
