"""Train, describe and save the byte-level BPE tokenizer (contracts.md §2).

Two trainers, one result format (a standard `tokenizer.json`):

* `bounded` (the default): the Rust `train_bpe_bounded` (rust_dataloader/src/tokenizer_train/)
  counts pre-tokens in a table whose training cost is capped by `max_memory`; when it is full,
  its rarest pieces are cut at their weakest character link (never dropped), then the
  `tokenizers` crate's own BPE trainer runs on the table. Peak memory is set by the flag, not by
  the corpus; when the corpus fits, the result is the plain trainer's, merge for merge.
* `plain`: Hugging Face `tokenizers`' Python trainer fed by the Rust `TextStream`. It keeps every
  distinct pre-token, ~80-90x the corpus in RAM on Chinese text.

Both read jsonl with the loader's record parser, so a line that would fail training fails here,
with its file and line.

`--template` picks the chat template family the tokenizer is made for (rust_dataloader/src/
template.rs): `minimind2` (`<unk> <s> </s>` and the four reasoning tags, ids 0-6) or `chatml`
(MiniMind-3's `<|endoftext|> <|im_start|> <|im_end|>` special, then `<think> </think>
<tool_call> </tool_call> <tool_response> </tool_response>` as plain added tokens, ids 0-8). The
saved `tokenizer_config.json` names the family's specials and holds its Jinja chat template, so
`ChatTokenizer.from_dir` finds the family again.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from spongebob.data import (
    SPECIAL_TOKENS,  # noqa: F401 (defined in Rust; importable from here too)
    TEMPLATES,
    ChatTokenizer,
    DataFormatError,
    TextStream,
    template_info,
    train_bpe_bounded,
)
from spongebob.errors import UserError

TRAINERS = ("bounded", "plain")
DEFAULT_TEMPLATE = "minimind2"


def chat_template(template: str = DEFAULT_TEMPLATE) -> str:
    """The Jinja twin of a family's Rust renderer (rust_dataloader/src/template.rs); tests
    render both and compare."""
    return template_info(template)["chat_template"]


# The default family's Jinja template (what exports write when a folder has none).
CHAT_TEMPLATE = chat_template(DEFAULT_TEMPLATE)


def _family(template: str) -> dict:
    if template not in TEMPLATES:
        raise UserError(f"unknown template {template!r} (expected one of {', '.join(TEMPLATES)})")
    return template_info(template)


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with no added prefix space (MiniMind's setup), except that
    every digit is its own pre-token (as in LLaMA): numbers then share digit tokens, so a small
    model can learn arithmetic digit by digit instead of memorising one token per number."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
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
    trainer: str = "bounded",
    max_memory: str | int | None = None,
    num_threads: int | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> Path:
    """Train on the texts of `paths` and write `tokenizer.json` + `tokenizer_config.json`.

    `trainer="bounded"` keeps the peak RSS of the process under `max_memory` (bytes, or a
    size such as "2GB" / "512MB"; default 2 GB, or 1 GB above what the process already holds
    if that is more); `trainer="plain"` is Hugging Face's trainer, unbounded. `template`: the
    chat template family whose added tokens the tokenizer reserves at the first ids.
    """
    paths = [Path(p) for p in paths]
    _check_inputs(paths)
    family = _family(template)
    specials = list(family["specials"])
    if vocab_size < 256 + len(specials):
        raise UserError(f"vocab size {vocab_size} is below 256 bytes + {len(specials)} specials")
    if trainer not in TRAINERS:
        raise UserError(f"unknown trainer {trainer!r} (expected one of {', '.join(TRAINERS)})")
    t0 = time.perf_counter()
    log(f"training a {vocab_size}-token byte-level BPE on {len(paths)} file(s) ({trainer} trainer)")
    if trainer == "bounded":
        tok = _train_bounded(paths, vocab_size, on_bad_line, max_memory, num_threads, t0, specials)
    else:
        tok = _train_plain(paths, vocab_size, on_bad_line, show_progress, t0, specials)
    _mark_added(tok, family)
    for i, t in enumerate(specials):
        assert tok.token_to_id(t) == i, f"special {t} landed at {tok.token_to_id(t)}"
    return save_tokenizer(tok, out_dir, template)


def _mark_added(tok: Tokenizer, family: dict) -> None:
    """The family's added tokens after its first `num_special` are plain added tokens (as in
    MiniMind: `<think>` survives `skip_special_tokens`)."""
    n = family["num_special"]
    rest = list(family["specials"])[n:]
    if rest:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in rest])


def _train_plain(
    paths: list[Path],
    vocab_size: int,
    on_bad_line: str,
    show_progress: bool,
    t0: float,
    specials: list[str],
) -> Tokenizer:
    stream = TextStream([str(p) for p in paths], on_bad_line=on_bad_line)
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(stream, trainer=trainer)
    stats = stream.stats()
    log(
        f"read {stats['records']} records ({stats['bytes'] / 1e6:.1f} MB of text) "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    if stats["skipped"]:
        log(f"skipped bad lines: {dict(stats['skipped'])}")
    return tok


def _train_bounded(
    paths: list[Path],
    vocab_size: int,
    on_bad_line: str,
    max_memory: str | int | None,
    num_threads: int | None,
    t0: float,
    specials: list[str],
) -> Tokenizer:
    try:
        model_json, stats = train_bpe_bounded(
            [str(p) for p in paths],
            vocab_size,
            specials,
            max_memory,
            on_bad_line=on_bad_line,
            num_threads=num_threads,
        )
    except DataFormatError:
        raise
    except ValueError as e:  # a budget too small, a bad size string, no records
        raise UserError(str(e)) from None
    model = json.loads(model_json)
    tok = new_tokenizer()
    tok.model = models.BPE(model["vocab"], [tuple(m) for m in model["merges"]])
    tok.add_special_tokens(specials)
    mb = 1 << 20
    log(
        f"read {stats['records']} records ({stats['bytes'] / 1e6:.1f} MB of text, "
        f"{stats['pieces']} pre-tokens) in {stats['count_secs']:.1f}s"
    )
    if stats["prunes"]:
        log(
            f"count table over its budget ({stats['table_budget'] / mb:.0f} MB of estimated "
            f"training memory) {stats['prunes']} times: {stats['cut']} rare pieces cut at "
            "their weakest link"
        )
    log(
        f"trained on {stats['words']} distinct pieces (est. {stats['table_cost'] / mb:.0f} MB) "
        f"in {stats['train_secs']:.1f}s; {time.perf_counter() - t0:.1f}s in all"
    )
    if stats["skipped"]:
        log(f"skipped bad lines: {dict(stats['skipped'])}")
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path, template: str = DEFAULT_TEMPLATE) -> Path:
    """Write the tokenizer files that both `ChatTokenizer` and `transformers` load: the
    family's specials and its chat template in `tokenizer_config.json`."""
    family = _family(template)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    specials = list(family["specials"])
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": i < family["num_special"],
        }
        for i, t in enumerate(specials)
        if tok.token_to_id(t) is not None
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": family["bos"],
        "eos_token": family["eos"],
        "pad_token": family["pad"],
        "unk_token": family["pad"],
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "chat_template": family["chat_template"],
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    log(f"wrote {out_dir / 'tokenizer.json'} and tokenizer_config.json")
    return out_dir


def load(path: Path | str, template: str | None = None, empty_think: str = "keep") -> ChatTokenizer:
    """Load a tokenizer directory (or tokenizer.json), as a `UserError` if it can't be read.
    `template` overrides the family the folder names; `empty_think` ("keep" or "drop") is what
    chatml training does with the empty think block of a turn without reasoning."""
    try:
        return ChatTokenizer.from_dir(str(path), template=template, empty_think=empty_think)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None


def describe(path: Path | str, data: list[Path] | None = None) -> dict:
    """Vocab size, specials, and characters per token over the texts of `data`."""
    tok = load(path)
    specials = {t: tok.token_to_id(t) for t in template_info(tok.template)["specials"]}
    info: dict = {
        "path": str(tok.path),
        "vocab_size": tok.vocab_size,
        "template": tok.template,
        "specials": specials,
    }
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
    t.add_argument(
        "--trainer",
        choices=TRAINERS,
        default="bounded",
        help="bounded: peak memory capped by --max-memory (default); plain: Hugging Face's "
        "trainer, which needs ~90x the corpus in RAM on Chinese text",
    )
    t.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="peak memory of the bounded trainer, e.g. 512MB, 4GB (default 2GB)",
    )
    t.add_argument("--threads", type=int, default=None, help="counting/training threads")
    t.add_argument(
        "--template",
        choices=TEMPLATES,
        default=DEFAULT_TEMPLATE,
        help="chat template family whose special tokens the tokenizer gets (default minimind2; "
        "chatml: MiniMind-3's <|im_start|> / <|im_end|>, think and tool tags)",
    )
    t.set_defaults(func=_cmd_train)

    i = tsub.add_parser("info", help="vocab size, specials and compression on a file")
    i.add_argument("dir", type=Path, metavar="DIR")
    i.add_argument("--data", nargs="+", type=Path, metavar="FILE")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=_cmd_info)


def _cmd_train(args) -> int:
    train_tokenizer(
        args.data,
        args.out,
        args.vocab_size,
        args.on_bad_line,
        trainer=args.trainer,
        max_memory=args.max_memory,
        num_threads=args.threads,
        template=args.template,
    )
    return 0


def _cmd_info(args) -> int:
    info = describe(args.dir, args.data)
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=2))
        return 0
    print(f"tokenizer   {info['path']}")
    print(f"vocab size  {info['vocab_size']}")
    print(f"template    {info['template']}")
    print("specials    " + ", ".join(f"{t}={i}" for t, i in info["specials"].items()))
    if "chars_per_token" in info:
        print(
            f"compression {info['chars_per_token']:.3f} chars/token "
            f"({info['chars']} chars, {info['tokens']} tokens)"
        )
    return 0
