import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub: bitsandbytes' import asks it for a CPU kernel on AVX512-BF16
os.environ.setdefault("TRITON_INTERPRET", "1")  # before patchkit defines its Triton kernels: CPU CI runs them

import pytest
import torch

import patchkit
from patchkit import plugins


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run tests marked slow (deselected without it), and more hypothesis cases")


def pytest_configure(config):
    from hypothesis import HealthCheck, settings

    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N processes share the cores, one thread each
        torch.set_num_threads(1)

    quiet = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=quiet)
    settings.register_profile("slow", max_examples=300, deadline=None, derandomize=True, suppress_health_check=quiet)
    settings.load_profile("slow" if config.getoption("--slow") else "ci")


EVERY_FAMILY = ("test_moe.py", "test_contexts.py")  # files whose per-family tests run every family by default


def _slow_family(item) -> bool:
    from .families import SLOW_FAMILIES

    params = getattr(item, "callspec", None)
    return item.path.name not in EVERY_FAMILY and params is not None and any(
        (v if isinstance(v, str) else getattr(v, "name", None)) in SLOW_FAMILIES for v in params.params.values())


def pytest_collection_modifyitems(config, items):
    """Mark the slow families' tests slow; without `--slow`, deselect every slow test (shown as "deselected", not
    as thousands of skips), so the summary's skips are the real ones (no GPU, a package missing), with reasons."""
    cuda = torch.cuda.is_available()
    for item in items:
        if _slow_family(item):
            item.add_marker(pytest.mark.slow)
        if "cuda" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
    if not config.getoption("--slow"):
        slow = [item for item in items if "slow" in item.keywords]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if "slow" not in item.keywords]


@pytest.fixture(autouse=True)
def _clean_patches():
    torch.manual_seed(0)
    yield
    patchkit.unpatch()


@pytest.fixture
def register_plugin():
    """Register in-process plugins for one test; they are unregistered afterwards."""
    names = []

    def register(plugin, name=None):
        names.append(plugins.manager().register(plugin, name=name))
        return names[-1]

    try:
        yield register
    finally:
        for name in names:
            plugins.manager().unregister(name)


@pytest.fixture
def steps(monkeypatch):
    """How many decode steps patchkit's loop ran (0: transformers' own loop ran the call)."""
    from patchkit import inference

    count = []
    real = inference.Decoding.step
    monkeypatch.setattr(inference.Decoding, "step", lambda self, tokens: count.append(1) or real(self, tokens))
    return count
