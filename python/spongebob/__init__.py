"""SpongeBob: train a small chat LLM from scratch, fast and correct.

The data engine is the Rust extension `spongebob._rust` (re-exported by `spongebob.data`), the
Triton kernels live in `spongebob.kernels` (the repository's `kernels/` folder), and everything
else — model, training loop, chat, eval, export — is plain Python in this package.
"""

__version__ = "0.1.0"
