"""Shared test fixtures: paths to the real speech samples and small helpers."""

import os
from pathlib import Path

import pytest

# Tests compare against float32 references; never let XLA pick lower-precision matmuls.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

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
