"""`python -m spongebob` (what `torchrun -m spongebob` runs) is the CLI."""

from spongebob.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
