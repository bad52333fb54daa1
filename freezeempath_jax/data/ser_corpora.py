"""Speech-emotion-recognition corpora read from a local `manual_dir` in their published layouts.

Every parser walks the corpus as its owners distribute it, maps its labels onto the 5 release
classes (`EMOTIONS`: angry, surprised, happy, sad, neutral), drops the other classes (counted
by source label) and yields plain dict records:

    {"id", "audio" (path), "label" (index into EMOTIONS), "emotion", "speaker", "transcript",
     "split", "corpus", "language", "source_label", "attributes" (dict, possibly empty),
     "gender" ("female" / "male"), "age_group" (`AGE_GROUPS`)}

`transcript`, `speaker`, `gender` and `age_group` are "" where a corpus has none (speaker
metadata, for the paralinguistic heads of configs/osum_echat.py: IEMOCAP gives the gender of
each utterance's speaker; CREMA-D gives gender and age from its VideoDemographics.csv when
that file lies beside AudioWAV/ or in `manual_dir`; the others give neither). Records whose audio is missing or
whose label is unknown are skipped and counted in a `SkipReport`; a missing `manual_dir` or a
layout that does not match raises `CorpusLayoutError`, which says what was expected where.
Audio is not decoded here: the tfds builders (`builders.py`) do that and skip unreadable,
empty, silent and too-long clips into the same report.

Corpora, where to get them, and the splits used here:

| corpus  | get it from                                         | train / validation / test      |
|---------|-----------------------------------------------------|--------------------------------|
| IEMOCAP | https://sail.usc.edu/iemocap/ (licence form)        | sessions 1-4 / - / session 5   |
| MELD    | https://affective-meld.github.io/ (MELD.Raw.tar.gz) | official train / dev / test    |
| RAVDESS | https://zenodo.org/record/1188976 (Audio_Speech_...) | actors 1-20 / - / 21-24       |
| CREMA-D | https://github.com/CheyneyComputerScience/CREMA-D    | actors 1001-1081 / - / 1082-91 |
| ESD     | https://github.com/HLTSingapore/Emotional-Speech-Data | official train / eval / test  |
| CASIA   | CASIA Chinese emotional corpus (public 1,200 clips) | 2 speakers / - / 2 speakers    |
| CaFE    | https://zenodo.org/record/1478765 (CaFE_48k.zip)    | actors 1-10 / - / 11-12        |

FreezeEmpath evaluates on IEMOCAP session 5, the MELD test set and, as unseen corpora, all of
RAVDESS, CASIA and CaFE: read those with the split `"train+test"`.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from freezeempath_jax.models.configs import EMOTIONS

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".aiff", ".aif")
# Order of the dimensional attributes wherever they are stored as a vector.
ATTRIBUTES = ("arousal", "valence", "dominance")
# Age groups of the paralinguistic age head (models.configs.AGE_GROUPS) by age in years:
# under 35 young, 35-54 middle-aged, 55 and over older.
AGE_GROUP_BOUNDS = ((35, "young"), (55, "middle-aged"))


def age_group(age: float) -> str:
    """The age group (`AGE_GROUPS`) of an age in years."""
    for bound, name in AGE_GROUP_BOUNDS:
        if age < bound:
            return name
    return "older"


class CorpusLayoutError(ValueError):
    """`manual_dir` is missing or does not hold the corpus in its published layout."""


class SkipReport:
    """Counts of kept, skipped (bad) and dropped (other-class) records, per split.

    `skip` logs a warning for the first few records of each reason and counts the rest;
    `as_dict` is what gets written next to the data.
    """

    MAX_LOGGED_PER_REASON = 5

    def __init__(self, name: str):
        self.name = name
        self.kept: Counter = Counter()
        self.skipped: Dict[str, Counter] = defaultdict(Counter)
        self.dropped: Dict[str, Counter] = defaultdict(Counter)
        self.examples: Dict[str, List[str]] = defaultdict(list)
        self.notes: List[str] = []

    def keep(self, split: str) -> None:
        self.kept[split] += 1

    def skip(self, reason: str, what: str, split: str = "unknown") -> None:
        self.skipped[split][reason] += 1
        total = sum(c[reason] for c in self.skipped.values())
        if total <= self.MAX_LOGGED_PER_REASON:
            self.examples[reason].append(what)
            log.warning("%s: skipping %s (%s)", self.name, what, reason)
        elif total == self.MAX_LOGGED_PER_REASON + 1:
            log.warning("%s: more records skipped for %s; see the report", self.name, reason)

    def drop(self, source_label: str, split: str = "unknown") -> None:
        self.dropped[split][source_label] += 1

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            log.warning("%s: %s", self.name, message)

    def skipped_by_reason(self) -> Dict[str, int]:
        total: Counter = Counter()
        for counts in self.skipped.values():
            total.update(counts)
        return dict(total)

    def as_dict(self) -> dict:
        return {
            "dataset": self.name,
            "kept": dict(self.kept),
            "skipped": self.skipped_by_reason(),
            "skipped_by_split": {s: dict(c) for s, c in self.skipped.items()},
            "dropped_by_source_label": {s: dict(c) for s, c in self.dropped.items()},
            "examples": dict(self.examples),
            "notes": list(self.notes),
        }

    def log_summary(self) -> None:
        skipped = self.skipped_by_reason()
        log.info("%s: kept %s", self.name, dict(self.kept))
        if skipped:
            log.warning("%s: skipped %d bad records: %s", self.name, sum(skipped.values()), skipped)


def _label(emotion: str) -> int:
    return EMOTIONS.index(emotion)


def _record(
    corpus: str,
    id_: str,
    audio: Path,
    emotion: str,
    split: str,
    source_label: str,
    *,
    speaker: str = "",
    transcript: str = "",
    language: str = "",
    attributes: Optional[Dict[str, float]] = None,
    gender: str = "",
    age: str = "",
) -> dict:
    return {
        "id": id_,
        "audio": os.fspath(audio),
        "label": _label(emotion),
        "emotion": emotion,
        "speaker": speaker,
        "transcript": transcript,
        "split": split,
        "corpus": corpus,
        "language": language,
        "source_label": source_label,
        "attributes": dict(attributes or {}),
        "gender": gender,
        "age_group": age,
    }


def _fold(name: str) -> str:
    """Case-, accent- and normalisation-insensitive key for folder names (macOS zips use NFD)."""
    decomposed = unicodedata.normalize("NFKD", name)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold().strip()


def _subdirs(path: Path) -> List[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _search_dirs(root: Path, match: Callable[[Path], bool], max_depth: int) -> List[Path]:
    """Directories under `root` (itself included) that satisfy `match`, breadth first."""
    found, frontier = [], [root]
    for _ in range(max_depth + 1):
        next_frontier = []
        for d in frontier:
            if match(d):
                found.append(d)
            else:
                next_frontier.extend(_subdirs(d))
        if found:
            return found
        frontier = next_frontier
    return found


def _audio_files(path: Path) -> List[Path]:
    try:
        return sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS and not p.name.startswith(".")
        )
    except OSError:
        return []


def _read_text(path: Path) -> str:
    # Corpus text files come in several encodings (ESD has UTF-8, UTF-16 and GB18030 files).
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("utf-8", errors="replace")


class Corpus:
    """One SER corpus: where it lives, how its labels map, how it is split."""

    name: str = ""
    title: str = ""
    homepage: str = ""
    language: str = ""
    # What `manual_dir` must hold, shown in every layout error.
    layout: str = ""
    splits: Tuple[str, ...] = ("train", "test")

    def check_manual_dir(self, manual_dir) -> Path:
        if manual_dir is None:
            raise CorpusLayoutError(
                f"{self.title}: no manual_dir given; expected a folder holding {self.layout}"
            )
        path = Path(os.fspath(manual_dir)).expanduser()
        if not path.is_dir():
            raise CorpusLayoutError(
                f"{self.title}: manual_dir {path} does not exist or is not a folder; "
                f"expected a folder holding {self.layout}"
            )
        return path

    def layout_error(self, manual_dir: Path, problem: str) -> CorpusLayoutError:
        return CorpusLayoutError(
            f"{self.title}: {problem} under {manual_dir}; expected {self.layout} "
            f"(get the corpus from {self.homepage})"
        )

    def records(self, manual_dir, report: Optional[SkipReport] = None) -> Iterator[dict]:
        """Yields the corpus's records (see the module docstring) in a fixed order."""
        raise NotImplementedError


class Iemocap(Corpus):
    """IEMOCAP: 5 sessions of dyadic conversations, 10 actors, categorical + A/V/D labels.

    Layout: `Session{1..5}/sentences/wav/<dialog>/<utterance>.wav`, labels in
    `Session*/dialog/EmoEvaluation/<dialog>.txt` (lines `[start - end]<TAB>utterance<TAB>label
    <TAB>[valence, activation, dominance]`), transcripts in
    `Session*/dialog/transcriptions/<dialog>.txt` (`utterance [start-end]: text`).
    Classes: ang -> angry, hap and exc -> happy (the usual merge), sad, neu -> neutral,
    sur -> surprised; fru, fea, dis, oth and xxx are dropped. The A/V/D ratings (1-5) are kept
    as attributes (arousal = activation). Split: session 5 is the test set (as in the papers),
    sessions 1-4 train. Speakers are per session and gender (`Ses01F`).
    """

    name = "iemocap"
    title = "IEMOCAP"
    homepage = "https://sail.usc.edu/iemocap/"
    language = "en"
    layout = (
        "IEMOCAP_full_release with Session1..Session5/, each holding sentences/wav/<dialog>/"
        "<utterance>.wav and dialog/EmoEvaluation/<dialog>.txt"
    )
    LABELS = {"ang": "angry", "hap": "happy", "exc": "happy", "sad": "sad", "neu": "neutral",
              "sur": "surprised"}
    DROPPED = ("fru", "fea", "dis", "oth", "xxx")
    TEST_SESSIONS = (5,)
    _LINE = re.compile(
        r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(\S+)\s+(\S+)"  # [start - end] utterance label
        r"\s+\[\s*([^,\]]+),\s*([^,\]]+),\s*([^\]]+)\]"  # [valence, activation, dominance]
    )
    _TRANSCRIPT = re.compile(r"^(\S+)\s+\[[^\]]*\]:\s*(.*)$")

    def _root(self, manual_dir: Path) -> List[Path]:
        def is_root(d: Path) -> bool:
            return any(re.fullmatch(r"Session[1-5]", p.name) for p in _subdirs(d))

        roots = _search_dirs(manual_dir, is_root, max_depth=2)
        if not roots:
            raise self.layout_error(manual_dir, "no Session1..Session5 folders found")
        return [p for p in _subdirs(roots[0]) if re.fullmatch(r"Session[1-5]", p.name)]

    def _transcripts(self, session: Path) -> Dict[str, str]:
        out = {}
        for path in sorted((session / "dialog" / "transcriptions").glob("*.txt")):
            if path.name.startswith("."):
                continue
            for line in _read_text(path).splitlines():
                m = self._TRANSCRIPT.match(line.strip())
                if m:
                    out[m.group(1)] = m.group(2).strip()
        return out

    def records(self, manual_dir, report=None):
        report = report or SkipReport(self.name)
        manual_dir = self.check_manual_dir(manual_dir)
        for session in self._root(manual_dir):
            number = int(session.name[-1])
            split = "test" if number in self.TEST_SESSIONS else "train"
            eval_dir = session / "dialog" / "EmoEvaluation"
            eval_files = sorted(
                p for p in eval_dir.glob("*.txt") if p.is_file() and not p.name.startswith(".")
            )
            if not eval_files:
                raise self.layout_error(manual_dir, f"no label files in {eval_dir}")
            wav_dir = session / "sentences" / "wav"
            if not wav_dir.is_dir():
                raise self.layout_error(manual_dir, f"missing audio folder {wav_dir}")
            transcripts = self._transcripts(session)
            for eval_file in eval_files:
                for line in _read_text(eval_file).splitlines():
                    if not line.startswith("["):
                        continue
                    m = self._LINE.match(line.strip())
                    if not m:
                        report.skip("malformed_annotation", f"{eval_file}: {line.strip()!r}", split)
                        continue
                    utt, source = m.group(3), m.group(4)
                    if source in self.DROPPED:
                        report.drop(source, split)
                        continue
                    if source not in self.LABELS:
                        report.skip("unknown_label", f"{utt} label {source!r}", split)
                        continue
                    dialog = utt.rsplit("_", 1)[0]
                    audio = wav_dir / dialog / f"{utt}.wav"
                    if not audio.is_file():
                        report.skip("missing_audio", os.fspath(audio), split)
                        continue
                    try:
                        valence, arousal, dominance = (float(m.group(i)) for i in (5, 6, 7))
                        attributes = {
                            "arousal": arousal, "valence": valence, "dominance": dominance
                        }
                    except ValueError:
                        attributes = {}
                    gender = utt.rsplit("_", 1)[1][:1]
                    yield _record(
                        self.name, utt, audio, self.LABELS[source], split, source,
                        speaker=f"{utt[:5]}{gender}", transcript=transcripts.get(utt, ""),
                        language=self.language, attributes=attributes,
                        gender={"F": "female", "M": "male"}.get(gender, ""),
                    )


class Meld(Corpus):
    """MELD: utterances from the TV series Friends, 7 emotion classes, official splits.

    Layout (MELD.Raw): `train_sent_emo.csv`, `dev_sent_emo.csv`, `test_sent_emo.csv` (columns
    Sr No., Utterance, Speaker, Emotion, Sentiment, Dialogue_ID, Utterance_ID, ...) and the
    clips `train_splits/`, `dev_splits_complete/`, `output_repeated_splits_test/` holding
    `dia{D}_utt{U}.mp4`; the folders may sit anywhere up to three levels below `manual_dir`.

    The clips are MP4 video, which libsndfile cannot decode (that needs ffmpeg). The parser
    reads a `.wav` or `.flac` sibling with the same stem, so convert once, e.g.
    `for f in */*.mp4; do ffmpeg -nostdin -i "$f" -vn -ac 1 -ar 16000 "${f%.mp4}.wav"; done`.
    Rows with only an MP4 are skipped as `mp4_not_converted`; a split with no converted clip
    at all is a layout error. Classes: anger, joy, sadness, surprise, neutral map to angry,
    happy, sad, surprised, neutral; fear and disgust are dropped. Splits: train, validation
    (dev), test.
    """

    name = "meld"
    title = "MELD"
    homepage = "https://affective-meld.github.io/"
    language = "en"
    splits = ("train", "validation", "test")
    layout = (
        "MELD.Raw with train_sent_emo.csv / dev_sent_emo.csv / test_sent_emo.csv and clip "
        "folders train_splits/ dev_splits_complete/ output_repeated_splits_test/ holding "
        "dia{D}_utt{U}.wav (converted from the .mp4 clips with ffmpeg)"
    )
    SPLIT_FILES = {
        "train": ("train_sent_emo.csv", "train_splits"),
        "validation": ("dev_sent_emo.csv", "dev_splits_complete"),
        "test": ("test_sent_emo.csv", "output_repeated_splits_test"),
    }
    LABELS = {"anger": "angry", "joy": "happy", "sadness": "sad", "surprise": "surprised",
              "neutral": "neutral"}
    DROPPED = ("fear", "disgust")
    COLUMNS = ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")
    MP4_NOTE = (
        "MELD clips are .mp4 video that cannot be decoded without ffmpeg; convert them to "
        ".wav siblings (ffmpeg -i dia0_utt0.mp4 -vn -ac 1 -ar 16000 dia0_utt0.wav)"
    )

    def _find(self, manual_dir: Path, name: str, want_dir: bool) -> Optional[Path]:
        frontier = [manual_dir]
        for _ in range(4):
            for d in frontier:
                candidate = d / name
                if candidate.is_dir() if want_dir else candidate.is_file():
                    return candidate
            frontier = [s for d in frontier for s in _subdirs(d)]
        return None

    def records(self, manual_dir, report=None):
        report = report or SkipReport(self.name)
        manual_dir = self.check_manual_dir(manual_dir)
        found_any = False
        for split, (csv_name, clip_name) in self.SPLIT_FILES.items():
            csv_path = self._find(manual_dir, csv_name, want_dir=False)
            if csv_path is None:
                continue
            found_any = True
            clip_dir = self._find(manual_dir, clip_name, want_dir=True)
            if clip_dir is None:
                raise self.layout_error(manual_dir, f"{csv_name} found but no {clip_name}/ folder")
            with open(csv_path, newline="", encoding="utf-8", errors="replace") as f:
                reader = csv.DictReader(f)
                missing = [c for c in self.COLUMNS if c not in (reader.fieldnames or [])]
                if missing:
                    raise CorpusLayoutError(
                        f"MELD: {csv_path} lacks columns {missing}; expected the header "
                        f"Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,..."
                    )
                rows = list(reader)
            usable = 0
            mp4_only = 0
            for line_no, row in enumerate(rows, start=2):
                source = (row.get("Emotion") or "").strip().lower()
                dialogue = (row.get("Dialogue_ID") or "").strip()
                utterance = (row.get("Utterance_ID") or "").strip()
                stem = f"dia{dialogue}_utt{utterance}"
                if source in self.DROPPED:
                    report.drop(source, split)
                    continue
                if source not in self.LABELS:
                    report.skip("unknown_label", f"{csv_path}:{line_no} label {source!r}", split)
                    continue
                candidates = [clip_dir / (stem + ext) for ext in (".wav", ".flac")]
                audio = next((p for p in candidates if p.is_file()), None)
                if audio is None:
                    if (clip_dir / (stem + ".mp4")).is_file():
                        mp4_only += 1
                        mp4 = os.fspath(clip_dir / (stem + ".mp4"))
                        report.skip("mp4_not_converted", mp4, split)
                    else:
                        report.skip("missing_audio", os.fspath(clip_dir / (stem + ".wav")), split)
                    continue
                usable += 1
                yield _record(
                    self.name, f"{split}/{stem}", audio, self.LABELS[source], split, source,
                    speaker=(row.get("Speaker") or "").strip(),
                    transcript=(row.get("Utterance") or "").strip(), language=self.language,
                )
            if mp4_only:
                report.note(self.MP4_NOTE)
            if usable == 0 and mp4_only:
                raise self.layout_error(
                    manual_dir, f"{clip_dir} holds .mp4 clips but no .wav: {self.MP4_NOTE}"
                )
        if not found_any:
            raise self.layout_error(manual_dir, "none of train/dev/test_sent_emo.csv found")


class Ravdess(Corpus):
    """RAVDESS speech: 24 actors, two statements, 8 expressions coded in the file names.

    Layout: `Actor_XX/03-01-EE-II-SS-RR-AA.wav` (modality 03 audio-only, vocal channel 01
    speech, emotion EE, intensity II, statement SS, repetition RR, actor AA). Emotions:
    01 neutral, 03 happy, 04 sad, 05 angry, 08 surprised are kept; 02 calm, 06 fearful and
    07 disgust are dropped, as are song files (vocal channel 02). Transcripts are the two
    statements. Split (speaker independent): actors 1-20 train, 21-24 test; FreezeEmpath
    uses the whole corpus as an unseen test set (`split="train+test"`).
    """

    name = "ravdess"
    title = "RAVDESS"
    homepage = "https://zenodo.org/record/1188976"
    language = "en"
    layout = "Actor_01..Actor_24/ folders of 03-01-EE-II-SS-RR-AA.wav files"
    LABELS = {"01": "neutral", "03": "happy", "04": "sad", "05": "angry", "08": "surprised"}
    DROPPED = {"02": "calm", "06": "fearful", "07": "disgust"}
    STATEMENTS = {"01": "Kids are talking by the door.", "02": "Dogs are sitting by the door."}
    TEST_ACTORS = (21, 22, 23, 24)
    _NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")

    def records(self, manual_dir, report=None):
        report = report or SkipReport(self.name)
        manual_dir = self.check_manual_dir(manual_dir)

        def is_actor(d: Path) -> bool:
            return re.fullmatch(r"Actor_\d\d", d.name) is not None

        actors = _search_dirs(manual_dir, is_actor, max_depth=2)
        if not actors:
            raise self.layout_error(manual_dir, "no Actor_XX folders found")
        for actor_dir in actors:
            for audio in _audio_files(actor_dir):
                m = self._NAME.match(audio.stem)
                if not m:
                    report.skip("bad_filename", os.fspath(audio))
                    continue
                modality, channel, code, _intensity, statement, _rep, actor = m.groups()
                split = "test" if int(actor) in self.TEST_ACTORS else "train"
                if modality != "03" or channel != "01":
                    report.drop("song" if channel == "02" else f"modality_{modality}", split)
                    continue
                if code in self.DROPPED:
                    report.drop(self.DROPPED[code], split)
                    continue
                if code not in self.LABELS or statement not in self.STATEMENTS:
                    what = f"{audio} (emotion {code}, statement {statement})"
                    report.skip("unknown_label", what, split)
                    continue
                yield _record(
                    self.name, audio.stem, audio, self.LABELS[code], split, code,
                    speaker=f"actor{actor}", transcript=self.STATEMENTS[statement],
                    language=self.language,
                )


class CremaD(Corpus):
    """CREMA-D: 91 actors, 12 sentences, 6 emotions coded in the file names.

    Layout: `AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav`, e.g. `1001_DFA_ANG_XX.wav`.
    ANG, HAP, SAD, NEU map to angry, happy, sad, neutral; DIS and FEA are dropped. The
    transcript comes from the sentence code. Split (speaker independent): actors 1001-1081
    train, 1082-1091 test. Speaker gender and age group come from the corpus's
    `VideoDemographics.csv` (ActorID, Age, Sex, ...) when it lies beside AudioWAV/ or in
    `manual_dir` (the repository's layout); without it they are left empty (noted).
    """

    name = "crema_d"
    title = "CREMA-D"
    homepage = "https://github.com/CheyneyComputerScience/CREMA-D"
    language = "en"
    layout = "AudioWAV/ with files such as 1001_DFA_ANG_XX.wav"
    LABELS = {"ANG": "angry", "HAP": "happy", "SAD": "sad", "NEU": "neutral"}
    DROPPED = ("DIS", "FEA")
    SENTENCES = {
        "IEO": "It's eleven o'clock.",
        "TIE": "That is exactly what happened.",
        "IOM": "I'm on my way to the meeting.",
        "IWW": "I wonder what this is about.",
        "TAI": "The airplane is almost full.",
        "MTI": "Maybe tomorrow it will be cold.",
        "IWL": "I would like a new alarm clock.",
        "ITH": "I think I have a doctor's appointment.",
        "DFA": "Don't forget a jacket.",
        "ITS": "I think I've seen this before.",
        "TSI": "The surface is slick.",
        "WSI": "We'll stop in a couple of minutes.",
    }
    FIRST_TEST_ACTOR = 1082
    DEMOGRAPHICS = "VideoDemographics.csv"

    def _demographics(self, folders, report) -> Dict[str, Tuple[str, str]]:
        """{actor: (gender, age group)} from VideoDemographics.csv; {} (noted) without it."""
        path = next((Path(f) / self.DEMOGRAPHICS for f in folders
                     if (Path(f) / self.DEMOGRAPHICS).is_file()), None)
        if path is None:
            report.note(f"no {self.DEMOGRAPHICS} beside AudioWAV/: speaker gender and age "
                        "are left empty")
            return {}
        out = {}
        with open(path, newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f):
                actor = (row.get("ActorID") or "").strip()
                sex = (row.get("Sex") or "").strip().lower()
                try:
                    age = age_group(float(row.get("Age") or ""))
                except ValueError:
                    age = ""
                if actor:
                    out[actor] = ({"female": "female", "male": "male"}.get(sex, ""), age)
        return out
    _NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")

    def records(self, manual_dir, report=None):
        report = report or SkipReport(self.name)
        manual_dir = self.check_manual_dir(manual_dir)

        def holds_clips(d: Path) -> bool:
            if d.name == "AudioWAV":
                return True
            return any(self._NAME.match(p.stem) for p in _audio_files(d)[:50])

        dirs = _search_dirs(manual_dir, holds_clips, max_depth=2)
        if not dirs:
            raise self.layout_error(
                manual_dir, "no AudioWAV/ folder or 1001_DFA_ANG_XX.wav files found"
            )
        demographics = self._demographics([dirs[0].parent, manual_dir], report)
        for audio in _audio_files(dirs[0]):
            m = self._NAME.match(audio.stem)
            if not m:
                report.skip("bad_filename", os.fspath(audio))
                continue
            actor, sentence, code, _level = m.groups()
            gender, age = demographics.get(actor, ("", ""))
            split = "test" if int(actor) >= self.FIRST_TEST_ACTOR else "train"
            if code in self.DROPPED:
                report.drop(code, split)
                continue
            if code not in self.LABELS:
                report.skip("unknown_label", f"{audio} (emotion {code})", split)
                continue
            yield _record(
                self.name, audio.stem, audio, self.LABELS[code], split, code,
                speaker=actor, transcript=self.SENTENCES.get(sentence, ""), language=self.language,
                gender=gender, age=age,
            )


class Esd(Corpus):
    """ESD: 10 Mandarin (0001-0010) and 10 English (0011-0020) speakers, 5 emotions, 350 each.

    Layout: `<speaker>/<Emotion>/[train|evaluation|test/]<speaker>_<number>.wav` with Emotion
    in Angry, Happy, Neutral, Sad, Surprise, and per speaker `<speaker>/<speaker>.txt` with
    lines `<id><TAB><text><TAB><emotion>` (English names, or 中立 生气 快乐 伤心 惊喜 for the
    Mandarin speakers). The folder gives the label; a text-file label that disagrees is
    skipped as `label_mismatch`. Split: the official one, from the split folders when present,
    otherwise from the utterance number (within each block of 350: the first 20 evaluation,
    the next 30 test, the remaining 300 train); evaluation is reported as `validation`.
    """

    name = "esd"
    title = "ESD"
    homepage = "https://github.com/HLTSingapore/Emotional-Speech-Data"
    language = ""
    splits = ("train", "validation", "test")
    layout = (
        "speaker folders 0001..0020, each with Angry/ Happy/ Neutral/ Sad/ Surprise/ "
        "(optionally split into train/ evaluation/ test/) and the transcript file 0001.txt"
    )
    LABELS = {"angry": "angry", "happy": "happy", "neutral": "neutral", "sad": "sad",
              "surprise": "surprised"}
    TEXT_LABELS = {"中立": "neutral", "生气": "angry", "快乐": "happy", "伤心": "sad",
                   "惊喜": "surprised", "neutral": "neutral", "angry": "angry", "happy": "happy",
                   "sad": "sad", "surprise": "surprised"}
    SPLIT_DIRS = {"train": "train", "evaluation": "validation", "test": "test"}

    @staticmethod
    def split_from_number(number: int) -> str:
        position = (number - 1) % 350
        if position < 20:
            return "validation"
        return "test" if position < 50 else "train"

    def _texts(self, speaker_dir: Path) -> Dict[str, Tuple[str, str]]:
        path = speaker_dir / f"{speaker_dir.name}.txt"
        out = {}
        if not path.is_file():
            return out
        for line in _read_text(path).splitlines():
            parts = [p.strip() for p in line.split("\t")]
            if len(parts) >= 3 and parts[0]:
                out[parts[0]] = (parts[1], parts[2])
        return out

    def records(self, manual_dir, report=None):
        report = report or SkipReport(self.name)
        manual_dir = self.check_manual_dir(manual_dir)

        def is_speaker(d: Path) -> bool:
            return re.fullmatch(r"00(0[1-9]|1\d|20)", d.name) is not None and any(
                _fold(s.name) in self.LABELS for s in _subdirs(d)
            )

        speakers = _search_dirs(manual_dir, is_speaker, max_depth=3)
        if not speakers:
            raise self.layout_error(
                manual_dir, "no speaker folders 0001..0020 with emotion folders"
            )
        for speaker_dir in speakers:
            language = "zh" if int(speaker_dir.name) <= 10 else "en"
            texts = self._texts(speaker_dir)
            if not texts:
                report.note(f"no transcript file {speaker_dir / (speaker_dir.name + '.txt')}")
            for emotion_dir in _subdirs(speaker_dir):
                key = _fold(emotion_dir.name)
                if key not in self.LABELS:
                    continue
                emotion = self.LABELS[key]
                split_dirs = [d for d in _subdirs(emotion_dir) if _fold(d.name) in self.SPLIT_DIRS]
                groups = [(self.SPLIT_DIRS[_fold(d.name)], d) for d in split_dirs]
                groups = groups or [(None, emotion_dir)]
                for folder_split, folder in groups:
                    for audio in _audio_files(folder):
                        m = re.fullmatch(r"(\d{4})_(\d{6})", audio.stem)
                        if not m:
                            report.skip("bad_filename", os.fspath(audio))
                            continue
                        split = folder_split or self.split_from_number(int(m.group(2)))
                        text, text_label = texts.get(audio.stem, ("", ""))
                        folded = _fold(text_label)
                        text_emotion = self.TEXT_LABELS.get(folded)
                        if text_emotion is not None and text_emotion != emotion:
                            report.skip(
                                "label_mismatch",
                                f"{audio} is in {emotion_dir.name}/ but labelled {text_label!r}",
                                split,
                            )
                            continue
                        yield _record(
                            self.name, audio.stem, audio, emotion, split, emotion_dir.name,
                            speaker=speaker_dir.name, transcript=text, language=language,
                        )


class Casia(Corpus):
    """CASIA Chinese emotional speech (public part): 4 speakers, 6 emotions, no transcripts.

    Layout: `<speaker>/<emotion>/<number>.wav` with speakers liuchanhg, wangzhe, zhaoquanyin,
    ZhaoZuoxiang and emotions angry, fear, happy, neutral, sad, surprise. fear is dropped,
    surprise becomes surprised. Split (speaker independent): wangzhe and zhaoquanyin test, the
    other two train; FreezeEmpath uses the whole corpus as an unseen test set
    (`split="train+test"`).
    """

    name = "casia"
    title = "CASIA"
    homepage = "http://www.chineseldc.org/ (CASIA Chinese emotional speech corpus)"
    language = "zh"
    layout = (
        "speaker folders (liuchanhg, wangzhe, ...) each with angry/ fear/ happy/ neutral/ "
        "sad/ surprise/ folders of .wav files"
    )
    LABELS = {"angry": "angry", "happy": "happy", "neutral": "neutral", "sad": "sad",
              "surprise": "surprised"}
    DROPPED = ("fear",)
    TEST_SPEAKERS = ("wangzhe", "zhaoquanyin")

    def records(self, manual_dir, report=None):
        report = report or SkipReport(self.name)
        manual_dir = self.check_manual_dir(manual_dir)
        known = set(self.LABELS) | set(self.DROPPED)

        def is_speaker(d: Path) -> bool:
            return sum(_fold(s.name) in known for s in _subdirs(d)) >= 2

        speakers = _search_dirs(manual_dir, is_speaker, max_depth=3)
        if not speakers:
            raise self.layout_error(manual_dir, "no speaker folders with emotion sub-folders")
        for speaker_dir in speakers:
            split = "test" if _fold(speaker_dir.name) in self.TEST_SPEAKERS else "train"
            for emotion_dir in _subdirs(speaker_dir):
                key = _fold(emotion_dir.name)
                files = _audio_files(emotion_dir)
                if key in self.DROPPED:
                    for _ in files:
                        report.drop(key, split)
                    continue
                if key not in self.LABELS:
                    for audio in files:
                        report.skip("unknown_label", f"{audio} (folder {emotion_dir.name})", split)
                    continue
                for audio in files:
                    yield _record(
                        self.name, f"{speaker_dir.name}_{key}_{audio.stem}", audio,
                        self.LABELS[key], split, key, speaker=speaker_dir.name,
                        language=self.language,
                    )


class Cafe(Corpus):
    """CaFE (Canadian French Emotional): 12 actors, 6 sentences, 7 expressions, 2 intensities.

    Layout: `<Émotion>/<Faible|Fort>/AA-E-I-S.wav` (`Neutre/` has no intensity level; the
    192 kHz edition uses .aiff, also read). The file name is authoritative: actor AA (odd men,
    even women), emotion E in C (Colère), D (Dégoût), J (Joie), N (Neutre), P (Peur),
    S (Surprise), T (Tristesse), intensity I, sentence S. C, J, N, S, T map to angry, happy,
    neutral, surprised, sad; D and P are dropped. Split: actors 1-10 train, 11-12 test;
    FreezeEmpath uses the whole corpus as an unseen test set (`split="train+test"`).
    """

    name = "cafe"
    title = "CaFE"
    homepage = "https://zenodo.org/record/1478765"
    language = "fr"
    layout = (
        "emotion folders Colère/ Dégoût/ Joie/ Neutre/ Peur/ Surprise/ Tristesse/ (with "
        "Faible/ and Fort/ intensity folders) of AA-E-I-S.wav files such as 01-C-1-1.wav"
    )
    LABELS = {"C": "angry", "J": "happy", "N": "neutral", "S": "surprised", "T": "sad"}
    DROPPED = {"D": "degout", "P": "peur"}
    SENTENCES = {
        "1": "Un cheval fou dans mon jardin",
        "2": "Deux ânes aigris au pelage brun",
        "3": "Trois cygnes aveugles au bord du lac",
        "4": "Quatre vieilles truies éléphantesques",
        "5": "Cinq pumas fiers et passionnés",
        "6": "Six ours aimants domestiqués",
    }
    TEST_ACTORS = (11, 12)
    _NAME = re.compile(r"^(\d\d)-([A-Z])-(\d)-(\d)$")

    def records(self, manual_dir, report=None):
        report = report or SkipReport(self.name)
        manual_dir = self.check_manual_dir(manual_dir)
        files = sorted(
            p for p in manual_dir.rglob("*")
            if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS and not p.name.startswith(".")
        )
        clips = [p for p in files if self._NAME.match(p.stem)]
        if not clips:
            raise self.layout_error(manual_dir, "no AA-E-I-S.wav clips found")
        for audio in files:
            m = self._NAME.match(audio.stem)
            if not m:
                report.skip("bad_filename", os.fspath(audio))
                continue
            actor, code, _intensity, sentence = m.groups()
            split = "test" if int(actor) in self.TEST_ACTORS else "train"
            if code in self.DROPPED:
                report.drop(self.DROPPED[code], split)
                continue
            if code not in self.LABELS:
                report.skip("unknown_label", f"{audio} (emotion {code})", split)
                continue
            yield _record(
                self.name, audio.stem, audio, self.LABELS[code], split, code,
                speaker=f"actor{actor}", transcript=self.SENTENCES.get(sentence, ""),
                language=self.language,
            )


CORPORA: Dict[str, Corpus] = {
    c.name: c for c in (Iemocap(), Meld(), Ravdess(), CremaD(), Esd(), Casia(), Cafe())
}


def parse_corpus(name: str, manual_dir, report: Optional[SkipReport] = None) -> Iterator[dict]:
    """Records of corpus `name` (a key of `CORPORA`) read from `manual_dir`."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {sorted(CORPORA)}")
    return CORPORA[name].records(manual_dir, report)


def corpus_table(names: Sequence[str] = tuple(CORPORA)) -> str:
    """A Markdown table of the corpora: where to get them and what layout to point at."""
    lines = ["| corpus | get it from | point `manual_dir` at |", "|---|---|---|"]
    for n in names:
        c = CORPORA[n]
        lines.append(f"| {c.title} | {c.homepage} | {c.layout} |")
    return "\n".join(lines)
