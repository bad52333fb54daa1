"""The speech stage the package ships (`speech_assets`): its files fit this version's demo
decoder, install into a stage-3 workdir that the checkpoint readers load bit for bit, export
back to the same tensors, and fail with one line naming the file when damaged or mismatched.
The demo speaking with it end to end is tests/test_demo.py."""

import dataclasses
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from freezeempath_jax import speech_assets
from freezeempath_jax.models import presets
from freezeempath_jax.models.configs import to_dict
from freezeempath_jax.tree import flatten_with_paths


def _demo_decoder():
    from freezeempath_jax import demo

    return presets.demo_speech_decoder(demo.codec_config().codebook_size,
                                       demo.MAX_REPLY_UNITS)


def _stage_config(decoder):
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.speech_decoder = to_dict(decoder)
    c.stage = "3a"
    return c


def test_shipped_decoder_fits_this_demo():
    """Every parameter of the demo's speech decoder is shipped, with its shape, and the
    provenance names the decoder config this version builds (a changed preset without a
    re-export fails here, not in a user's demo)."""
    from freezeempath_jax.checkpoints.model_tree import abstract_boxed_params
    from flax import linen as nn

    info = speech_assets.shipped_info()
    assert info is not None, "the package ships no speech stage"
    assert speech_assets._canon(info["speech_decoder"]) == speech_assets._canon(
        to_dict(_demo_decoder()))
    assert info["steps"] >= 1000 and info["dtype"] == "float16"
    assert "demo --workdir WORKDIR --speech" in info["command"]
    model = dataclasses.replace(presets.DEMO_SMALL, speech_decoder=_demo_decoder())
    want = {k: v.shape for k, v in
            flatten_with_paths(nn.meta.unbox(abstract_boxed_params(model))).items()
            if k.startswith("speech_decoder/")}
    got = {k: v.shape for k, v in flatten_with_paths(speech_assets.read_decoder()).items()}
    assert got == want
    # trained, not initialised: the decoder's figures are the ones of its speech report
    report = json.loads((speech_assets.ASSET_DIR / "speech_report.json").read_text())
    assert report["num_spoken"] == info["speech_report"]["num_spoken"] >= 20
    assert report["wer_mean"] == info["speech_report"]["wer_mean"]


def test_install_loads_bit_for_bit_and_exports_back(tmp_path):
    from freezeempath_jax.checkpoints.unit_decoder import load_unit_codec
    from freezeempath_jax.checkpoints.workdir import load_trained_params

    stage = str(tmp_path / "w" / "stage_3")
    prov = speech_assets.install(stage, _stage_config(_demo_decoder()))
    assert speech_assets.is_shipped(stage)
    params, meta = load_trained_params(stage)
    assert meta["step"] == prov["steps"] and meta["stage"] == "3a"
    shipped = flatten_with_paths(speech_assets.read_decoder())
    loaded = flatten_with_paths(params)
    assert loaded.keys() == shipped.keys()
    for k in shipped:
        assert loaded[k].dtype == np.float32
        np.testing.assert_array_equal(loaded[k], shipped[k], err_msg=k)
    cfg, codec = load_unit_codec(os.path.join(stage, "unit_decoder"))
    assert cfg.codebook_size == 512
    with open(os.path.join(stage, "config.json")) as f:
        assert json.load(f)["model"]["speech_decoder"]["stream_m"] == 75

    # the installed stage is not a trained one: export refuses it
    with pytest.raises(speech_assets.ShippedSpeechError, match="holds the shipped decoder"):
        speech_assets.export(str(tmp_path / "w"))
    # as a trained stage (marker gone, a speech report beside it) it exports to the same
    # tensors and codec
    os.remove(os.path.join(stage, speech_assets.MARKER))
    (tmp_path / "w" / "report").mkdir()
    shutil.copy(speech_assets.ASSET_DIR / "speech_report.json",
                tmp_path / "w" / "report" / "speech.json")
    out = speech_assets.export(str(tmp_path / "w"), tmp_path / "exported")
    again = flatten_with_paths(speech_assets.read_decoder(out))
    for k in shipped:
        np.testing.assert_array_equal(again[k], shipped[k], err_msg=k)
    prov2 = json.loads((out / speech_assets.PROVENANCE).read_text())
    assert prov2["steps"] == prov["steps"]
    assert speech_assets._canon(prov2["speech_decoder"]) == speech_assets._canon(
        prov["speech_decoder"])


def test_mismatched_or_damaged_shipment_is_one_clear_line(tmp_path):
    # a demo decoder laid out differently from the one shipped
    other = dataclasses.replace(_demo_decoder(), stream_n=1)
    with pytest.raises(speech_assets.ShippedSpeechError, match="provenance.json.*differs"):
        speech_assets.install(str(tmp_path / "a"), _stage_config(other))
    assert not os.path.exists(tmp_path / "a")  # nothing half-written

    src = tmp_path / "copy"
    shutil.copytree(speech_assets.ASSET_DIR, src)
    blob = (src / speech_assets.DECODER_FILE).read_bytes()
    (src / speech_assets.DECODER_FILE).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(speech_assets.ShippedSpeechError,
                       match=r"speech_decoder\.safetensors") as e:
        speech_assets.install(str(tmp_path / "b"), _stage_config(_demo_decoder()), src=src)
    assert "\n" not in str(e.value)

    os.remove(src / speech_assets.PROVENANCE)
    assert speech_assets.shipped_info(src) is None
    with pytest.raises(speech_assets.ShippedSpeechError, match="provenance.json is missing"):
        speech_assets.install(str(tmp_path / "c"), _stage_config(_demo_decoder()), src=src)


def test_speech_modes():
    from freezeempath_jax.demo import _speech_mode

    assert _speech_mode(True) == "train" and _speech_mode(False) == "off"
    assert _speech_mode("shipped") == "shipped"
    with pytest.raises(ValueError, match="speech='loud'"):
        _speech_mode("loud")


def test_demo_command_speaks_with_the_shipped_decoder_by_default():
    from freezeempath_jax import cli

    parser = cli.build_parser()
    assert parser.parse_args(["demo"]).speech == "shipped"
    assert parser.parse_args(["demo", "--speech"]).speech == "train"
    assert parser.parse_args(["demo", "--no-speech"]).speech == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--speech", "--no-speech"])


def test_demo_reuses_a_shipped_or_finished_stage_and_names_an_unfinished_one(tmp_path):
    from freezeempath_jax.demo import shipped_speech_stage

    stage = tmp_path / "w" / "stage_3"
    speech_assets.install(str(stage), _stage_config(_demo_decoder()))
    stamp = os.path.getmtime(stage / "config.json")
    again = shipped_speech_stage(str(tmp_path / "w"))
    assert again["shipped"] == 1 and os.path.getmtime(stage / "config.json") == stamp
    assert again["eval/token_accuracy"] > 0.5  # the shipped run's last evaluation

    (tmp_path / "v" / "stage_3").mkdir(parents=True)  # a `--speech` run stopped early
    with pytest.raises(RuntimeError, match="unfinished stage-3 training"):
        shipped_speech_stage(str(tmp_path / "v"))
