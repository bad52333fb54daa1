"""Shared test fixtures: paths to the real speech samples and small helpers."""

import os
from pathlib import Path

import pytest

# Tests compare against float32 references; never let XLA pick lower-precision matmuls.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# Under pytest-xdist with as many workers as cores (the README's `-n 2` on CI's 2 cores), each
# worker keeps to a core of its own: otherwise two processes each run XLA's thread pool over
# both cores and wait on each other's threads. Subprocesses the tests start inherit it.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKER.startswith("gw") and hasattr(os, "sched_setaffinity"):
    _cores = sorted(os.sched_getaffinity(0))
    if _WORKERS == len(_cores) > 1:
        os.sched_setaffinity(0, {_cores[int(_WORKER[2:]) % len(_cores)]})

REPO = Path(__file__).resolve().parents[1]
SHARED_AUDIO = REPO.parent / "shared" / "audio"


@pytest.fixture
def shared_audio_dir():
    """`../shared/audio` beside the checkout; tests using it skip cleanly when absent."""
    if not SHARED_AUDIO.is_dir() or not list(SHARED_AUDIO.glob("*.wav")):
        pytest.skip(f"real speech samples not found at {SHARED_AUDIO}")
    return SHARED_AUDIO


# The longest files go first (the reduced demo takes ~9 min on 2 cores), so that under the
# README's `pytest -n 2 --dist loadfile --no-loadscope-reorder` one worker starts the demo at
# once while the other takes the rest (xdist's default reorder puts files with many tests
# first, which left the demo running alone at the end).
LONGEST_FIRST = ("test_demo.py", "test_trainer.py", "test_osum_echat.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within files and among the rest is kept
