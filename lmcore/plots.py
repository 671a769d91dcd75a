"""PNG plots of training curves (matplotlib, Agg backend): what `dvc plots show` cannot render offline.

`dvc plots show` writes HTML that loads its chart library from a CDN, so every training stage also writes a
static PNG beside its CSV series. Written atomically; no timestamp in the file's metadata.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lmcore.diskspace import writing


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(
    train: Sequence[dict[str, float]], val: Sequence[dict[str, float]], path: str | Path, title: str
) -> Path:
    """Left: train and val loss (nats/token) by step. Right: val bits-per-byte by step (when there is any)."""
    plt = _pyplot()
    path = Path(path)
    has_bpb = any("bpb" in row for row in val)
    fig, axes = plt.subplots(1, 2 if has_bpb else 1, figsize=(11 if has_bpb else 6, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", color="tab:blue")
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val", color="tab:orange")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"{title}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_bpb:
        ax = axes[0][1]
        rows = [r for r in val if "bpb" in r]
        ax.plot([r["step"] for r in rows], [r["bpb"] for r in rows], "o-", color="tab:green")
        ax.set(xlabel="step", ylabel="bits per byte", title=f"{title}: val bits-per-byte")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        with writing(path):
            fig.savefig(tmp, dpi=100, metadata={"Software": None})
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
