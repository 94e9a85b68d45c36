"""Fixtures and hooks of the real-host tests (a pytest plugin loaded by tests/conftest.py; a
second conftest.py would shadow the first one's ``conftest`` module).

The real-host tests skip where no ComfyUI is configured — except in CI (``CI`` set) or with
CLASSDIFFUSION_REQUIRE_HOST=1, where a host that cannot start fails the run instead of skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from comfy_server import start_server, unavailable_reason


def host_required() -> bool:
    return any(os.environ.get(name, "").lower() not in ("", "0", "false") for name in ("CI", "CLASSDIFFUSION_REQUIRE_HOST"))


HOST_TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:  # every real-host test starts or shares a ComfyUI server: not for the quick run
        if Path(str(item.fspath)).resolve().parent == HOST_TESTS:
            item.add_marker(pytest.mark.slow)
    if not host_required() or not any(Path(str(item.fspath)).resolve().parent == HOST_TESTS for item in items):
        return
    reason = unavailable_reason()
    if reason is not None:
        raise pytest.UsageError(f"The ComfyUI host tests must run here (CI / CLASSDIFFUSION_REQUIRE_HOST) but cannot: {reason}.")


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory):
    """One ComfyUI for the integration and workflow tests (starting one costs ~30 s and several
    checkpoints); the half-precision and registry tests need their own (other arguments, the
    pack installed from its zip)."""
    server = start_server(tmp_path_factory.mktemp("comfy_shared"), workflows=True)
    yield server
    server.stop()
