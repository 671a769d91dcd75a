"""`lmcycle reproduce --run` where bit-identity cannot be expected: the rebuild's weights against the registered ones
within a stated tolerance (relative L2 per tensor). Real safetensors files; the CLI path is in tests/test_flow.py."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from lmcore.lifecycle.registry.reproduce import WEIGHTS_RTOL, within_tolerance


def _weights(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def test_near_weights_pass_and_far_or_other_weights_fail(tmp_path: Path) -> None:
    torch.manual_seed(0)
    registered = {"embed.weight": torch.randn(64, 16), "head.weight": torch.randn(8, 16)}
    reference = _weights(tmp_path / "registered", registered)

    same, line = within_tolerance(_weights(tmp_path / "same", dict(registered)), reference)
    assert same and "largest relative L2 distance 0 " in line

    drift = {k: v + 1e-3 * v.norm() / v.numel() ** 0.5 * torch.randn_like(v) for k, v in registered.items()}
    close, line = within_tolerance(_weights(tmp_path / "drift", drift), reference)
    assert close and f"within the tolerance {WEIGHTS_RTOL:g}" in line

    far = {**registered, "head.weight": registered["head.weight"] * 1.5}
    apart, line = within_tolerance(_weights(tmp_path / "far", far), reference)
    assert not apart and "(head.weight)" in line and "beyond the tolerance" in line

    fewer, line = within_tolerance(
        _weights(tmp_path / "fewer", {"embed.weight": registered["embed.weight"]}), reference
    )
    assert not fewer and "other tensors" in line
