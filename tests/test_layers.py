"""The three layers import one way: the LM library (lmcore outside lmcore.lifecycle) ← the lifecycle layer
(lmcore.lifecycle) ← flows. import-linter checks the contracts in pyproject.toml (`make lint`); this test keeps the
library contract's module list whole, so a new library module is checked from the day it is added."""

from __future__ import annotations

import tomllib
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]


def _library_contract() -> dict:
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    return next(c for c in contracts if "lmcore.lifecycle" in c.get("forbidden_modules", []))


def _listed(module: str, sources: list[str]) -> bool:
    return any(module == s or module.startswith(s + ".") for s in sources)


def test_every_library_module_is_under_the_library_contract() -> None:
    graph = grimp.build_graph("lmcore", include_external_packages=False)
    sources = _library_contract()["source_modules"]
    library = sorted(m for m in graph.modules if m != "lmcore" and not _listed(m, ["lmcore.lifecycle"]))
    assert library, "no library modules found"
    missing = [m for m in library if not _listed(m, sources)]
    assert not missing, f"add these modules to the library contract in pyproject.toml: {missing}"


def test_the_library_imports_nothing_of_the_lifecycle_layer() -> None:
    """What the contract states, computed here too: the closure of every library module stays in the library."""
    graph = grimp.build_graph("lmcore", include_external_packages=False)
    sources = _library_contract()["source_modules"]
    leaks = sorted(
        (m, up)
        for m in graph.modules
        if _listed(m, sources)
        for up in graph.find_modules_directly_imported_by(m)
        if _listed(up, ["lmcore.lifecycle"])
    )
    assert not leaks, f"library modules importing the lifecycle layer: {leaks}"


def test_only_the_dvc_adapter_imports_dvc() -> None:
    """One seam per foreign mechanism: every import of DVC in lmcore and flows is in lmcore.lifecycle.dvcadapter
    (the package: its run-cache module too)."""
    graph = grimp.build_graph("lmcore", "flows", include_external_packages=True)
    importers = {m for dvc in ("dvc", "dvc_data") for m in graph.find_modules_that_directly_import(dvc)}
    assert "lmcore.lifecycle.dvcadapter" in importers
    outside = sorted(m for m in importers if not m.startswith("lmcore.lifecycle.dvcadapter"))
    assert not outside, f"modules importing DVC outside lmcore.lifecycle.dvcadapter: {outside}"


def _stage_modules(graph: grimp.ImportGraph) -> set[str]:
    return set(graph.find_children("lmcore.lifecycle.stages"))


def test_nothing_imports_a_stage_and_stages_import_no_other_stage() -> None:
    """What the stage contracts state, computed here too: a stage module is imported by no module of lmcore or
    flows (the dispatcher in flows.cli loads it by name), and no stage reaches another, directly or not."""
    graph = grimp.build_graph("lmcore", "flows", include_external_packages=False)
    stages = _stage_modules(graph)
    assert {"lmcore.lifecycle.stages.evaluate", "lmcore.lifecycle.stages.finetune"} <= stages
    importers = sorted(
        (importer, stage)
        for stage in stages
        for importer in graph.find_modules_that_directly_import(stage)
        if importer not in stages
    )
    assert not importers, f"modules importing a stage (share the code through the LM library): {importers}"
    reached = sorted((a, b) for a in stages for b in stages if a != b and graph.chain_exists(a, b))
    assert not reached, f"stages reaching another stage: {reached}"
