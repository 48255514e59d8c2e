"""Metric families of extensions beyond upstream are named ``konnectivity_fast_*`` and
registered only when their extension is enabled (konnectivity_fast/metrics/_common.py):
with the defaults, both programs expose upstream's families and nothing else."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator

import pytest

import konnectivity_fast
from konnectivity_fast.metrics import accept, agent, server
from konnectivity_fast.metrics._common import EXTENSION_PREFIX
from konnectivity_fast.wire.contract import ProxyStrategy


@pytest.fixture
def fresh() -> Iterator[None]:
    server.reset()
    agent.reset()
    yield
    server.reset()
    agent.reset()


def test_default_exposition_has_no_extension_family(fresh: None) -> None:
    # Import every module, so that whatever registers at import time has done so.
    for module in pkgutil.walk_packages(konnectivity_fast.__path__, "konnectivity_fast."):
        importlib.import_module(module.name)
    server.startup(list(ProxyStrategy))
    for text in (server.expose().decode(), agent.expose().decode()):
        assert "konnectivity_network_proxy_" in text  # the scrape is not empty
        names = [line for line in text.splitlines() if EXTENSION_PREFIX in line]
        assert names == []


def test_extension_prefix_is_not_upstreams() -> None:
    assert not server.PREFIX.startswith(EXTENSION_PREFIX)
    assert not agent.PREFIX.startswith(EXTENSION_PREFIX)


def test_accept_exhaustion_counter_shows_only_once_counted(fresh: None) -> None:
    """Enabled on both programs' registries at start-up, the counter of failed accepts
    adds nothing to a scrape until an accept fails; then one series per listener and
    error."""
    for registry, expose in ((server.REGISTRY, server.expose), (agent.REGISTRY, agent.expose)):
        accept.enable(registry)
        accept.enable(registry)  # idempotent
        assert EXTENSION_PREFIX not in expose().decode()
    accept.exhausted("agent", "EMFILE")
    accept.exhausted("agent", "EMFILE")
    accept.exhausted("health", "ENFILE")
    text = server.expose().decode()
    assert 'konnectivity_fast_accept_exhausted_total{error="EMFILE",listener="agent"} 2' in text
    assert 'konnectivity_fast_accept_exhausted_total{error="ENFILE",listener="health"} 1' in text
    server.reset()
    assert EXTENSION_PREFIX not in server.expose().decode()
    for registry in (server.REGISTRY, agent.REGISTRY):
        registry.unregister(accept.ACCEPT_EXHAUSTED)
