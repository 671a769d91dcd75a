#!/usr/bin/env python
"""The `lmcycle` command of the worker image: pyproject's entry point (flows.cli:app), imported from the checkout
that holds the current directory, never from a copy installed in the image.

DVC runs each stage command in its workspace and Prefect runs a flow in the directory its deployment names, so
the code that runs is the code whose git commit and dvc.lock the run records.
"""

import sys
from pathlib import Path


def checkout_root(start: Path) -> Path | None:
    """The nearest directory at or above `start` that holds the project's code."""
    for root in (start, *start.parents):
        if (root / "flows" / "cli.py").is_file() and (root / "lmcore" / "__init__.py").is_file():
            return root
    return None


def main() -> int:
    here = Path.cwd().resolve()
    root = checkout_root(here)
    if root is None:
        print(
            f"error: {here}: not inside an lmcycle checkout (no flows/cli.py and lmcore/ here or above)",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(root))
    from flows.cli import app

    return app(prog_name="lmcycle")


if __name__ == "__main__":
    sys.exit(main())
