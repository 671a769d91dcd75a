"""Bad input gets one line, never a traceback: random `-S` overrides and random small source files, fed through
config loading and the ingest stage (hypothesis), end in success or an lmcycle error of one line; and the named
cases (`-S 'pretrain.lr=['`, a JSONL line nested 5,000 levels deep) through the real command line."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import pytest
import yaml
from conftest import REPO, lmcycle, make_workspace
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcore.errors import LmcycleError
from lmcore.lifecycle.config import apply_overrides, load_config

SECTIONS = list(yaml.safe_load((REPO / "params.yaml").read_text()))
KEYS = sorted({f"{s}.{k}" for s, v in yaml.safe_load((REPO / "params.yaml").read_text()).items() for k in v})
YAMLISH = st.one_of(
    st.text(alphabet=string.printable, max_size=30),
    st.sampled_from(["[", "{", "]", "!!python/object:os.system", "*a", "&a [*a]", "- x", "null", "~", ".nan", "1e999"]),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.builds(lambda n: "[" * n + "]" * n, st.integers(min_value=1, max_value=4000)),
)
OVERRIDES = st.one_of(
    st.text(max_size=60),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), YAMLISH),
    st.builds(lambda s, k, v: f"{s}.{k}={v}", st.sampled_from(SECTIONS), st.text(max_size=12), YAMLISH),
)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_line(err: LmcycleError) -> None:
    text = str(err)
    assert text and "\n" not in text and "Traceback" not in text, text


@FAST
@given(overrides=st.lists(OVERRIDES, min_size=1, max_size=3))
def test_random_overrides_load_or_fail_in_one_line(overrides: list[str], tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("params")
    params = folder / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = params.read_bytes()
    try:
        config = apply_overrides(overrides, params)
    except LmcycleError as err:
        one_line(err)
        assert params.read_bytes() == before, "a refused override changed params.yaml"
        return
    assert load_config(params) == config  # what was written reads back as what was validated


SOURCE_BYTES = st.one_of(
    st.binary(max_size=400),
    st.text(max_size=400).map(str.encode),
    st.builds(lambda n: ("[" * n + "]" * n).encode(), st.integers(min_value=1, max_value=6000)),
    st.builds(lambda n: ('{"text": ' + "[" * n + "]" * n + "}\n").encode(), st.integers(min_value=1, max_value=6000)),
    st.lists(
        st.dictionaries(st.sampled_from(["text", "label", "messages", "x"]), st.text(max_size=40)), max_size=8
    ).map(lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=SOURCE_BYTES,
    suffix=st.sampled_from([".jsonl", ".json", ".txt", ".csv", ".yml", ".md"]),
    kind=st.sampled_from(["pretrain", "sft", "classification"]),
)
def test_random_source_files_ingest_or_fail_in_one_line(data: bytes, suffix: str, kind: str, tmp_path_factory) -> None:
    from lmcore.lifecycle.config import validate
    from lmcore.lifecycle.paths import Paths
    from lmcore.lifecycle.stages import ingest

    root = tmp_path_factory.mktemp("ws")
    source = root / f"source{suffix}"
    source.write_bytes(data)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update({"pretrain": [], "sft": [], "classification": []})
    raw["data"][kind] = [{"uri": str(source), "format": "conversations" if suffix == ".yml" else "auto"}]
    try:
        ingest.run(validate(raw, "params.yaml"), Paths.of(root))
    except LmcycleError as err:
        one_line(err)
        assert not (root / "data" / "ingest").exists(), "a failed ingest left output behind"
        assert not [p for p in (root / "data").glob(".*tmp*")], "a failed ingest left a temporary folder"
        return
    assert (root / "data" / "ingest" / kind / "train.jsonl").is_file()


@pytest.mark.parametrize(
    "override",
    ["pretrain.lr=[", "pretrain.lr=!!python/object/apply:os.system ['true']", "pretrain.lr=" + "[" * 5000],
)
def test_bad_overrides_through_the_command_line(override: str, tmp_path: Path) -> None:
    root = make_workspace(tmp_path / "ws", {})
    before = (root / "params.yaml").read_bytes()
    proc = lmcycle("run", "-S", override, cwd=root, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: override "), proc.stderr
    assert (root / "params.yaml").read_bytes() == before


def test_a_jsonl_line_nested_5000_deep_is_counted_invalid_not_a_crash(tmp_path: Path) -> None:
    root = make_workspace(tmp_path / "ws", {}, dvc=False)
    corpus = root / "corpus.jsonl"
    good = [json.dumps({"text": f"In the beginning was document number {i}, long enough to keep."}) for i in range(40)]
    corpus.write_text("\n".join([*good[:20], '{"text": ' + "[" * 5000 + "]" * 5000 + "}", *good[20:]]) + "\n")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update({"pretrain": [{"uri": str(corpus)}], "sft": [], "classification": []})
    params["data"]["val_fraction"] = 0.2
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    proc = lmcycle("stage", "ingest", cwd=root, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((root / "reports" / "ingest.json").read_text())
    assert report["pretrain"]["rows_invalid"] == 1, report
