"""Shared fixtures: devices by mark, the real data folder, hypothesis profiles."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

# benchmark-only code (encoders, the host-read counter) lives in benchmarks/, next to its scripts
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

try:
    from hypothesis import HealthCheck, settings

    # ci: the default (`make test`, .ci/run); the fuzz properties of tests/fuzz/ run a share of it
    # (tests/fuzz/fuzz_harness.examples). thorough: `make fuzz` (>= 20,000 examples in tests/fuzz/).
    settings.register_profile(
        "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.register_profile("dev", max_examples=20, deadline=None)
    settings.register_profile(
        "thorough", max_examples=1000, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    pass

REPO_ROOT = Path(__file__).resolve().parents[1]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

#: parametrize a test over devices: ``@pytest.mark.parametrize("device", CPU_AND_CUDA)``
CPU_AND_CUDA = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.needs_cuda, needs_cuda]),
]


def data_root() -> Path:
    """``$CMDA_DATA_DIR`` or ``<repo>/../shared/data``."""
    override = os.environ.get("CMDA_DATA_DIR")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data"


def require_data(*relative: str) -> Path:
    """Return the data folder (or a file in it); skip, or fail under ``CMDA_REQUIRE_DATA=1``."""
    path = data_root().joinpath(*relative)
    if not path.exists():
        message = f"real data not found at {path} (set CMDA_DATA_DIR to the shared/data folder)"
        if os.environ.get("CMDA_REQUIRE_DATA") == "1":
            pytest.fail(message + "; CMDA_REQUIRE_DATA=1 makes this a failure")
        pytest.skip(message)
    return path


@pytest.fixture
def data_dir() -> Path:
    """The real data folder (``../shared/data``)."""
    return require_data()


@pytest.fixture
def wikipedia_dir() -> Path:
    return require_data("wikipedia")


@pytest.fixture
def webnews_dir() -> Path:
    return require_data("webnews")


@pytest.fixture(autouse=True)
def _no_global_rng_leaks():
    """Every test starts from the same global RNG state (our code must not depend on it)."""
    torch.manual_seed(1234)
    yield


# ------------------------------------------------------------------ fuzz example counts
# Every hypothesis test under tests/fuzz/ is wrapped so that each example it runs is counted;
# with CMDA_FUZZ_REPORT=<path> (set by `make fuzz`) the counts are written there as JSON and
# printed as a table (tests/fuzz/fuzz_report.py). Under pytest-xdist each worker writes a part
# that the controller merges.
FUZZ_DIR = REPO_ROOT / "tests" / "fuzz"
_FUZZ_COUNTS: dict = {}


def _count_examples(function, record: dict):
    inner = function.hypothesis.inner_test

    def counted(*args, **kwargs):
        record["examples"] += 1
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        except BaseException:
            record["failing_examples"] += 1
            raise
        finally:
            record["seconds"] += time.perf_counter() - start

    counted._fuzz_counted = True  # type: ignore[attr-defined]
    function.hypothesis.inner_test = counted


def pytest_collection_modifyitems(config, items):
    for item in items:
        function = getattr(item, "function", None)
        if function is None or FUZZ_DIR not in Path(str(item.path)).parents:
            continue
        handle = getattr(function, "hypothesis", None)
        if handle is None or getattr(handle.inner_test, "_fuzz_counted", False):
            continue
        key = f"{Path(str(item.path)).name}::{function.__name__}"
        doc = (function.__doc__ or "").strip().splitlines()
        record = _FUZZ_COUNTS.setdefault(key, {"file": Path(str(item.path)).name, "property": function.__name__,
                                               "description": doc[0] if doc else "", "examples": 0,
                                               "failing_examples": 0, "seconds": 0.0, "outcomes": {}})
        _count_examples(function, record)


def pytest_runtest_logreport(report):
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    name = report.nodeid.split("::")[-1].split("[")[0]
    key = f"{Path(report.nodeid.split('::')[0]).name}::{name}"
    if key in _FUZZ_COUNTS:
        outcomes = _FUZZ_COUNTS[key]["outcomes"]
        outcomes[report.outcome] = outcomes.get(report.outcome, 0) + 1


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("CMDA_FUZZ_REPORT")
    worker = getattr(session.config, "workerinput", None)
    if target and worker is not None and _FUZZ_COUNTS:
        Path(f"{target}.{worker['workerid']}.part").write_text(json.dumps(_FUZZ_COUNTS))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    target = os.environ.get("CMDA_FUZZ_REPORT")
    if not target or getattr(config, "workerinput", None) is not None:
        return
    sys.path.insert(0, str(FUZZ_DIR))
    import fuzz_report  # noqa: E402 - tests/fuzz/fuzz_report.py (not a package)

    report = fuzz_report.merge(_FUZZ_COUNTS, target, profile=os.environ.get("HYPOTHESIS_PROFILE", "ci"))
    if report["properties"]:
        fuzz_report.save(report, target)
        terminalreporter.write_line(fuzz_report.table(report))
