"""tensorflow-datasets builders for every corpus, without TensorFlow.

They follow the constraints of DESIGN.md section 9: `file_format="array_record"` only,
`tfds.features.Tensor` / `ClassLabel` / `Text` features (audio is stored as int16 samples at
16 kHz in a `Tensor` of shape `(None,)`, never as `tfds.features.Audio`), and the data is read
back with `builder.as_data_source(split)` (random access, what grain consumes).

Builders:
- one per SER corpus of `ser_corpora.CORPORA` (`IemocapBuilder`, `MeldBuilder`, ...), from
  a local `manual_dir` in the corpus's published layout;
- `SyntheticEmotionsBuilder`: the eSpeak NG corpus of `synthetic.py`, rendered in place
  (configs `tiny`, `small`, `bilingual`, or any `SyntheticConfig`);
- `SpeechInstructionsBuilder`: JSONL speech-instruction manifests (`manifests.py`).

Bad records never stop a build: unreadable, empty, silent, too short or too long clips, and
records with a missing file or an unknown label, are skipped with a warning and counted. The
counts by reason (and per split, with a few examples and the other-class drops) are logged
and written to `skip_report.json` in the dataset folder, next to the data.

    builder = prepare("ravdess", manual_dir="~/data/RAVDESS", data_dir="~/tensorflow_datasets")
    source = builder.as_data_source("train")     # source[i] -> dict of numpy values
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
from collections import defaultdict
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from freezeempath_jax import audio as audio_lib
from freezeempath_jax.data import manifests as manifests_lib
from freezeempath_jax.data import ser_corpora, synthetic
from freezeempath_jax.data.ser_corpora import ATTRIBUTES, CorpusLayoutError, SkipReport
from freezeempath_jax.models.configs import EMOTIONS

log = logging.getLogger(__name__)

SAMPLING_RATE = 16000
REPORT_FILE = "skip_report.json"
LENGTHS_FILE = "num_samples-{split}.npy"


def _ser_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
            "label": tfds.features.ClassLabel(names=list(EMOTIONS)),
            "speaker": tfds.features.Text(),
            "transcript": tfds.features.Text(),
            "language": tfds.features.Text(),
            "source_label": tfds.features.Text(),
            # arousal, valence, dominance; NaN where the corpus has no ratings.
            "attributes": tfds.features.Tensor(shape=(len(ATTRIBUTES),), dtype=np.float32),
            # speaker metadata for the paralinguistic heads; "" where the corpus has none
            "gender": tfds.features.Text(),
            "age_group": tfds.features.Text(),
        }
    )


# Version of the emotion-speech builders (SER corpora and the synthetic corpus).
SER_VERSION = tfds.core.Version("1.1.0")
SER_RELEASE_NOTES = {"1.0.0": "First release.",
                     "1.1.0": "Speaker gender and age group (paralinguistic heads)."}


def header_problem(path: str, *, max_seconds: float = 30.0) -> Tuple[Optional[str], str]:
    """What the file and its header already say is wrong with a clip: `(reason, detail)`.

    Cheap (no decoding): missing_audio, empty (0 bytes or 0 frames), unreadable, too_long.
    """
    if not os.path.exists(path):
        return "missing_audio", "file does not exist"
    if os.path.getsize(path) == 0:
        return "empty", "file has 0 bytes"
    try:
        seconds = audio_lib.duration_seconds(path)
    except audio_lib.AudioError as e:
        return "unreadable", str(e)
    if seconds == 0:
        return "empty", "no samples"
    if seconds > max_seconds:
        return "too_long", f"{seconds:.1f} s > {max_seconds} s"
    return None, ""


def decode_clip(
    path: str,
    *,
    max_seconds: float = 30.0,
    min_seconds: float = 0.1,
    silence_peak: float = 1e-4,
) -> Tuple[Optional[np.ndarray], Optional[str], str]:
    """Decodes `path` to int16 samples at 16 kHz, or says why the clip is unusable.

    Returns `(samples, None, "")` or `(None, reason, detail)` with reason one of
    missing_audio, unreadable, empty, too_long, too_short, silent.
    """
    reason, detail = header_problem(path, max_seconds=max_seconds)
    if reason is not None:
        return None, reason, detail
    try:
        samples = audio_lib.load_audio(path, SAMPLING_RATE)
    except audio_lib.AudioError as e:
        reason = "empty" if "no samples" in str(e) else "unreadable"
        return None, reason, str(e)
    if samples.size < min_seconds * SAMPLING_RATE:
        return None, "too_short", f"{samples.size / SAMPLING_RATE:.3f} s < {min_seconds} s"
    peak = float(np.max(np.abs(samples)))
    if peak < silence_peak:
        return None, "silent", f"peak {peak:.2e} < {silence_peak:.0e}"
    return float_to_int16(samples), None, ""


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    """float audio in [-1, 1] -> int16 (clipped, rounded)."""
    return np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


class _SpeechBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common machinery: clip checks, the skip report, the per-split length files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(
        self,
        *,
        max_seconds: float = 30.0,
        min_seconds: float = 0.1,
        silence_peak: float = 1e-4,
        file_format: str = "array_record",
        **kwargs,
    ):
        if str(file_format) != "array_record":
            # TFRecord writing and reading would need TensorFlow.
            raise ValueError(
                f"only file_format='array_record' works without TensorFlow, got {file_format!r}"
            )
        self.max_seconds = max_seconds
        self.min_seconds = min_seconds
        self.silence_peak = silence_peak
        self.report = SkipReport(self.name)
        super().__init__(file_format="array_record", **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds 4.9.10 resolves this through `importlib_resources`, which it does not declare as
        # a dependency; the module file is what it would find.
        return epath.Path(inspect.getfile(cls))

    def _clip(self, path: str, what: str, split: str) -> Optional[np.ndarray]:
        samples, reason, detail = decode_clip(
            path, max_seconds=self.max_seconds, min_seconds=self.min_seconds,
            silence_peak=self.silence_peak,
        )
        if reason is not None:
            self.report.skip(reason, f"{what}: {detail}", split)
        return samples

    def _usable_splits(self, by_split: Dict[str, list]) -> Dict[str, list]:
        """Drops records whose file header is already bad, and splits left empty.

        tfds cannot write an empty split, so bad files must be known before generation.
        """
        out = {}
        for split, records in sorted(by_split.items()):
            kept = []
            for record in records:
                reason, detail = header_problem(record["audio"], max_seconds=self.max_seconds)
                if reason is None:
                    kept.append(record)
                else:
                    self.report.skip(reason, f"{record['id']}: {detail}", split)
            if kept:
                out[split] = kept
            else:
                self.report.note(f"split {split!r} has no usable clip and is left out")
        if not out:
            raise CorpusLayoutError(
                f"{self.name}: no usable clips at all (skipped: {self.report.skipped_by_reason()})"
            )
        return out

    def _examples(self, records, split, make_example) -> Iterator[Tuple[str, dict]]:
        """Decodes each record's clip (skipping bad ones) and yields `make_example`'s output."""
        yielded = 0
        for record in records:
            samples = self._clip(record["audio"], record["id"], split)
            if samples is None:
                continue
            self.report.keep(split)
            yielded += 1
            yield record["id"], make_example(record, samples)
        if not yielded:
            # Only when every clip of the split decodes to silence or too little audio.
            raise CorpusLayoutError(
                f"{self.name}: every clip of split {split!r} was skipped "
                f"({dict(self.report.skipped.get(split, {}))}); nothing to write"
            )

    def _manual_dir(self, dl_manager) -> str:
        try:
            return os.fspath(dl_manager.manual_dir)
        except AssertionError as e:
            # tfds raises a bare AssertionError for a missing or empty manual_dir.
            first_line = (str(e).splitlines() or ["manual_dir is missing"])[0].split(". Create")[0]
            raise CorpusLayoutError(
                f"{self.name}: {first_line}. Expected: {self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}"
            ) from None

    def _download_and_prepare(self, dl_manager, download_config=None):
        super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
        # Generators have run by now, so the report is complete; self.data_dir is the
        # temporary folder that tfds renames into place.
        self.report.log_summary()
        with open(os.path.join(self.data_dir, REPORT_FILE), "w", encoding="utf-8") as f:
            json.dump(self.report.as_dict(), f, indent=2, ensure_ascii=False)

    def _post_download_and_prepare_hook(self) -> None:
        # Per-split clip lengths let pipelines bucket by length without reading the audio.
        for split in self.info.splits:
            source = self.as_data_source(split)
            lengths = np.array([len(source[i]["audio"]) for i in range(len(source))], np.int64)
            np.save(os.path.join(self.data_dir, LENGTHS_FILE.format(split=split)), lengths)

    def skip_report(self) -> dict:
        """The skip report written next to the prepared data."""
        with open(os.path.join(self.data_dir, REPORT_FILE), encoding="utf-8") as f:
            return json.load(f)


def _attributes(record: dict) -> np.ndarray:
    values = record.get("attributes") or {}
    return np.array([values.get(k, np.nan) for k in ATTRIBUTES], dtype=np.float32)


class _SerCorpusBuilder(_SpeechBuilder, skip_registration=True):
    """Builder of one corpus of `ser_corpora.CORPORA` (set `CORPUS`)."""

    CORPUS = ""
    VERSION = SER_VERSION
    RELEASE_NOTES = SER_RELEASE_NOTES

    @classmethod
    def corpus(cls) -> ser_corpora.Corpus:
        return ser_corpora.CORPORA[cls.CORPUS]

    def _info(self):
        corpus = self.corpus()
        return tfds.core.DatasetInfo(
            builder=self,
            description=(corpus.__doc__ or "").strip(),
            features=_ser_features(),
            homepage=corpus.homepage,
        )

    def _split_generators(self, dl_manager):
        manual_dir = self._manual_dir(dl_manager)
        by_split: Dict[str, list] = defaultdict(list)
        for record in self.corpus().records(manual_dir, self.report):
            by_split[record["split"]].append(record)
        if not by_split:
            raise CorpusLayoutError(
                f"{self.corpus().title}: no usable records under {manual_dir} "
                f"(skipped: {self.report.skipped_by_reason()}); expected {self.corpus().layout}"
            )
        return {
            split: self._generate_examples(records, split)
            for split, records in self._usable_splits(by_split).items()
        }

    def _generate_examples(self, records, split) -> Iterator[Tuple[str, dict]]:
        def example(record, samples):
            return {
                "id": record["id"],
                "audio": samples,
                "label": record["label"],
                "speaker": record["speaker"],
                "transcript": record["transcript"],
                "language": record["language"],
                "source_label": record["source_label"],
                "attributes": _attributes(record),
                "gender": record.get("gender", ""),
                "age_group": record.get("age_group", ""),
            }

        return self._examples(records, split, example)


def _ser_builder(class_name: str, corpus_name: str, registered_name: str):
    corpus = ser_corpora.CORPORA[corpus_name]
    instructions = (
        f"Get {corpus.title} from {corpus.homepage} and point manual_dir at the folder holding "
        f"{corpus.layout}."
    )
    return type(
        class_name,
        (_SerCorpusBuilder,),
        {
            "name": registered_name,
            "CORPUS": corpus_name,
            "MANUAL_DOWNLOAD_INSTRUCTIONS": instructions,
            "__doc__": f"{corpus.title} (tfds, array_record).\n\n{corpus.__doc__}",
            "__module__": __name__,
        },
    )


# Registered under an `fe_` prefix: tfds has its own (TensorFlow-based) `crema_d`.
IemocapBuilder = _ser_builder("IemocapBuilder", "iemocap", "fe_iemocap")
MeldBuilder = _ser_builder("MeldBuilder", "meld", "fe_meld")
RavdessBuilder = _ser_builder("RavdessBuilder", "ravdess", "fe_ravdess")
CremaDBuilder = _ser_builder("CremaDBuilder", "crema_d", "fe_crema_d")
EsdBuilder = _ser_builder("EsdBuilder", "esd", "fe_esd")
CasiaBuilder = _ser_builder("CasiaBuilder", "casia", "fe_casia")
CafeBuilder = _ser_builder("CafeBuilder", "cafe", "fe_cafe")


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """Size, languages, seed and split shares of a synthetic corpus."""

    num_per_emotion: int = 40
    languages: Tuple[str, ...] = ("en",)
    seed: int = 0
    split_fractions: Tuple[float, float, float] = (0.8, 0.1, 0.1)


class SyntheticEmotionsBuilder(_SpeechBuilder):
    """The eSpeak NG emotional speech corpus of `synthetic.py`, rendered while building."""

    name = "fe_synthetic_emotions"
    BUILDER_CONFIGS = [
        SyntheticConfig(name="tiny", num_per_emotion=5, description="5 clips per emotion (en)"),
        SyntheticConfig(name="small", num_per_emotion=60, description="60 clips per emotion (en)"),
        SyntheticConfig(
            name="bilingual", num_per_emotion=200, languages=("en", "zh"),
            description="200 clips per emotion and language, English and Mandarin",
        ),
    ]
    DEFAULT_CONFIG_NAME = "small"
    VERSION = SER_VERSION
    RELEASE_NOTES = SER_RELEASE_NOTES

    def _info(self):
        features = dict(_ser_features())
        features["kind"] = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=(synthetic.__doc__ or "").strip(),
            features=tfds.features.FeaturesDict(features),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        plan = synthetic.synthetic_plan(
            cfg.num_per_emotion, cfg.languages, cfg.seed, cfg.split_fractions
        )
        by_split: Dict[str, list] = defaultdict(list)
        for record in plan:
            by_split[record["split"]].append(record)
        return {split: self._generate_examples(recs, split) for split, recs in by_split.items()}

    def _generate_examples(self, records, split):
        for record in records:
            samples = float_to_int16(synthetic.render_synthetic(record))
            self.report.keep(split)
            yield record["id"], {
                "id": record["id"],
                "audio": samples,
                "label": record["label"],
                "speaker": record["speaker"],
                "transcript": record["transcript"],
                "language": record["language"],
                "source_label": record["emotion"],
                "attributes": np.full(len(ATTRIBUTES), np.nan, np.float32),
                "gender": record.get("gender", ""),
                "age_group": "",
                "kind": record["kind"],
            }


class SpeechInstructionsBuilder(_SpeechBuilder):
    """Speech-instruction data from JSONL manifests (see `manifests.py` for the format).

    Args (besides the tfds ones):
      manifests: `{split: path}`; `config` names this set of manifests (default "default"),
        so several sets can live in one data_dir.
      unit_vocab_size: checked against every unit id when given.
    """

    name = "fe_speech_instructions"
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default")]

    def __init__(
        self,
        *,
        manifests: Optional[Dict[str, str]] = None,
        unit_vocab_size: Optional[int] = None,
        **kwargs,
    ):
        self.manifests = dict(manifests or {})
        self.unit_vocab_size = unit_vocab_size
        if isinstance(kwargs.get("config"), str) and kwargs["config"] != "default":
            kwargs["config"] = tfds.core.BuilderConfig(name=kwargs["config"])
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=(manifests_lib.__doc__ or "").strip(),
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
                    "transcript": tfds.features.Text(),
                    "reply": tfds.features.Text(),
                    "units": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "has_units": tfds.features.Tensor(shape=(), dtype=np.bool_),
                    "emotion": tfds.features.Text(),
                    # index into EMOTIONS, -1 when the manifest gives no emotion
                    "label": tfds.features.Tensor(shape=(), dtype=np.int32),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        if not self.manifests:
            raise ValueError(
                f"{self.name}: pass manifests={{'train': 'path/train.jsonl', ...}} to the builder"
            )
        by_split = {}
        for split, path in self.manifests.items():
            by_split[split] = manifests_lib.read_manifest(
                path, unit_vocab_size=self.unit_vocab_size, strict=False, report=self.report,
                split=split, check_audio=False,
            )
        return {
            split: self._generate_examples(records, split)
            for split, records in self._usable_splits(by_split).items()
        }

    def _generate_examples(self, records, split):
        def example(record, samples):
            units = record["units"]
            return {
                "id": record["id"],
                "audio": samples,
                "transcript": record["transcript"],
                "reply": record["reply"],
                "units": np.asarray(units if units is not None else [], np.int32),
                "has_units": units is not None,
                "emotion": record["emotion"] or "",
                "label": record["label"],
            }

        return self._examples(records, split, example)


BUILDERS = {
    "iemocap": IemocapBuilder,
    "meld": MeldBuilder,
    "ravdess": RavdessBuilder,
    "crema_d": CremaDBuilder,
    "esd": EsdBuilder,
    "casia": CasiaBuilder,
    "cafe": CafeBuilder,
    "synthetic": SyntheticEmotionsBuilder,
    "speech_instructions": SpeechInstructionsBuilder,
}


def prepare(
    name: str, *, manual_dir=None, data_dir=None, **builder_kwargs
) -> tfds.core.DatasetBuilder:
    """Builds dataset `name` (a key of `BUILDERS`) into `data_dir` and returns its builder.

    SER corpora need `manual_dir` (checked first, so a wrong path gives one clear error);
    the synthetic corpus takes `config=` ("tiny", "small", "bilingual" or a
    `SyntheticConfig`); speech instructions take `manifests={split: path}`. An already
    prepared dataset is reused.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
    cls = BUILDERS[name]
    download_config = None
    if issubclass(cls, _SerCorpusBuilder):
        cls.corpus().check_manual_dir(manual_dir)
        manual_dir = os.path.expanduser(os.fspath(manual_dir))
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    elif manual_dir is not None:
        download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    if data_dir is not None:
        data_dir = os.path.expanduser(os.fspath(data_dir))
    builder = cls(data_dir=data_dir, **builder_kwargs)
    builder.download_and_prepare(download_config=download_config)
    return builder
