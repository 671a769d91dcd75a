"""What a version records about the machine that made it, and what `lmcycle reproduce` concludes from it."""

from __future__ import annotations

from pathlib import Path

from lmcore.lifecycle.workspace import NUMERICS_KEYS, environment, rebuild_outlook


def test_the_environment_names_the_cpu_its_isa_and_the_threads() -> None:
    import torch

    env = environment(Path("."))
    assert env["cpu_model"] and env["cpu_isa"] != "unknown"
    assert env["threads"] == str(torch.get_num_threads()) and env["device"] == "cpu"
    assert set(NUMERICS_KEYS) <= set(env)


def test_rebuild_outlook_on_the_same_and_on_another_machine() -> None:
    import torch  # noqa: F401 - threads and device are recorded once torch is loaded

    here = environment(Path("."))
    assert rebuild_outlook(here, here).startswith("bit-identical rebuild here: expected")
    assert here["aten_cpu"] in {"DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256"}
    changes = [("cpu_model", "Another CPU"), ("cpu_isa", "sse4_2"), ("mkl_cbwr", "AVX2")]
    changes.append(("aten_cpu", "DEFAULT" if here["aten_cpu"] != "DEFAULT" else "AVX2"))
    for key, other in [*changes, ("threads", "64")]:
        line = rebuild_outlook({**here, key: other}, here)
        assert line.startswith("bit-identical rebuild here: not expected (") and f"{key} {other!r} there" in line
    assert "unknown" in rebuild_outlook({"torch": here["torch"]}, here)
