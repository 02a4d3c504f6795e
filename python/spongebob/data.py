"""The data side of SpongeBob, backed by the Rust extension.

`ChatTokenizer` renders the chat template and builds loss masks (DESIGN §3); `TextStream`
streams the texts of jsonl files. Both are implemented in `rust_dataloader/`.
"""

from spongebob._rust import (
    BAD_LINE_REASONS,
    DEFAULT_SYSTEM,
    TEMPLATE_VERSION,
    ChatTokenizer,
    DataFormatError,
    TextStream,
)

__all__ = [
    "BAD_LINE_REASONS",
    "DEFAULT_SYSTEM",
    "TEMPLATE_VERSION",
    "ChatTokenizer",
    "DataFormatError",
    "TextStream",
]
