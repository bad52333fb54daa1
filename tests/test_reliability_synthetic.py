"""Issue 17: a synthetic corpus is a function of its seed across processes, not just within one."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("espeakng_loader")

# Builds a corpus in a fresh interpreter and prints {relative path: sha256} of every file,
# plus one clip per voice of `VOICES` so that every eSpeak variant is covered whatever the
# plan draws (the breath-noise variants `en-us+f2` and `en+f3` used to differ per process).
_BUILD = r"""
import hashlib, json, os, sys
from freezeempath_jax.data import synthetic
out = sys.argv[1]
synthetic.build_synthetic_corpus(out, 3, ("en", "zh"), seed=0, progress=False)
hashes = {}
for root, _, names in os.walk(out):
    for name in names:
        path = os.path.join(root, name)
        with open(path, "rb") as f:
            data = f.read()
        # Manifests hold absolute paths, which differ between the two output folders.
        data = data.replace(out.encode(), b"OUT")
        hashes[os.path.relpath(path, out)] = hashlib.sha256(data).hexdigest()
for language, voices in synthetic.VOICES.items():
    text = synthetic.NEUTRAL_INSTRUCTIONS[language][0]
    for voice in voices:
        audio = synthetic.synthesize(text, "happy", voice, seed=11)
        hashes["voice:" + voice] = hashlib.sha256(audio.tobytes()).hexdigest()
print(json.dumps(hashes))
"""


def _build(out) -> dict:
    done = subprocess.run(
        # Run from the repository root: `python -c` imports the package found there first.
        [sys.executable, "-c", _BUILD, str(out)], cwd=Path(__file__).resolve().parents[1],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_fresh_processes_build_byte_identical_corpora(tmp_path):
    start = time.time()
    first = _build(tmp_path / "a")
    # eSpeak seeded its noise from time() in whole seconds: make sure the second build starts
    # in a later second, so this test would catch that seed again.
    time.sleep(max(0.0, 1.1 - (time.time() - start)))
    second = _build(tmp_path / "b")
    wavs = [k for k in first if k.endswith(".wav")]
    assert len(wavs) == 30
    voices = {k.split(":", 1)[1] for k in first if k.startswith("voice:")}
    assert {"en-us+f2", "en+f3"} <= voices
    manifests = [json.loads(line) for k in ("train", "validation", "test")
                 for line in open(tmp_path / "a" / f"{k}.jsonl")]
    assert {"en-us+f2", "en+f3"} <= {m["voice"] for m in manifests}
    differing = sorted(k for k in first if first[k] != second.get(k))
    assert set(first) == set(second) and not differing, differing
