"""A lease that serialises concurrent promotion gates on one registered model.

The registry has no transaction, so the read–compare–set of the champion runs under a lease held in a
registered-model tag (`lmcycle.gate_lease` = owner and expiry): write it, wait, re-read; only the owner still named
after the wait goes on. It works through any MLflow server, since it only uses tags. An expired lease (a killed
holder) is taken over.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

from lmcore.errors import LmcycleError

if TYPE_CHECKING:
    from mlflow import MlflowClient

LEASE_TAG = "lmcycle.gate_lease"


class GateBusyError(LmcycleError):
    """Another registration held the gate's lease for longer than this one would wait."""


def _read_lease(client: MlflowClient, name: str) -> tuple[str, float] | None:
    text = client.get_registered_model(name).tags.get(LEASE_TAG, "")
    owner, _, expiry = text.partition("@")
    try:
        return (owner, float(expiry)) if owner else None
    except ValueError:
        return None


def _write_lease(client: MlflowClient, name: str, value: str) -> bool:
    """Write the lease tag; False when a concurrent writer won (a store may refuse two inserts of one tag)."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_tag(name, LEASE_TAG, value)
    except MlflowException:
        return False
    return True


@contextlib.contextmanager
def gate_lease(
    client: MlflowClient, name: str, ttl_s: float = 120.0, settle_s: float = 0.5, wait_s: float = 300.0
) -> Iterator[str]:
    """Hold the registered model's gate lease: write owner@expiry, wait `settle_s`, re-read; a writer that raced
    with us is seen then and one of us backs off (with jitter). An expired lease (a killed holder) is taken over."""
    owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + wait_s
    while True:
        lease = _read_lease(client, name)
        if (lease is None or lease[1] < time.time()) and _write_lease(client, name, f"{owner}@{time.time() + ttl_s}"):
            time.sleep(settle_s)
            lease = _read_lease(client, name)
            if lease is not None and lease[0] == owner:
                break
        if time.monotonic() > deadline:
            raise GateBusyError(f"models:/{name}: the promotion gate is held by another registration ({LEASE_TAG})")
        time.sleep(settle_s * (1 + 2 * random.random()))
    try:
        yield owner
    finally:
        with contextlib.suppress(Exception):
            lease = _read_lease(client, name)
            if lease is not None and lease[0] == owner:
                client.delete_registered_model_tag(name, LEASE_TAG)
