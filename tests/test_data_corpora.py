"""SER corpus parsers and tfds builders on tiny fake corpora in each corpus's real layout.

Each fake corpus mixes good clips with a corrupt file, an empty file, a silent clip, a clip
that is too long, an unknown label and classes outside the 5 release classes, so the tests
check the label mapping, the splits, the kept transcripts/speakers and the skip report.
Building needs neither TensorFlow nor the network.
"""

import json
import math
import os
import unicodedata

import numpy as np
import pytest
import soundfile as sf

from freezeempath_jax.data import builders, manifests, ser_corpora
from freezeempath_jax.data.ser_corpora import CorpusLayoutError, SkipReport
from freezeempath_jax.models.configs import EMOTIONS

# Builders get max_seconds=1.0 so a 1.5 s clip counts as too long.
MAX_SECONDS = 1.0


def wav(path, seconds=0.3, sr=16000, amp=0.3, freq=220.0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (amp * np.sin(2 * math.pi * freq * t)).astype(np.float32), sr, subtype="PCM_16")
    return path


def corrupt(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk" + bytes(range(64)))
    return path


def empty(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()
    return path


def by_id(records):
    return {r["id"]: r for r in records}


def build(name, manual_dir, tmp_path, **kw):
    return builders.prepare(
        name, manual_dir=manual_dir, data_dir=tmp_path / "tfds", max_seconds=MAX_SECONDS, **kw
    )


def read_all(builder, split):
    source = builder.as_data_source(split)
    return {source[i]["id"].decode(): source[i] for i in range(len(source))}


# ---------------------------------------------------------------------------------------
# IEMOCAP


def make_iemocap(root):
    base = root / "IEMOCAP_full_release"
    lines = {
        1: [
            ("Ses01F_impro01_F000", "neu", "[2.5000, 2.5000, 2.5000]"),
            ("Ses01F_impro01_M001", "exc", "[4.0000, 3.5000, 3.0000]"),
            ("Ses01F_impro01_F002", "fru", "[2.0000, 3.0000, 3.0000]"),
            ("Ses01F_impro01_F003", "zzz", "[2.0000, 3.0000, 3.0000]"),  # unknown label
            ("Ses01F_impro01_F004", "ang", "[1.5000, 4.0000, 4.0000]"),  # wav missing
            ("Ses01F_impro01_F005", "sad", "[1.5000, 2.0000, 2.0000]"),  # corrupt wav
        ],
        5: [
            ("Ses05M_script01_1_M000", "sur", "[3.0000, 4.5000, 2.5000]"),
            ("Ses05M_script01_1_F001", "hap", "[4.5000, 3.5000, 3.5000]"),
        ],
    }
    for session, entries in lines.items():
        sess = base / f"Session{session}"
        dialog = entries[0][0].rsplit("_", 1)[0]
        eval_dir = sess / "dialog" / "EmoEvaluation"
        eval_dir.mkdir(parents=True)
        (eval_dir / "Categorical").mkdir()
        text = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        trans = []
        for k, (utt, label, vad) in enumerate(entries):
            text += [f"[{k}.0100 - {k + 1}.2000]\t{utt}\t{label}\t{vad}"]
            text += [f"C-E2:\t{label};\t()", ""]
            trans.append(f"{utt} [{k:03d}.0100-{k + 1:03d}.2000]: words of {utt}.")
            if label == "ang":
                continue
            path = sess / "sentences" / "wav" / dialog / f"{utt}.wav"
            corrupt(str(path)) if label == "sad" else wav(str(path))
        (eval_dir / f"{dialog}.txt").write_text("\n".join(text))
        (sess / "dialog" / "transcriptions").mkdir(parents=True)
        (sess / "dialog" / "transcriptions" / f"{dialog}.txt").write_text("\n".join(trans))
    return root


def test_iemocap_parser_and_builder(tmp_path):
    root = make_iemocap(tmp_path / "iemocap")
    report = SkipReport("iemocap")
    recs = by_id(ser_corpora.parse_corpus("iemocap", root, report))
    assert set(recs) == {
        "Ses01F_impro01_F000", "Ses01F_impro01_M001", "Ses01F_impro01_F005",
        "Ses05M_script01_1_M000", "Ses05M_script01_1_F001",
    }
    exc = recs["Ses01F_impro01_M001"]
    assert (exc["emotion"], exc["label"]) == ("happy", EMOTIONS.index("happy"))
    assert exc["source_label"] == "exc"
    assert exc["attributes"] == {"valence": 4.0, "arousal": 3.5, "dominance": 3.0}
    assert exc["speaker"] == "Ses01M" and exc["split"] == "train"
    assert exc["transcript"] == "words of Ses01F_impro01_M001."
    assert recs["Ses05M_script01_1_M000"]["emotion"] == "surprised"
    assert recs["Ses05M_script01_1_M000"]["split"] == "test"
    assert report.skipped_by_reason() == {"unknown_label": 1, "missing_audio": 1}
    assert dict(report.dropped["train"]) == {"fru": 1}

    b = build("iemocap", root, tmp_path)
    train, test = read_all(b, "train"), read_all(b, "test")
    assert set(train) == {"Ses01F_impro01_F000", "Ses01F_impro01_M001"}  # F005 is corrupt
    assert set(test) == {"Ses05M_script01_1_M000", "Ses05M_script01_1_F001"}
    ex = train["Ses01F_impro01_M001"]
    assert ex["audio"].dtype == np.int16 and ex["audio"].shape == (int(0.3 * 16000),)
    np.testing.assert_allclose(ex["attributes"], [3.5, 4.0, 3.0])  # arousal, valence, dominance
    assert ex["label"] == EMOTIONS.index("happy") and ex["speaker"] == b"Ses01M"
    rep = json.loads((b.data_path / builders.REPORT_FILE).read_text())
    assert rep["skipped"] == {"unknown_label": 1, "missing_audio": 1, "unreadable": 1}
    assert rep["kept"] == {"train": 2, "test": 2}


# ---------------------------------------------------------------------------------------
# MELD


MELD_HEADER = (
    "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,"
    "Season,Episode,StartTime,EndTime\n"
)


def make_meld(root):
    base = root / "MELD.Raw"
    rows = {
        "train": [
            (1, "Oh my God!", "Rachel", "surprise", 0, 0),
            (2, "I am so happy.", "Monica", "joy", 0, 1),
            (3, "Get out.", "Ross", "fear", 0, 2),  # dropped class
            (4, "Whatever.", "Joey", "boredom", 0, 3),  # unknown label
            (5, "Hi there.", "Chandler", "neutral", 1, 0),  # mp4 only
            (6, "Why?", "Phoebe", "anger", 1, 1),  # no file at all
        ],
        "test": [(1, "Sorry.", "Ross", "sadness", 3, 0)],
    }
    dirs = {"train": ("train_sent_emo.csv", "train/train_splits"),
            "test": ("test_sent_emo.csv", "test/output_repeated_splits_test")}
    for split, entries in rows.items():
        csv_name, clip_dir = dirs[split]
        lines = [MELD_HEADER] + [
            f'{n},"{u}",{s},{e},x,{d},{k},1,1,"00:00:01,000","00:00:02,000"\n'
            for n, u, s, e, d, k in entries
        ]
        base.mkdir(parents=True, exist_ok=True)
        (base / csv_name).write_text("".join(lines))
        for n, u, s, e, d, k in entries:
            stem = base / clip_dir / f"dia{d}_utt{k}"
            (base / clip_dir).mkdir(parents=True, exist_ok=True)
            (stem.parent / (stem.name + ".mp4")).write_bytes(b"\x00\x00\x00\x18ftypmp42")
            if u not in ("Hi there.", "Why?"):
                wav(str(stem) + ".wav", sr=44100)
            if u == "Why?":
                os.remove(str(stem) + ".mp4")
    return root


def test_meld_parser_and_builder(tmp_path):
    root = make_meld(tmp_path / "meld")
    report = SkipReport("meld")
    recs = by_id(ser_corpora.parse_corpus("meld", root, report))
    assert set(recs) == {"train/dia0_utt0", "train/dia0_utt1", "test/dia3_utt0"}
    assert recs["train/dia0_utt0"]["emotion"] == "surprised"
    assert recs["train/dia0_utt0"]["transcript"] == "Oh my God!"
    assert recs["train/dia0_utt0"]["speaker"] == "Rachel"
    assert recs["train/dia0_utt1"]["emotion"] == "happy"
    assert recs["test/dia3_utt0"]["emotion"] == "sad" and recs["test/dia3_utt0"]["split"] == "test"
    assert report.skipped_by_reason() == {
        "unknown_label": 1, "mp4_not_converted": 1, "missing_audio": 1
    }
    assert any("ffmpeg" in n for n in report.notes)

    b = build("meld", root, tmp_path)
    assert set(b.info.splits) == {"train", "test"}
    train = read_all(b, "train")
    # 44.1 kHz input is resampled to 16 kHz.
    assert len(train["train/dia0_utt0"]["audio"]) == int(0.3 * 16000)


def test_meld_only_mp4_is_a_clear_error(tmp_path):
    base = tmp_path / "meld" / "MELD.Raw"
    (base / "train_splits").mkdir(parents=True)
    (base / "train_sent_emo.csv").write_text(MELD_HEADER + '1,"Hi.",Ross,joy,x,0,0,1,1,a,b\n')
    (base / "train_splits" / "dia0_utt0.mp4").write_bytes(b"\x00")
    with pytest.raises(CorpusLayoutError, match="ffmpeg"):
        list(ser_corpora.parse_corpus("meld", tmp_path / "meld"))


# ---------------------------------------------------------------------------------------
# RAVDESS


def make_ravdess(root):
    files = {
        "Actor_01/03-01-01-01-01-01-01.wav": "good",  # neutral
        "Actor_01/03-01-05-02-02-01-01.wav": "good",  # angry, statement 2
        "Actor_01/03-01-02-01-01-01-01.wav": "good",  # calm: dropped
        "Actor_01/03-02-03-01-01-01-01.wav": "good",  # song: dropped
        "Actor_01/03-01-09-01-01-01-01.wav": "good",  # emotion 09: unknown
        "Actor_01/readme-copy.wav": "good",  # bad file name
        "Actor_01/03-01-04-01-01-02-01.wav": "corrupt",
        "Actor_21/03-01-08-01-01-01-21.wav": "good",  # surprised, test actor
        "Actor_21/03-01-03-01-01-01-21.wav": "long",  # happy but too long
    }
    for rel, kind in files.items():
        path = str(root / "Audio_Speech_Actors_01-24" / rel)
        if kind == "good":
            wav(path, sr=48000)
        elif kind == "corrupt":
            corrupt(path)
        else:
            wav(path, seconds=1.5)
    return root


def test_ravdess_parser_and_builder(tmp_path):
    root = make_ravdess(tmp_path / "ravdess")
    report = SkipReport("ravdess")
    recs = by_id(ser_corpora.parse_corpus("ravdess", root, report))
    assert set(recs) == {
        "03-01-01-01-01-01-01", "03-01-05-02-02-01-01", "03-01-04-01-01-02-01",
        "03-01-08-01-01-01-21", "03-01-03-01-01-01-21",
    }
    angry = recs["03-01-05-02-02-01-01"]
    assert angry["emotion"] == "angry" and angry["transcript"] == "Dogs are sitting by the door."
    assert angry["speaker"] == "actor01" and angry["split"] == "train"
    assert recs["03-01-08-01-01-01-21"]["split"] == "test"
    assert recs["03-01-08-01-01-01-21"]["emotion"] == "surprised"
    assert report.skipped_by_reason() == {"unknown_label": 1, "bad_filename": 1}
    assert dict(report.dropped["train"]) == {"calm": 1, "song": 1}

    b = build("ravdess", root, tmp_path)
    assert set(read_all(b, "train")) == {"03-01-01-01-01-01-01", "03-01-05-02-02-01-01"}
    assert set(read_all(b, "test")) == {"03-01-08-01-01-01-21"}
    # Split arithmetic of tfds works on the data source: the unseen-corpus use of RAVDESS.
    assert len(b.as_data_source("train+test")) == 3
    assert b.skip_report()["skipped"] == {
        "unknown_label": 1, "bad_filename": 1, "unreadable": 1, "too_long": 1,
    }
    lengths = np.load(b.data_path / "num_samples-train.npy")
    src = b.as_data_source("train")
    assert lengths.tolist() == [len(src[i]["audio"]) for i in range(len(src))]


# ---------------------------------------------------------------------------------------
# CREMA-D


def make_crema(root):
    d = root / "CREMA-D" / "AudioWAV"
    wav(str(d / "1001_DFA_ANG_XX.wav"))
    wav(str(d / "1001_IEO_HAP_HI.wav"))
    wav(str(d / "1001_IEO_DIS_HI.wav"))  # dropped
    wav(str(d / "1002_ITS_XYZ_XX.wav"))  # unknown label
    empty(str(d / "1003_IEO_NEU_XX.wav"))  # 0 bytes
    wav(str(d / "1004_TSI_NEU_XX.wav"), amp=0.0)  # silent
    wav(str(d / "1090_TIE_SAD_LO.wav"))  # test actor
    return root


def test_crema_d_parser_and_builder(tmp_path):
    root = make_crema(tmp_path / "crema")
    report = SkipReport("crema_d")
    recs = by_id(ser_corpora.parse_corpus("crema_d", root, report))
    assert set(recs) == {
        "1001_DFA_ANG_XX", "1001_IEO_HAP_HI", "1003_IEO_NEU_XX", "1004_TSI_NEU_XX",
        "1090_TIE_SAD_LO",
    }
    assert recs["1001_DFA_ANG_XX"]["transcript"] == "Don't forget a jacket."
    sad = recs["1090_TIE_SAD_LO"]
    assert sad["split"] == "test" and sad["speaker"] == "1090" and sad["emotion"] == "sad"
    assert report.skipped_by_reason() == {"unknown_label": 1}

    b = build("crema_d", root, tmp_path)
    assert set(read_all(b, "train")) == {"1001_DFA_ANG_XX", "1001_IEO_HAP_HI"}
    assert b.skip_report()["skipped"] == {"unknown_label": 1, "empty": 1, "silent": 1}


# ---------------------------------------------------------------------------------------
# ESD


def make_esd(root):
    base = root / "Emotion Speech Dataset"
    # Speaker 0001 (Mandarin): the first release's train/evaluation/test folders.
    wav(str(base / "0001" / "Angry" / "train" / "0001_000400.wav"))
    wav(str(base / "0001" / "Angry" / "evaluation" / "0001_000351.wav"))
    wav(str(base / "0001" / "Sad" / "test" / "0001_001075.wav"))  # txt says 快乐: mismatch
    (base / "0001" / "0001.txt").write_text(
        "0001_000400\t他生气地走了。\t生气\n0001_000351\t打远一看。\t生气\n0001_001075\t好开心。\t快乐\n",
        encoding="utf-8",
    )
    # Speaker 0011 (English): flat layout, split from the utterance number, UTF-16 text.
    wav(str(base / "0011" / "Surprise" / "0011_001410.wav"))  # position 10: evaluation
    wav(str(base / "0011" / "Neutral" / "0011_000030.wav"))  # position 30: test
    wav(str(base / "0011" / "Neutral" / "0011_000100.wav"))  # position 100: train
    (base / "0011" / "0011.txt").write_bytes(
        "0011_001410\tNo way!\tSurprise\n0011_000030\tThe nine eggs.\tNeutral\n".encode("utf-16")
    )
    return root


def test_esd_parser_and_builder(tmp_path):
    root = make_esd(tmp_path / "esd")
    report = SkipReport("esd")
    recs = by_id(ser_corpora.parse_corpus("esd", root, report))
    assert set(recs) == {"0001_000400", "0001_000351", "0011_001410", "0011_000030", "0011_000100"}
    splits = {i: r["split"] for i, r in recs.items()}
    assert splits == {
        "0001_000400": "train", "0001_000351": "validation", "0011_001410": "validation",
        "0011_000030": "test", "0011_000100": "train",
    }
    assert recs["0001_000400"]["transcript"] == "他生气地走了。"
    assert recs["0001_000400"]["language"] == "zh"
    assert recs["0011_001410"]["emotion"] == "surprised"
    assert recs["0011_001410"]["transcript"] == "No way!"
    assert recs["0011_001410"]["language"] == "en" and recs["0011_000100"]["transcript"] == ""
    assert report.skipped_by_reason() == {"label_mismatch": 1}
    b = build("esd", root, tmp_path)
    counts = {s: b.info.splits[s].num_examples for s in b.info.splits}
    assert counts == {"train": 2, "validation": 2, "test": 1}


# ---------------------------------------------------------------------------------------
# CASIA and CaFE


def make_casia(root):
    base = root / "CASIA"
    wav(str(base / "liuchanhg" / "angry" / "201.wav"))
    wav(str(base / "liuchanhg" / "surprise" / "202.wav"))
    wav(str(base / "liuchanhg" / "fear" / "203.wav"))  # dropped
    wav(str(base / "liuchanhg" / "bored" / "204.wav"))  # unknown label folder
    wav(str(base / "wangzhe" / "sad" / "201.wav"))  # test speaker
    wav(str(base / "wangzhe" / "neutral" / "205.wav"))
    return root


def test_casia_parser_and_builder(tmp_path):
    root = make_casia(tmp_path / "casia")
    report = SkipReport("casia")
    recs = by_id(ser_corpora.parse_corpus("casia", root, report))
    assert set(recs) == {
        "liuchanhg_angry_201", "liuchanhg_surprise_202", "wangzhe_sad_201", "wangzhe_neutral_205"
    }
    assert recs["liuchanhg_surprise_202"]["emotion"] == "surprised"
    assert recs["wangzhe_sad_201"]["split"] == "test"
    assert recs["liuchanhg_angry_201"]["split"] == "train"
    assert report.skipped_by_reason() == {"unknown_label": 1}
    assert dict(report.dropped["train"]) == {"fear": 1}
    b = build("casia", root, tmp_path)
    assert len(b.as_data_source("train+test")) == 4


def test_split_with_only_bad_clips_is_left_out_not_fatal(tmp_path):
    base = tmp_path / "casia" / "CASIA"
    wav(str(base / "liuchanhg" / "angry" / "201.wav"))
    wav(str(base / "liuchanhg" / "sad" / "202.wav"))
    corrupt(str(base / "wangzhe" / "sad" / "201.wav"))  # the whole test split is unreadable
    empty(str(base / "wangzhe" / "happy" / "202.wav"))
    b = build("casia", tmp_path / "casia", tmp_path)
    assert set(b.info.splits) == {"train"}
    report = b.skip_report()
    assert report["skipped_by_split"] == {"test": {"unreadable": 1, "empty": 1}}
    assert any("'test' has no usable clip" in n for n in report["notes"])


def make_cafe(root):
    base = root / "CaFE_48k"
    nfd = lambda s: unicodedata.normalize("NFD", s)  # macOS zips store decomposed names
    wav(str(base / nfd("Colère") / "Faible" / "01-C-1-1.wav"), sr=48000)
    wav(str(base / "Neutre" / "02-N-1-2.wav"), sr=48000)
    wav(str(base / "Peur" / "Fort" / "03-P-2-3.wav"), sr=48000)  # dropped
    wav(str(base / "Joie" / "Fort" / "12-J-2-4.wav"), sr=48000)  # test actor
    wav(str(base / "Surprise" / "Fort" / "11-S-2-5.wav"), amp=0.0)  # silent
    wav(str(base / "Tristesse" / "Fort" / "04-X-2-5.wav"))  # unknown code
    return root


def test_cafe_parser_and_builder(tmp_path):
    root = make_cafe(tmp_path / "cafe")
    report = SkipReport("cafe")
    recs = by_id(ser_corpora.parse_corpus("cafe", root, report))
    assert set(recs) == {"01-C-1-1", "02-N-1-2", "12-J-2-4", "11-S-2-5"}
    assert recs["01-C-1-1"]["emotion"] == "angry"
    assert recs["01-C-1-1"]["transcript"] == "Un cheval fou dans mon jardin"
    assert recs["12-J-2-4"]["split"] == "test" and recs["12-J-2-4"]["language"] == "fr"
    assert report.skipped_by_reason() == {"unknown_label": 1}
    b = build("cafe", root, tmp_path)
    assert set(read_all(b, "test")) == {"12-J-2-4"}
    assert b.skip_report()["skipped"] == {"unknown_label": 1, "silent": 1}


# ---------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("name", sorted(ser_corpora.CORPORA))
def test_missing_manual_dir_is_one_clear_error(tmp_path, name):
    corpus = ser_corpora.CORPORA[name]
    with pytest.raises(CorpusLayoutError, match="does not exist") as e:
        list(ser_corpora.parse_corpus(name, tmp_path / "nowhere"))
    assert corpus.layout in str(e.value)
    with pytest.raises(CorpusLayoutError, match="no manual_dir given"):
        builders.prepare(name, manual_dir=None, data_dir=tmp_path / "tfds")


@pytest.mark.parametrize("name", sorted(ser_corpora.CORPORA))
def test_malformed_layout_is_one_clear_error(tmp_path, name):
    wrong = tmp_path / "wrong"
    wav(str(wrong / "some" / "clip.wav"))
    with pytest.raises(CorpusLayoutError) as e:
        list(ser_corpora.parse_corpus(name, wrong))
    message = str(e.value)
    assert str(wrong) in message and "expected" in message
    assert ser_corpora.CORPORA[name].title in message


def test_iemocap_without_label_files_names_the_folder(tmp_path):
    (tmp_path / "Session1" / "sentences" / "wav").mkdir(parents=True)
    with pytest.raises(CorpusLayoutError, match="EmoEvaluation"):
        list(ser_corpora.parse_corpus("iemocap", tmp_path))


# ---------------------------------------------------------------------------------------
# Speech-instruction manifests


def test_manifest_validation_and_builder(tmp_path):
    wav(str(tmp_path / "wav" / "a.wav"))
    wav(str(tmp_path / "wav" / "b.wav"))
    corrupt(str(tmp_path / "wav" / "c.wav"))
    lines = [
        {"id": "a", "audio": "wav/a.wav", "transcript": "How do I cook rice?", "reply": "Rinse it.",
         "units": [1, 2, 3, 3], "emotion": "sad"},
        {"id": "b", "audio": str(tmp_path / "wav" / "b.wav"), "transcript": "Hi", "units": "4 5 6"},
        {"id": "c", "audio": "wav/c.wav"},  # corrupt audio: skipped by the builder
        {"id": "d", "audio": "wav/missing.wav"},
        {"id": "e", "audio": "wav/a.wav", "units": [1, 99]},  # unit outside the vocabulary
        {"id": "a", "audio": "wav/a.wav"},  # duplicate id
        {"id": "f", "audio": "wav/a.wav", "emotion": "bored"},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")

    with pytest.raises(manifests.ManifestError, match=r"train\.jsonl:4: audio file .*missing\.wav"):
        manifests.read_manifest(path, unit_vocab_size=64)
    report = SkipReport("m")
    recs = manifests.read_manifest(path, unit_vocab_size=64, strict=False, report=report)
    assert [r["id"] for r in recs] == ["a", "b", "c"]
    assert recs[0]["audio"] == str(tmp_path / "wav" / "a.wav")
    assert recs[0]["label"] == EMOTIONS.index("sad")
    assert recs[1]["units"] == [4, 5, 6] and recs[1]["label"] == -1 and recs[1]["reply"] == ""
    assert report.skipped_by_reason() == {
        "missing_audio": 1, "bad_record": 2, "duplicate_id": 1, "bad_json": 1
    }
    bad = report.examples["bad_record"]
    assert any("train.jsonl:5" in e and "unit_vocab_size=64" in e for e in bad)

    b = builders.prepare(
        "speech_instructions", data_dir=tmp_path / "tfds", manifests={"train": str(path)},
        unit_vocab_size=64, config="mini",
    )
    rows = read_all(b, "train")
    assert set(rows) == {"a", "b"}
    assert rows["a"]["units"].tolist() == [1, 2, 3, 3] and rows["a"]["has_units"]
    assert rows["b"]["units"].tolist() == [4, 5, 6]
    assert rows["a"]["reply"] == b"Rinse it." and rows["a"]["label"] == EMOTIONS.index("sad")
    assert b.skip_report()["skipped"]["unreadable"] == 1
