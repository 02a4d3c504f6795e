"""SpongeBob's Triton kernels, importable as `spongebob.kernels`.

The repository keeps them in the top-level `kernels/` folder; `python/spongebob/kernels` is a
symlink to it, so editable installs and wheels both ship them inside the `spongebob` package
(no top-level `kernels` module, a name another PyPI distribution owns).

Each op has a PyTorch reference in `reference.py` (the CPU path and the ground truth of the
tests) and a Triton implementation in its own file.
"""

from . import reference

__all__ = ["reference"]
