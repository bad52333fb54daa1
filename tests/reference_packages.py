"""The PyTorch reference code for the units-to-waveform parity tests, kept out of the project.

`bigvgan==2.4.1` (NVIDIA's BigVGAN) and `tts-webui-index-tts==2.0.1` (IndexTTS2's s2mel and
MaskGCT codec code) are installed once with `pip install --no-deps --target` into a cache
directory and put on `sys.path` for the tests only: their own pins (transformers 4.52, numpy<2)
would break this environment, and only a few pure-torch files of each are needed.
Tests skip, saying why, only when pip cannot fetch them (no network).
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

PACKAGES = ("bigvgan==2.4.1", "tts-webui-index-tts==2.0.1")
CACHE = Path(os.environ.get("FREEZEEMPATH_TEST_REFS",
                            Path.home() / ".cache" / "freezeempath-jax-test-refs"))


def _installed(target: Path) -> bool:
    return (target / "bigvgan" / "bigvgan.py").is_file() and (
        target / "indextts" / "s2mel" / "modules" / "flow_matching.py").is_file()


def _stub_incidental_imports() -> None:
    # indextts' commons.py imports munch only for its config helpers (never used by the
    # modules under test), and the MaskGCT vocos.py imports two torchaudio mel helpers at
    # module level for a feature extractor we do not build. Neither is installed here.
    if "munch" not in sys.modules:
        try:
            import munch  # noqa: F401
        except ImportError:
            stub = types.ModuleType("munch")
            stub.Munch = dict
            sys.modules["munch"] = stub
    if "torchaudio" not in sys.modules:
        try:
            import torchaudio  # noqa: F401
        except ImportError:
            ta = types.ModuleType("torchaudio")
            fn = types.ModuleType("torchaudio.functional")
            fnfn = types.ModuleType("torchaudio.functional.functional")
            fnfn._hz_to_mel = fnfn._mel_to_hz = None
            ta.functional, fn.functional = fn, fnfn
            sys.modules.update({"torchaudio": ta, "torchaudio.functional": fn,
                                "torchaudio.functional.functional": fnfn})


def install() -> Path:
    """Installs (once) and puts the reference packages on sys.path; skips without network."""
    target = CACHE / "site"
    if not _installed(target):
        target.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
               "--disable-pip-version-check", "--target", str(target), *PACKAGES]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not _installed(target):
            pytest.skip("cannot pip install the reference packages "
                        f"{' '.join(PACKAGES)} (no network?): {proc.stderr.strip()[-300:]}")
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    _stub_incidental_imports()
    return target


@pytest.fixture(scope="session")
def refs():
    """Session fixture: the reference packages' install directory (importable)."""
    return install()
