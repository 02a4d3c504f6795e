"""Plain-Python reference of the loader contract (contracts.md §1–§3).

Written from the spec text, independently of `rust_dataloader/`. Slow on purpose: lists and
loops, no shortcuts, so that each line can be read against the contract. The tests compare the
Rust `ChatTokenizer` / `PackedDataset` with what this module computes.

Pieces:
* `plain_encode`: token ids of a text without matching added tokens.
* `parse_line` / `read_documents`: jsonl records, validation, the bad-line reason codes.
* `RefEncoder`: documents and conversations → (ids, classes); classes → weights.
* `holdout_hash`, `split_documents`: the validation split (which documents a split serves).
* `epoch_perm`, `text_rows`, `chat_rows`, `row_arrays`, `rank_batches`: the epoch plan.
* `RefPacked`: all of it together, the reference twin of `PackedDataset`.
* `random_*` / `write_jsonl`: generated test data (shared by the tests and conftest).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IGNORE = -100
BOS, EOS = "<s>", "</s>"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
ROLES = ("system", "user", "assistant")
REASONS = (
    "invalid_utf8",
    "invalid_json",
    "bad_schema",
    "unknown_role",
    "empty_conversation",
    "no_assistant",
    "empty_file",
)
UNTRAINED, TRAINED, TAG = 0, 1, 2
MASK64 = (1 << 64) - 1
JSON_WHITESPACE = b" \t\r\n"
BOM = b"\xef\xbb\xbf"


# --------------------------------------------------------------------------------------------
# plain encoding


def plain_encode(tok, text: str) -> list[int]:
    """Ids of `text` through normalizer → pre-tokenizer → model, never matching added tokens."""
    if not text:
        return []
    if tok.normalizer is not None:
        text = tok.normalizer.normalize_str(text)
    if tok.pre_tokenizer is not None:
        pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
    else:
        pieces = [text]
    ids: list[int] = []
    for piece in pieces:
        ids.extend(t.id for t in tok.model.tokenize(piece))
    return ids


# --------------------------------------------------------------------------------------------
# jsonl records


class BadLine(Exception):
    """A jsonl line (or file) that is not a record; `reason` is one of REASONS."""

    def __init__(self, reason: str, path: str | None = None, line: int | None = None):
        assert reason in REASONS, reason
        self.reason, self.path, self.line = reason, path, line
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {reason}")


def _reject_constant(name: str):
    # Python's json accepts NaN / Infinity; JSON (and serde_json) does not.
    raise ValueError(f"not JSON: {name}")


def _has_lone_surrogate(obj) -> bool:
    if isinstance(obj, str):
        return any(0xD800 <= ord(ch) <= 0xDFFF for ch in obj)
    if isinstance(obj, list):
        return any(_has_lone_surrogate(x) for x in obj)
    if isinstance(obj, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in obj.items())
    return False


def is_blank(raw: bytes) -> bool:
    """Blank lines (only JSON whitespace) are not records."""
    return raw.strip(JSON_WHITESPACE) == b""


def parse_line(raw: bytes, kind: str):
    """One non-blank line → the record (`str` text, or a list of `{role, content}` messages).

    Raises `BadLine(reason)`. Order of checks: UTF-8, JSON (lone surrogate escapes count as
    invalid JSON), schema (object, key present, right types), roles, empty, assistant present.
    Unknown keys are ignored.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadLine("invalid_utf8") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        raise BadLine("invalid_json") from None
    if _has_lone_surrogate(obj):
        raise BadLine("invalid_json")
    if not isinstance(obj, dict):
        raise BadLine("bad_schema")
    if kind == "text":
        value = obj.get("text")
        if not isinstance(value, str):
            raise BadLine("bad_schema")
        return value
    if kind != "chat":
        raise ValueError(f"unknown kind {kind!r}")
    conv = obj.get("conversations")
    if not isinstance(conv, list):
        raise BadLine("bad_schema")
    for m in conv:
        if not isinstance(m, dict):
            raise BadLine("bad_schema")
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadLine("bad_schema")
    for m in conv:
        if m["role"] not in ROLES:
            raise BadLine("unknown_role")
    if not conv:
        raise BadLine("empty_conversation")
    if not any(m["role"] == "assistant" for m in conv):
        raise BadLine("no_assistant")
    return [{"role": m["role"], "content": m["content"]} for m in conv]


def read_documents(paths: Sequence, kind: str, on_bad_line: str = "error"):
    """Records of `paths` in file order then line order → (records, skipped Counter).

    With `on_bad_line="error"` the first bad line raises `BadLine` carrying path and 1-based
    line number; a file without any record raises `empty_file` (no line). With "skip", bad
    lines and empty files are counted by reason. A UTF-8 byte-order mark at the very start of
    a file is skipped.
    """
    if on_bad_line not in ("error", "skip"):
        raise ValueError(on_bad_line)
    records: list = []
    skipped: Counter = Counter()
    for path in paths:
        data = Path(path).read_bytes()
        if data.startswith(BOM):
            data = data[len(BOM) :]
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        n_records = 0
        n_nonblank = 0
        for lineno, raw in enumerate(lines, start=1):
            if is_blank(raw):
                continue
            n_nonblank += 1
            try:
                rec = parse_line(raw, kind)
            except BadLine as e:
                if on_bad_line == "error":
                    raise BadLine(e.reason, str(path), lineno) from None
                skipped[e.reason] += 1
                continue
            records.append(rec)
            n_records += 1
        if n_nonblank == 0:
            if on_bad_line == "error":
                raise BadLine("empty_file", str(path))
            skipped["empty_file"] += 1
    return records, skipped


# --------------------------------------------------------------------------------------------
# encoding: ids + per-token classes


def class_weights(classes: Sequence[int], think_weight: float) -> np.ndarray:
    table = {UNTRAINED: 0.0, TRAINED: 1.0, TAG: float(think_weight)}
    return np.array([table[c] for c in classes], dtype=np.float32)


def strip_markers(text: str) -> str:
    """A pretrain text without one leading `<s>` and one trailing `</s>` (contracts.md §1)."""
    if text.startswith(BOS):
        text = text[len(BOS) :]
    if text.endswith(EOS):
        text = text[: -len(EOS)]
    return text


class RefEncoder:
    """The template and loss classes of docs/architecture.md over a `tokenizers.Tokenizer`."""

    def __init__(self, hf_tok, default_system: str):
        self.tok = hf_tok
        self.default_system = default_system
        self.bos = hf_tok.token_to_id(BOS)
        self.eos = hf_tok.token_to_id(EOS)
        assert self.bos is not None and self.eos is not None
        added = {t.content: i for i, t in hf_tok.get_added_tokens_decoder().items()}
        # A tag is its single (added) token, or its plain token sequence if the tokenizer lacks it.
        self.tag_ids = {t: [added[t]] if t in added else self.plain(t) for t in TAGS}

    def plain(self, text: str) -> list[int]:
        return plain_encode(self.tok, text)

    def encode_document(self, text: str) -> tuple[list[int], list[int]]:
        body = self.plain(strip_markers(text))
        ids = [self.bos, *body, self.eos]
        classes = [UNTRAINED] + [TRAINED] * len(body) + [TRAINED]
        return ids, classes

    def _assistant_content(self, content: str) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        classes: list[int] = []
        i = 0
        start = 0
        while i < len(content):
            tag = next((t for t in TAGS if content.startswith(t, i)), None)
            if tag is None:
                i += 1
                continue
            piece = self.plain(content[start:i])
            ids += piece
            classes += [TRAINED] * len(piece)
            ids += self.tag_ids[tag]
            classes += [TAG] * len(self.tag_ids[tag])
            i += len(tag)
            start = i
        piece = self.plain(content[start:])
        ids += piece
        classes += [TRAINED] * len(piece)
        return ids, classes

    def _turns(self, messages) -> tuple[list[int], list[int]]:
        msgs = list(messages)
        if not msgs or msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.default_system}, *msgs]
        ids: list[int] = []
        classes: list[int] = []
        for m in msgs:
            head = [self.bos, *self.plain(m["role"] + "\n")]
            ids += head
            classes += [UNTRAINED] * len(head)
            if m["role"] == "assistant":
                body, body_cls = self._assistant_content(m["content"])
                ids += body
                classes += body_cls
                ids.append(self.eos)
                classes.append(TRAINED)
            else:
                body = self.plain(m["content"])
                ids += body
                classes += [UNTRAINED] * len(body)
                ids.append(self.eos)
                classes.append(UNTRAINED)
            nl = self.plain("\n")
            ids += nl
            classes += [UNTRAINED] * len(nl)
        return ids, classes

    def encode_conversation(self, messages) -> tuple[list[int], list[int]]:
        return self._turns(messages)

    def encode_prompt(self, messages) -> list[int]:
        ids, _ = self._turns(messages)
        return [*ids, self.bos, *self.plain("assistant\n")]

    def encode(self, kind: str, record) -> tuple[list[int], list[int]]:
        if kind == "text":
            return self.encode_document(record)
        return self.encode_conversation(record)


def render(messages, default_system: str, add_generation_prompt: bool = False) -> str:
    """The template as text (contracts.md §2)."""
    msgs = list(messages)
    if not msgs or msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": default_system}, *msgs]
    out = "".join(f"<s>{m['role']}\n{m['content']}</s>\n" for m in msgs)
    return out + ("<s>assistant\n" if add_generation_prompt else "")


# --------------------------------------------------------------------------------------------
# epoch plan


def splitmix64(state: int):
    """Infinite generator of splitmix64 outputs from `state`."""
    while True:
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        yield z ^ (z >> 31)


HOLDOUT_SALT = 0x6A09E667F3BCC909


def holdout_hash(seed: int, i: int) -> int:
    """h(seed, i) of contracts.md §3: splitmix64's output function applied to
    (seed XOR HOLDOUT_SALT) + (i + 1) * 0x9E3779B97F4A7C15, all mod 2^64."""
    z = ((seed ^ HOLDOUT_SALT) + (i + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def split_documents(n: int, seed: int, holdout: float, split: str) -> list[int]:
    """Global indices of the documents of `split`: document i is in "val" iff
    h(seed, i) < holdout * 2^64 (Python compares the int with the float exactly)."""
    assert split in ("train", "val"), split
    assert 0.0 <= holdout < 1.0, holdout
    return [i for i in range(n) if (holdout_hash(seed, i) < holdout * 2**64) == (split == "val")]


def epoch_perm(n: int, seed: int, epoch: int) -> list[int]:
    state = (seed ^ ((epoch * 0xD1B54A32D192ED03) & MASK64)) & MASK64
    rng = splitmix64(state)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = next(rng) % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


@dataclass
class Row:
    """A row: its pieces, each a contiguous run of one document (ids, classes, doc index)."""

    pieces: list = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(p[0]) for p in self.pieces)


def text_rows(docs, perm, seq_len: int) -> list[Row]:
    """Documents in `perm` order as one stream, cut into rows of seq_len + 1; tail dropped."""
    width = seq_len + 1
    stream: list[tuple[int, int, int]] = []
    for d in perm:
        ids, classes = docs[d]
        stream.extend(zip(ids, classes, [d] * len(ids), strict=True))
    rows = []
    for k in range(len(stream) // width):
        chunk = stream[k * width : (k + 1) * width]
        row = Row()
        for tok_id, cls, d in chunk:
            if row.pieces and row.pieces[-1][2] == d:
                row.pieces[-1][0].append(tok_id)
                row.pieces[-1][1].append(cls)
            else:
                row.pieces.append(([tok_id], [cls], d))
        rows.append(row)
    return rows


ROW_SALT = 0xA5A5A5A5A5A5A5A5


def chat_rows(docs, perm, seq_len: int, seed: int = 0, epoch: int = 0) -> tuple[list[Row], int]:
    """Best-fit decreasing, then the rows shuffled → (rows, number truncated).

    Documents (cut to seq_len + 1) are taken longest first, equal lengths in `perm` order;
    each goes to the open row with the least free space that fits (ties: opened first).
    The rows are then put in the order `epoch_perm(len(rows), seed ^ ROW_SALT, epoch)`.
    """
    width = seq_len + 1
    items = []
    truncated = 0
    for d in perm:
        ids, classes = docs[d]
        if len(ids) > width:
            ids, classes = ids[:width], classes[:width]
            truncated += 1
        items.append((ids, classes, d))
    items.sort(key=lambda it: -len(it[0]))  # stable: ties keep `perm` order
    rows: list[Row] = []
    free: list[int] = []
    for ids, classes, d in items:
        n = len(ids)
        best = -1
        for k, f in enumerate(free):
            if f >= n and (best < 0 or f < free[best]):
                best = k
        if best < 0:
            rows.append(Row())
            free.append(width)
            best = len(rows) - 1
        rows[best].pieces.append((list(ids), list(classes), d))
        free[best] -= n
    order = epoch_perm(len(rows), seed ^ ROW_SALT, epoch)
    return [rows[i] for i in order], truncated


def row_arrays(row: Row | None, seq_len: int, think_weight: float) -> dict[str, np.ndarray]:
    """A row (None = an empty row) → input_ids, labels, loss_weights, position_ids of length T."""
    T = seq_len
    r: list[int] = []
    c: list[int] = []
    pos: list[int] = []
    if row is not None:
        for ids, classes, _ in row.pieces:
            r += ids
            c += classes
            pos += list(range(len(ids)))
    weight = {UNTRAINED: 0.0, TRAINED: 1.0, TAG: float(think_weight)}
    input_ids = np.zeros(T, dtype=np.int64)
    labels = np.full(T, IGNORE, dtype=np.int64)
    loss_weights = np.zeros(T, dtype=np.float32)
    position_ids = np.zeros(T, dtype=np.int64)
    for t in range(T):
        if t < len(r):
            input_ids[t] = r[t]
            position_ids[t] = pos[t]
        if t + 1 < len(r) and c[t + 1] != UNTRAINED:
            labels[t] = r[t + 1]
            loss_weights[t] = weight[c[t + 1]]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "loss_weights": loss_weights,
        "position_ids": position_ids,
    }


def num_batches(n_rows: int, batch_size: int, world_size: int) -> int:
    return math.ceil(n_rows / (batch_size * world_size))


def rank_row_indices(n_rows: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """For each batch of `rank`: its global row indices (≥ n_rows means an empty row)."""
    B, W = batch_size, world_size
    return [[g * B * W + rank * B + i for i in range(B)] for g in range(num_batches(n_rows, B, W))]


def rank_batches(rows, seq_len, batch_size, rank, world_size, think_weight):
    out = []
    for idx in rank_row_indices(len(rows), batch_size, rank, world_size):
        arrs = [row_arrays(rows[k] if k < len(rows) else None, seq_len, think_weight) for k in idx]
        out.append({key: np.stack([a[key] for a in arrs]) for key in arrs[0]})
    return out


class RefPacked:
    """The reference twin of `PackedDataset`: the same arguments, batches as numpy arrays."""

    def __init__(
        self,
        paths,
        hf_tok,
        default_system: str,
        kind: str = "text",
        seq_len: int = 64,
        batch_size: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        think_weight: float = 1.0,
        on_bad_line: str = "error",
        holdout: float = 0.0,
        split: str = "train",
    ):
        assert kind in ("text", "chat")
        assert 0 <= rank < world_size
        self.kind, self.seq_len, self.batch_size = kind, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.think_weight = think_weight
        self.holdout, self.split = holdout, split
        records, self.skipped = read_documents(paths, kind, on_bad_line)
        enc = RefEncoder(hf_tok, default_system)
        self.all_docs = [enc.encode(kind, rec) for rec in records]

    def documents(self) -> list[int]:
        """Global indices of the documents this split serves (all of them with holdout 0)."""
        return split_documents(len(self.all_docs), self.seed, self.holdout, self.split)

    @property
    def docs(self) -> list:
        """The split's documents, numbered 0.. in global order: what the epoch plan shuffles."""
        return [self.all_docs[i] for i in self.documents()]

    def rows(self, epoch: int) -> tuple[list[Row], int]:
        docs = self.docs
        perm = epoch_perm(len(docs), self.seed, epoch)
        if self.kind == "text":
            return text_rows(docs, perm, self.seq_len), 0
        return chat_rows(docs, perm, self.seq_len, self.seed, epoch)

    def batches(self, epoch: int = 0) -> list[dict[str, np.ndarray]]:
        rows, _ = self.rows(epoch)
        return rank_batches(
            rows, self.seq_len, self.batch_size, self.rank, self.world_size, self.think_weight
        )

    def __len__(self) -> int:
        rows, _ = self.rows(0)
        return num_batches(len(rows), self.batch_size, self.world_size)


# --------------------------------------------------------------------------------------------
# generated test data

CJK = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过"
    "子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体"
    "制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内"
)
CJK_PUNCT = "，。！？：；、「」（）"
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "hello world model token data train loss Python Rust SpongeBob MiniMind batch"
).split()
EMOJI = ["😀", "🚀", "👍🏽", "🇨🇳", "❤️", "🤖", "👨‍👩‍👧"]
WHITESPACE = [" ", "  ", "\n", "\n\n", "\t", "\r\n", " \n ", "\u3000", "\u00a0"]
LITERALS = ["<s>", "</s>", "<unk>", *TAGS, "<", ">", "</", "<thi", "s>", "<s", "<s><s>", "</s></s>"]


def random_piece(rng: random.Random) -> str:
    k = rng.random()
    if k < 0.35:
        return "".join(rng.choice(CJK) for _ in range(rng.randint(1, 12))) + (
            rng.choice(CJK_PUNCT) if rng.random() < 0.4 else ""
        )
    if k < 0.55:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))
    if k < 0.65:
        return str(rng.randint(0, 10 ** rng.randint(1, 9)))
    if k < 0.72:
        return rng.choice(EMOJI)
    if k < 0.85:
        return rng.choice(WHITESPACE)
    return rng.choice(LITERALS)


def random_text(rng: random.Random, max_pieces: int = 12) -> str:
    return "".join(random_piece(rng) for _ in range(rng.randint(0, max_pieces)))


def random_reasoning(rng: random.Random) -> str:
    return f"<think>\n{random_text(rng, 6)}\n</think>\n<answer>\n{random_text(rng, 6)}\n</answer>"


def random_conversation(rng: random.Random, max_turns: int = 3, long: bool = False) -> list:
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": random_text(rng, 4)})
    for _ in range(rng.randint(1, max_turns)):
        msgs.append({"role": "user", "content": random_text(rng, 30 if long else 8)})
        content = (
            random_reasoning(rng) if rng.random() < 0.4 else random_text(rng, 30 if long else 8)
        )
        msgs.append({"role": "assistant", "content": content})
    return msgs


def random_document(rng: random.Random, long: bool = False) -> str:
    text = random_text(rng, 60 if long else 15)
    k = rng.random()
    if k < 0.3:
        return f"<s>{text}</s>"
    if k < 0.4:
        return f"<s>{text}"
    return text


def write_jsonl(path: Path, objs, extra_keys: bool = False) -> Path:
    """Write `objs` as jsonl (UTF-8, non-ASCII kept); optionally add an unknown key."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for i, obj in enumerate(objs):
            if extra_keys and i % 3 == 0:
                obj = {**obj, "id": i, "meta": {"source": "generated", "tags": [1, 2]}}
            f.write(json.dumps(obj, ensure_ascii=i % 2 == 0) + "\n")
    return path


def text_objs(rng: random.Random, n: int, long_every: int = 5) -> list[dict]:
    return [{"text": random_document(rng, long=i % long_every == 0)} for i in range(n)]


def chat_objs(rng: random.Random, n: int, long_every: int = 5) -> list[dict]:
    return [{"conversations": random_conversation(rng, long=i % long_every == 0)} for i in range(n)]


# --------------------------------------------------------------------------------------------
# comparing loader output with the reference

BATCH_KEYS = ("input_ids", "labels", "loss_weights", "position_ids")
BATCH_DTYPES = {
    "input_ids": "int64",
    "labels": "int64",
    "loss_weights": "float32",
    "position_ids": "int64",
}


def to_numpy(v) -> np.ndarray:
    return v.numpy() if hasattr(v, "numpy") else np.asarray(v)


def batch_to_numpy(batch) -> dict[str, np.ndarray]:
    """A loader batch (dict of torch tensors or arrays) → dict of numpy arrays."""
    return {k: to_numpy(batch[k]) for k in BATCH_KEYS}


def batch_mismatch(got: dict, exp: dict, where: str = "") -> str | None:
    """None if equal, else the first difference: key, row, position, expected vs got."""
    for k in BATCH_KEYS:
        if k not in got:
            return f"{where}: key {k!r} missing (keys: {sorted(got)})"
        g = to_numpy(got[k])
        e = exp[k]
        if str(g.dtype) != BATCH_DTYPES[k]:
            return f"{where}: {k} dtype {g.dtype}, expected {BATCH_DTYPES[k]}"
        if g.shape != e.shape:
            return f"{where}: {k} shape {g.shape}, expected {e.shape}"
        if not np.array_equal(g, e):
            row, pos = (int(x) for x in np.argwhere(g != e)[0])
            lo, hi = max(0, pos - 3), pos + 4
            return (
                f"{where}: {k}[row {row}, pos {pos}]: expected {e[row, pos]}, got {g[row, pos]}"
                f" (expected {k}[{row}, {lo}:{hi}] = {e[row, lo:hi].tolist()},"
                f" got {g[row, lo:hi].tolist()}; {int((g != e).sum())} positions differ)"
            )
    return None


def assert_same_batches(got: list, exp: list, label: str = "") -> None:
    assert len(got) == len(exp), f"{label}: {len(got)} batches, expected {len(exp)}"
    for b, (g, e) in enumerate(zip(got, exp, strict=True)):
        msg = batch_mismatch(g, e, f"{label} batch {b}")
        assert msg is None, msg


def batch_digest(batch) -> bytes:
    """A hashable fingerprint of a batch's four arrays."""
    import hashlib

    h = hashlib.sha256()
    arrays = batch_to_numpy(batch)
    for k in BATCH_KEYS:
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.digest()
