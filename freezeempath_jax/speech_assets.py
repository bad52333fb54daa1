"""The speech stage the package ships: the speech decoder and unit codec that the full
`demo --speech` recipe trained, so that `freezeempath-jax demo` speaks within its 15 minutes
on a 2-core CPU (training stage 3 takes about 45 more; docs/speech_out.md).

    freezeempath_jax/assets/demo_speech/
        speech_decoder.safetensors  the trained decoder (`speech_decoder/...` keys, float16)
        unit_codec/                 the unit codec fitted in that run (`save_unit_codec`)
        provenance.json             how it was made: recipe, steps, decoder config, the chat
                                    model whose states it read, the command, the machine,
                                    the training and speech-report figures
        metrics.jsonl               stage 3's training log
        speech_report.json          that run's speech report (40 held-out replies, per row)

Reproduce: `freezeempath-jax demo --workdir W --speech`, then
`python -m freezeempath_jax.speech_assets export W` (writes the folder above).

The decoder reads the frozen LLM's states of a reply; it was trained on the replies of the
seed-0 demo chat model, and the demo's chat model is retrained on every machine. Both read
the same frozen SmolLM2, so the states it meets are the ones it learned from up to the small
difference the retrained adapter makes to the prompt (the CI test of this module speaks the
reduced demo's replies through it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "demo_speech"
DECODER_FILE = "speech_decoder.safetensors"
CODEC_DIR = "unit_codec"
PROVENANCE = "provenance.json"
MARKER = "SHIPPED.json"  # in an installed stage folder: it holds the shipped decoder
EXPORT_COMMAND = "python -m freezeempath_jax.speech_assets export WORKDIR"


class ShippedSpeechError(ValueError):
    """The shipped speech stage is missing, damaged, or does not fit this demo's decoder;
    one line naming the file or the setting."""


def _read_provenance(src: Path) -> dict:
    path = src / PROVENANCE
    if not path.is_file():
        raise ShippedSpeechError(f"{path} is missing: no shipped speech stage here (train one "
                                 "with `freezeempath-jax demo --speech`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShippedSpeechError(f"{path} is not valid JSON: {e}") from None


def shipped_info(src=ASSET_DIR) -> Optional[dict]:
    """The shipped stage's provenance (None when the package holds none)."""
    try:
        return _read_provenance(Path(src))
    except ShippedSpeechError:
        return None


def is_shipped(stage_dir) -> bool:
    """Whether `stage_dir` holds the shipped decoder (installed by `install`), not one
    trained there."""
    return os.path.isfile(os.path.join(stage_dir, MARKER))


def read_decoder(src=ASSET_DIR) -> dict:
    """The shipped decoder's parameters as a nested dict of float32 numpy arrays
    (`{"speech_decoder": {...}}`)."""
    from freezeempath_jax.checkpoints.errors import CheckpointError
    from freezeempath_jax.checkpoints.safetensors_io import SafetensorsSource
    from freezeempath_jax.tree import unflatten

    path = Path(src) / DECODER_FILE
    if not path.is_file():
        raise ShippedSpeechError(f"{path} is missing")
    try:
        source = SafetensorsSource(str(path))
        flat = {k: np.asarray(source.read(k), np.float32) for k in source.keys()}
    except CheckpointError as e:
        raise ShippedSpeechError(f"{path}: {str(e).splitlines()[0]}") from None
    bad = [k for k in flat if not k.startswith("speech_decoder/")]
    if bad:
        raise ShippedSpeechError(f"{path}: keys outside speech_decoder/: {bad[:4]}")
    return unflatten(flat)


def export(workdir: str, dest=ASSET_DIR) -> Path:
    """Writes the shipped-stage folder from a finished `demo --workdir W --speech` run:
    stage 3's trained decoder (float16), its codec, training log and speech report, and the
    provenance. Returns `dest`."""
    from freezeempath_jax.checkpoints.safetensors_io import save_safetensors_sharded
    from freezeempath_jax.checkpoints.workdir import load_trained_params
    from freezeempath_jax.tree import flatten_with_paths

    stage = Path(workdir) / "stage_3"
    if is_shipped(str(stage)):
        raise ShippedSpeechError(f"{stage} holds the shipped decoder, not one trained there")
    report = Path(workdir) / "report" / "speech.json"
    for need in (stage / "config.json", stage / "unit_decoder", stage / "metrics.jsonl", report):
        if not need.exists():
            raise ShippedSpeechError(f"{need} is missing: run `freezeempath-jax demo --workdir "
                                     f"{workdir} --speech` to the end first")
    params, meta = load_trained_params(str(stage))
    flat = {k: np.asarray(v, np.float16) for k, v in flatten_with_paths(params).items()
            if k.startswith("speech_decoder/")}
    if not flat:
        raise ShippedSpeechError(f"{stage}: its checkpoint holds no speech_decoder parameters")
    cfg = json.loads((stage / "config.json").read_text())
    spoken = json.loads(report.read_text())
    cost_file = stage / "stage3_cost.json"
    cost = json.loads(cost_file.read_text()) if cost_file.is_file() else {}
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    (written,) = save_safetensors_sharded(flat, str(dest))  # one file: 6.9 MB
    os.replace(written, dest / DECODER_FILE)
    shutil.copytree(stage / "unit_decoder", dest / CODEC_DIR)
    shutil.copy(stage / "metrics.jsonl", dest / "metrics.jsonl")
    (dest / "speech_report.json").write_text(json.dumps(spoken, indent=1))
    summary = {k: spoken.get(k) for k in ("num_spoken", "wer_mean", "wer_median",
                                          "target_wer_mean", "sad_vs_happy",
                                          "speaker_spread_std", "time_to_first_audio")}
    provenance = {
        "what": "stage 3 of the full `demo --speech` recipe (speech decoder + unit codec)",
        "steps": int(meta.get("step", 0)),
        "stage": meta.get("stage", "3a"),
        "speech_decoder": cfg["model"]["speech_decoder"],
        "recipes": cfg.get("recipes", {}).get("3a"),
        "unit_input_noise": cfg.get("loss", {}).get("unit_input_noise"),
        "unit_temperature": cfg.get("data", {}).get("unit_temperature"),
        "trained_on_chat_model": {
            "stages": [os.path.basename(x) for x in cfg.get("init", {}).get("previous", [])],
            "seed": cfg.get("train", {}).get("seed"),
            "num_training_records": cost.get("num_records")},
        "machine": _machine(),
        "stage3_cost": cost,
        "speech_report": summary,
        "command": "freezeempath-jax demo --workdir WORKDIR --speech; " + EXPORT_COMMAND,
        "exported": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dtype": "float16",
    }
    (dest / PROVENANCE).write_text(json.dumps(provenance, indent=1, default=str))
    return dest


class _Shipped:
    """Data position stand-in for the installed checkpoint (nothing was iterated)."""

    def __init__(self, source: str):
        self.source = source

    def get_state(self):
        return {"shipped_from": self.source}


def install(stage_dir: str, config, src=ASSET_DIR) -> dict:
    """Makes `stage_dir` a stage-3 workdir holding the shipped decoder: `config.json`
    (`config`, the demo's stage-3 training config, whose `init.previous` names this
    workdir's chat stages), a checkpoint at the shipped step count with the decoder's
    parameters, the codec in `unit_decoder/`, the training log, and a `SHIPPED.json` marker.
    `load_chat_model(stage_dir)` then gives the demo's chat model with the shipped voice.
    ShippedSpeechError when the shipped decoder's config differs from `config`'s (a newer
    decoder layout than the one shipped: train it with `demo --speech`)."""
    from freezeempath_jax.checkpoints.unit_decoder import load_unit_codec
    from freezeempath_jax.train import checkpointing

    src = Path(src)
    prov = _read_provenance(src)
    want = config.model.speech_decoder
    want = want.to_dict() if hasattr(want, "to_dict") else dict(want)
    if _canon(prov.get("speech_decoder")) != _canon(want):
        raise ShippedSpeechError(
            f"{src / PROVENANCE}: the shipped speech decoder's config differs from this "
            "demo's (models.presets.demo_speech_decoder); train stage 3 with "
            "`freezeempath-jax demo --speech` and re-export it")
    params = read_decoder(src)
    load_unit_codec(str(src / CODEC_DIR))  # fail here, not at the first reply
    steps = int(prov["steps"])
    if os.path.exists(stage_dir):
        shutil.rmtree(stage_dir)
    os.makedirs(stage_dir)
    with open(os.path.join(stage_dir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=1, default=str)
    ck = checkpointing.Checkpointer(stage_dir, keep=1, async_save=False)
    try:
        ck.save(steps, {"params": params}, _Shipped(str(src)),
                {"stage": "3a", "step": steps, "shipped": str(src)})
        ck.manager.wait_until_finished()
    finally:
        ck.close()
    shutil.copytree(src / CODEC_DIR, os.path.join(stage_dir, "unit_decoder"))
    shutil.copy(src / "metrics.jsonl", os.path.join(stage_dir, "metrics.jsonl"))
    with open(os.path.join(stage_dir, MARKER), "w") as f:
        json.dump({"source": str(src), "steps": steps, "exported": prov.get("exported")}, f)
    return prov


def _machine() -> str:
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")),
                        name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def _canon(d):
    """A config dict as JSON text (tuples and lists alike), for comparison."""
    return json.dumps(d, sort_keys=True, default=str)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) not in (2, 3) or argv[0] != "export":
        print(f"usage: {EXPORT_COMMAND} [DEST]", file=sys.stderr)
        return 2
    dest = export(argv[1], argv[2] if len(argv) == 3 else ASSET_DIR)
    print(f"shipped speech stage written to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
