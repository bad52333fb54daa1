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
