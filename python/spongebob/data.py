"""The data side of SpongeBob, backed by the Rust extension (`rust_dataloader/`).

`ChatTokenizer` renders the chat template and builds loss masks (contracts.md §2); `TextStream`
streams the texts of jsonl files; `PackedDataset` yields fixed-shape packed batches
(contracts.md §3); `scan_file` / `check_file` validate a file with the loader's own parser.
`SPECIAL_TOKENS` and `REASONING_TAGS` are defined once, in Rust (rust_dataloader/src/tokenizer.rs);
the template families (`TEMPLATES`, `template_info(name)`: specials, stop tokens, Jinja twin) in
rust_dataloader/src/template.rs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from spongebob._rust import (
    BAD_LINE_REASONS,
    DEFAULT_SYSTEM,
    REASONING_TAGS,
    SPECIAL_TOKENS,
    TEMPLATE_VERSION,
    TEMPLATES,
    ChatTokenizer,
    DataFormatError,
    PackedLoader,
    TextStream,
    check_file,
    scan_file,
    template_info,
    train_bpe_bounded,
)

__all__ = [
    "BAD_LINE_REASONS",
    "DEFAULT_SYSTEM",
    "REASONING_TAGS",
    "SPECIAL_TOKENS",
    "TEMPLATES",
    "TEMPLATE_VERSION",
    "ChatTokenizer",
    "DataFormatError",
    "PackedDataset",
    "TextStream",
    "check_file",
    "scan_file",
    "template_info",
    "train_bpe_bounded",
]


class PackedDataset:
    """Packed batches of `input_ids`, `labels`, `loss_weights`, `position_ids`, each [B, T].

    Tokenizing, packing and batch assembly run in Rust threads with the GIL released; a
    bounded prefetch queue builds the next batches while the model trains. The arrays cross
    into torch without a copy.

    Iterating yields the rest of the current epoch; when it is exhausted the position moves
    to the next epoch (reshuffled from the seed), so `for epoch ...: for batch in ds:` works
    as is. `state_dict()` counts the batches handed out (not those prefetched) and
    `load_state_dict()` resumes exactly there.

    No torch `DataLoader` workers are needed (the Rust side already builds batches ahead in
    its own threads), but it works under them: each worker takes its own share of this rank's
    rows of the current epoch. A mid-epoch position cannot be split across workers, so that
    case is refused; without `cache_dir`, each worker tokenizes into its own temporary cache.

    Validation without a copy of the data: `holdout` (in [0, 1)) holds out that fraction of
    the documents, chosen by a seeded hash of their global index (contracts.md §3, "Validation
    split"); `split="train"` serves the others, `split="val"` the held-out ones, each shuffled
    and packed as usual. Both are part of the fingerprint. A split left without documents is a
    `ValueError` naming both counts.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike] | str | os.PathLike,
        tokenizer: ChatTokenizer | str | os.PathLike,
        kind: str = "text",
        seq_len: int = 512,
        batch_size: int = 8,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        think_weight: float = 1.0,
        cache_dir: str | os.PathLike | None = None,
        on_bad_line: str = "error",
        prefetch: int = 4,
        num_threads: int | None = None,
        holdout: float = 0.0,
        split: str = "train",
    ) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if not isinstance(tokenizer, ChatTokenizer):
            tokenizer = ChatTokenizer.from_dir(str(tokenizer))
        self.tokenizer = tokenizer
        self._args: dict[str, Any] = dict(
            paths=[str(Path(p)) for p in paths],
            kind=kind,
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            think_weight=think_weight,
            cache_dir=None if cache_dir is None else str(cache_dir),
            on_bad_line=on_bad_line,
            prefetch=prefetch,
            num_threads=num_threads,
            holdout=float(holdout),
            split=split,
        )
        self._loader = PackedLoader(tokenizer=tokenizer, **self._args)
        self.seq_len = seq_len
        self.batch_size = batch_size

    def _worker_loader(self) -> PackedLoader:
        """This rank's loader, or a worker's share of it inside a DataLoader worker."""
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        if info is None or info.num_workers == 1:
            return self._loader
        state = self._loader.state_dict()
        if state["batches"]:
            raise ValueError(
                "PackedDataset: a mid-epoch position cannot be split across DataLoader workers; "
                "iterate it directly (it prefetches in Rust threads) or resume at an epoch start"
            )
        args = dict(self._args)
        args["rank"] = self._args["rank"] * info.num_workers + info.id
        args["world_size"] = self._args["world_size"] * info.num_workers
        loader = PackedLoader(tokenizer=self.tokenizer, **args)
        loader.set_epoch(state["epoch"])
        return loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch

        loader = self._worker_loader()
        while True:
            arrays = loader.next_batch()
            if arrays is None:
                return
            ids, labels, weights, pos = arrays
            yield {
                "input_ids": torch.from_numpy(ids),
                "labels": torch.from_numpy(labels),
                "loss_weights": torch.from_numpy(weights),
                "position_ids": torch.from_numpy(pos),
            }

    def __len__(self) -> int:
        """Batches this rank gets in the current epoch."""
        return self._loader.batches_per_epoch()

    def set_epoch(self, epoch: int) -> None:
        self._loader.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return dict(self._loader.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loader.load_state_dict(dict(state))

    def stats(self) -> dict[str, Any]:
        """Counts of this split (contracts.md §3 "Stats"): documents; tokens as encoded (before
        truncation or the dropped tail); rows of the current epoch; used_tokens placed in them;
        fill = used_tokens / (rows × (seq_len + 1)); truncated conversations; skipped lines by
        reason (of the whole files); batches_per_epoch; epoch."""
        return dict(self._loader.stats())

    def documents(self) -> list[int]:
        """The global document indices (contracts.md §3) this split serves, ascending."""
        return self._loader.documents().tolist()

    @property
    def fingerprint(self) -> str:
        return self._loader.fingerprint
