"""Synthetic emotional speech rendered with eSpeak NG: the default data for tests and the demo.

eSpeak NG comes from the PyPI package `espeakng-loader` (it ships `libespeak-ng.so` and its
data, no system packages needed) and is driven through ctypes in synchronous mode with a
synth callback that collects int16 samples at eSpeak's 22,050 Hz; clips are resampled to
16 kHz with soxr at high quality (what `librosa.resample(res_type="soxr_hq")` runs).
Rendering happens in a small helper process (`_espeak_server.py`) that forks once per
clip: eSpeak keeps waveform state in C statics across calls, and the fork makes every clip a
pure function of (text, voice, prosody), so a corpus is reproducible from its seed whatever
else was rendered before. eSpeak seeds its breath-noise generator from the clock, so each
render also reseeds it from the request: clips are identical across processes too.

Each of the 5 release emotions has a prosody preset on eSpeak's scales (pitch 0-100, pitch
range 0-100, rate in words per minute, volume 0-200, 100 = normal), jittered per clip:

    emotion    pitch  range  rate  volume   end mark
    angry        35     90    240    195      "!"
    surprised    98    100    135    120      "?"   (question contour on statements)
    happy        75     60    185    120      "!"
    sad          10      0    100     45      "."
    neutral      45     20    165     80      as written

Loudness and speaking rate do not depend on the voice, so they carry the classes across
voices; pitch adds a within-voice cue (a female and a male voice differ by about as much as
two neighbouring presets). With per-voice standardised median F0, F0 spread, RMS and
duration per character, a nearest-centroid classifier gets about 95% of clips right.

Several voices per language (eSpeak variants `+f2`, `+m3`, ... over en-us / en-gb / en-029
for English, `cmn` for Mandarin), a short random silence at both ends and white noise 25-40
dB below the speech complete a clip. Sentences are neutral instructions ("How do I ...?",
which are rendered in every emotion, so the text never gives the emotion away) and
emotional statements (rendered in their own emotion), in English and Chinese.
"""

from __future__ import annotations

import atexit
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import Dict, List, Optional, Tuple

import numpy as np

from freezeempath_jax.models.configs import EMOTIONS

SAMPLING_RATE = 16000
ESPEAK_SAMPLING_RATE = 22050

# (pitch, range, rate, volume, end mark) per emotion; see the module docstring.
PRESETS: Dict[str, Tuple[int, int, int, int, str]] = {
    "angry": (35, 90, 240, 195, "!"),
    "surprised": (98, 100, 135, 120, "?"),
    "happy": (75, 60, 185, 120, "!"),
    "sad": (10, 0, 100, 45, "."),
    "neutral": (45, 20, 165, 80, ""),
}
# Per-clip jitter: absolute for pitch/range, relative for rate/volume.
JITTER = {"pitch": 5.0, "range": 8.0, "rate": 0.07, "volume": 0.08}

VOICES: Dict[str, Tuple[str, ...]] = {
    "en": (
        "en-us+m3", "en-us+f2", "en+m1", "en+f3",
        "en-gb-x-rp+m4", "en-029+f4", "en-us+m2", "en+f1",
    ),
    "zh": ("cmn", "cmn+f2", "cmn+m3", "cmn+f4"),
}



def voice_gender(voice: str) -> str:
    """Speaker gender of an eSpeak voice as used here: variants `+f<n>` are female, `+m<n>`
    and the bare language voices (eSpeak's default voice is male) are male."""
    variant = voice.rsplit("+", 1)[1] if "+" in voice else ""
    if variant[:1] == "f":
        return "female"
    if variant[:1] in ("m", ""):
        return "male"
    raise ValueError(f"voice {voice!r}: unknown variant {variant!r} (expected +f<n> or +m<n>)")


NEUTRAL_INSTRUCTIONS: Dict[str, Tuple[str, ...]] = {
    "en": (
        "How do I bake a loaf of bread at home?",
        "How do I change a flat tire on my bike?",
        "What is the best way to learn a new language?",
        "How do I set up a weekly budget?",
        "Can you tell me how to plant tomatoes?",
        "How do I write a short cover letter?",
        "What should I pack for a weekend trip?",
        "How do I clean a cast iron pan?",
        "How do I start running every morning?",
        "What is a good way to organise my desk?",
        "How do I make a cup of green tea?",
        "How do I back up the photos on my phone?",
        "How long should I boil an egg?",
        "How do I reset my email password?",
        "What time does the library usually open?",
        "How do I fold a paper airplane?",
        "How do I take care of a small cactus?",
        "Can you explain how rainbows form?",
        "How do I prepare for a job interview?",
        "How do I fix a squeaky door?",
        "What can I cook with rice and beans?",
        "How do I teach my dog to sit?",
        "How do I keep my houseplants alive?",
        "How many hours of sleep do adults need?",
    ),
    "zh": (
        "我怎样在家里烤面包？",
        "怎么学习一门新的语言？",
        "我应该怎样做每周的预算？",
        "怎么种西红柿？",
        "周末旅行应该带什么东西？",
        "怎么泡一杯绿茶？",
        "我怎样备份手机里的照片？",
        "鸡蛋要煮多长时间？",
        "怎么准备工作面试？",
        "我怎样让家里的植物长得好？",
        "成年人每天需要睡几个小时？",
        "怎么教小狗坐下？",
    ),
}

EMOTIONAL_STATEMENTS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "en": {
        "angry": (
            "I told you three times already and you still ignored me",
            "This is completely unacceptable",
            "Stop touching my things right now",
            "You broke it again and you did not even say sorry",
            "I am sick of waiting for you every single day",
        ),
        "surprised": (
            "Wait, you really came all the way here",
            "I had no idea you could play the piano",
            "The package arrived a whole week early",
            "You mean we won the first prize",
            "Is that really you after all these years",
        ),
        "happy": (
            "I just got the job I wanted",
            "We are going to the beach this weekend",
            "My sister is coming home for the holidays",
            "I finally finished my first marathon",
            "This is the best birthday I have ever had",
        ),
        "sad": (
            "My old dog passed away last night",
            "I failed the exam again",
            "Nobody came to my party",
            "I miss my family so much",
            "I lost the letter my grandmother wrote me",
        ),
        "neutral": (
            "The meeting starts at ten in the morning",
            "The train leaves from platform four",
            "I bought some milk and bread today",
            "The report is on the second shelf",
            "It will be cloudy tomorrow afternoon",
        ),
    },
    "zh": {
        "angry": ("我已经说了三遍了你还是不听", "这简直太过分了", "马上把我的东西放下"),
        "surprised": ("你真的一路跑到这里来了", "我完全不知道你会弹钢琴", "包裹竟然提前一周到了"),
        "happy": ("我终于拿到了想要的工作", "这个周末我们要去海边", "这是我过得最开心的生日"),
        "sad": ("我的老狗昨天晚上走了", "我又一次没有通过考试", "我真的很想念我的家人"),
        "neutral": ("会议早上十点开始", "火车从四号站台出发", "报告放在第二层书架上"),
    },
}

# A question grammar (English) for content alignment: many distinct short requests whose
# topic word is known. Each group crosses its verbs with its objects; the topic of a question
# is the last word of its object. Short frames keep a question within ~3 s even at the sad
# preset's 100 words per minute.
QUESTION_FRAMES = ("How do I {act}?", "How can I {act}?", "Teach me to {act}.",
                   "Any tips to {act}?")
QUESTION_GROUPS = (
    (("learn", "practice", "teach", "enjoy"),
     ("chess", "tennis", "golf", "poker", "swimming", "painting")),
    (("cook", "bake", "make", "store"), ("bread", "pasta", "rice", "soup", "pancakes", "cookies")),
    (("grow", "water", "plant", "harvest"), ("tomatoes", "roses", "basil", "potatoes", "lettuce")),
    (("clean", "fix", "paint", "repair"), ("my bike", "the fence", "my shoes", "the kitchen",
                                           "a window")),
    (("plan", "organise", "afford", "prepare for"), ("a trip", "a wedding", "a party",
                                                     "an interview", "a move")),
    (("save", "track", "earn"), ("money", "time", "energy")),
    (("train", "walk", "feed", "groom"), ("my dog", "my cat", "a puppy", "a horse")),
)


def grammar_questions(held_out: bool = False) -> Tuple[Tuple[str, str], ...]:
    """(question, topic word) pairs of the question grammar, in a fixed order.

    A quarter of the (verb, object) pairs (those with (verb index + object index) % 4 == 0)
    are held out: they never appear in a training corpus and are what `held_out=True`
    returns, so a model can be asked questions it never heard, about topics whose words it
    did hear in other questions.
    """
    out = []
    for verbs, objects in QUESTION_GROUPS:
        for i, verb in enumerate(verbs):
            for j, obj in enumerate(objects):
                if ((i + j) % 4 == 0) != held_out:
                    continue
                topic = obj.split()[-1]
                out += [(frame.format(act=f"{verb} {obj}"), topic) for frame in QUESTION_FRAMES]
    return tuple(out)


# Share of clips that use a neutral instruction (rendered in the clip's emotion).
INSTRUCTION_SHARE = 0.5
SILENCE_SECONDS = (0.05, 0.3)
SNR_DB = (25.0, 40.0)


class SynthesisError(RuntimeError):
    """eSpeak NG could not render a request (unknown voice, library failure)."""


def _espeak_paths() -> Tuple[str, str]:
    try:
        import espeakng_loader
    except ImportError as e:
        raise ImportError(
            "synthetic speech needs the PyPI package `espeakng-loader` "
            "(pip install espeakng-loader); it ships libespeak-ng and its data"
        ) from e
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


class _EspeakServer:
    """Client of one `_espeak_server.py` process (started on first use, again after a fork)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None
        self._stderr = None
        self._pid: Optional[int] = None
        self.sample_rate = ESPEAK_SAMPLING_RATE

    def after_fork_in_child(self) -> None:
        # A forked process (e.g. a data worker) must not share the parent's server, and a
        # lock held by another thread at fork time would never be released here.
        self._lock = threading.Lock()
        if self._proc is not None:
            # Drop this process's copies of the pipes, so the parent's server still sees
            # end-of-input when the parent closes it.
            for pipe in (self._proc.stdin, self._proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
        self._proc, self._stderr, self._pid = None, None, None

    def _read_response(self) -> Tuple[int, bytes]:
        header = self._proc.stdout.read(9)
        if len(header) != 9:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            err = ""
            if self._stderr is not None:
                self._stderr.seek(0)
                err = self._stderr.read().decode(errors="replace")[-2000:]
            self.close()
            raise SynthesisError(f"eSpeak NG render server stopped unexpectedly: {err.strip()}")
        status, length = struct.unpack("<BQ", header)
        payload = self._proc.stdout.read(length)
        return status, payload

    def _start(self) -> None:
        lib_path, data_path = _espeak_paths()
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_espeak_server.py")
        # stderr goes to a file: an unread pipe could fill up and block the server.
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, script, lib_path, data_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._pid = os.getpid()
        status, payload = self._read_response()
        if status != 0:
            self.close()
            raise SynthesisError(payload.decode(errors="replace"))
        (self.sample_rate,) = struct.unpack("<i", payload)

    def render(self, request: dict) -> Tuple[np.ndarray, np.ndarray]:
        """Renders one request; returns (int16 samples at `self.sample_rate`, int32 [W, 3]
        word events: 1-based character position in the text, length, start in ms)."""
        line = (json.dumps(request, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            try:
                self._proc.stdin.write(line)
                self._proc.stdin.flush()
            except BrokenPipeError as e:
                self.close()
                raise SynthesisError("eSpeak NG render server is gone") from e
            status, payload = self._read_response()
        if status != 0:
            raise SynthesisError(f"{payload.decode(errors='replace')} (request {request})")
        (count,) = struct.unpack_from("<I", payload)
        words = np.frombuffer(payload, dtype="<i4", count=3 * count, offset=4).reshape(count, 3)
        return np.frombuffer(payload, dtype="<i2", offset=4 + 12 * count), words

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and self._pid == os.getpid():
            try:
                proc.stdin.close()
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


_SERVER = _EspeakServer()
atexit.register(_SERVER.close)
os.register_at_fork(after_in_child=_SERVER.after_fork_in_child)


def render_espeak(
    text: str,
    voice: str = "en-us",
    *,
    pitch: int = 50,
    pitch_range: int = 50,
    rate: int = 175,
    volume: int = 100,
    with_words: bool = False,
):
    """Renders `text` with eSpeak NG as float32 in [-1, 1] at 22,050 Hz (no resampling).

    With `with_words`, returns (audio, words): each word eSpeak spoke as (its text, its start
    in seconds, the index in `text` just past it), from eSpeak's own word events (exact
    timings, no forced alignment needed).

    Args:
      text: UTF-8 text in the voice's language.
      voice: eSpeak voice name, optionally with a variant (`"en-us+f2"`, `"cmn+m3"`).
      pitch, pitch_range: 0-100 (50 is the voice's default).
      rate: words per minute (80-450; 175 default).
      volume: amplitude 0-200 (100 default).
    """
    if not text or not text.strip():
        raise ValueError("render_espeak needs non-empty text")
    samples, events = _SERVER.render(
        {
            "voice": voice,
            "text": text,
            "pitch": int(np.clip(pitch, 0, 100)),
            "range": int(np.clip(pitch_range, 0, 100)),
            "rate": int(np.clip(rate, 80, 450)),
            "volume": int(np.clip(volume, 0, 200)),
        }
    )
    audio = samples.astype(np.float32) / 32768.0
    if not with_words:
        return audio
    # eSpeak counts characters from 1 in the UTF-8 text it was given
    words = [(text[pos - 1:pos - 1 + length], ms / 1000.0, pos - 1 + length)
             for pos, length, ms in events.tolist() if length > 0]
    return audio, words


def _resample(audio: np.ndarray, rate: int) -> np.ndarray:
    # soxr at high quality: the exact computation behind librosa.resample(res_type="soxr_hq")
    # (bit-identical), without librosa's import, which costs seconds in every worker process.
    import soxr

    return soxr.resample(audio, rate, SAMPLING_RATE, quality="HQ").astype(np.float32)


def _apply_end_mark(text: str, mark: str) -> str:
    # Questions keep their question contour; statements get the emotion's end mark, which
    # changes eSpeak's clause intonation ("?" rises: it reads as surprise on a statement).
    if not mark or text.rstrip().endswith(("?", "？")):
        return text
    if _is_cjk(text):
        mark = {"?": "？", "!": "！", ".": "。"}[mark]
    return text.rstrip(" .!?。！？") + mark


def _is_cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def synthesize(
    text: str,
    emotion: str,
    voice: str = "en-us",
    seed: int = 0,
    *,
    noise: bool = True,
    jitter: bool = True,
    with_words: bool = False,
):
    """Renders `text` in `emotion` and returns float32 mono samples at 16 kHz.

    The prosody preset of `emotion` (see the module docstring) is jittered from `seed`,
    random silence is added at both ends and white noise 25-40 dB below the speech level;
    the result is a pure function of the arguments.

    Args:
      text: sentence to speak (English or Chinese, matching `voice`).
      emotion: one of `EMOTIONS` (angry, surprised, happy, sad, neutral).
      voice: eSpeak voice with optional variant, e.g. `"en-us+f2"`, `"cmn"`.
      seed: drives jitter, silence and noise.
      noise, jitter: switch off the noise / the per-clip prosody jitter.
      with_words: also return the words' timings in the returned clip: a list of
        [word, start s, end s] (a word ends where the next starts; the last where the speech
        ends), from eSpeak's word events. The audio is the same either way.
    """
    if emotion not in PRESETS:
        raise ValueError(f"unknown emotion {emotion!r}; expected one of {EMOTIONS}")
    rng = np.random.default_rng(seed)
    pitch, prange, rate, volume, mark = PRESETS[emotion]
    j = rng.uniform(-1.0, 1.0, size=4) if jitter else np.zeros(4)
    raw = render_espeak(
        _apply_end_mark(text, mark),
        voice,
        pitch=round(pitch + JITTER["pitch"] * j[0]),
        pitch_range=round(prange + JITTER["range"] * j[1]),
        rate=round(rate * (1.0 + JITTER["rate"] * j[2])),
        volume=round(volume * (1.0 + JITTER["volume"] * j[3])),
        with_words=True,
    )
    raw, spoken = raw
    audio = _resample(raw, _SERVER.sample_rate)
    lead, tail = (rng.uniform(*SILENCE_SECONDS, size=2) * SAMPLING_RATE).astype(int)
    audio = np.concatenate(
        [np.zeros(lead, np.float32), audio.astype(np.float32), np.zeros(tail, np.float32)]
    )
    if noise:
        level = float(np.sqrt(np.mean(raw.astype(np.float64) ** 2))) or 1e-4
        snr = rng.uniform(*SNR_DB)
        audio = audio + rng.normal(0.0, level * 10 ** (-snr / 20), size=audio.shape)
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    if not with_words:
        return audio
    offset, speech_end = lead / SAMPLING_RATE, len(raw) / _SERVER.sample_rate
    ends = [start for _, start, _ in spoken[1:]] + [speech_end]
    words = [[w.strip(), round(float(offset + start), 4), round(float(offset + max(end, start)), 4)]
             for (w, start, _), end in zip(spoken, ends)]
    return audio, words


def _clip_plan(language: str, emotion: str, index: int, seed: int,
               instructions: str = "fixed") -> dict:
    """What clip `index` of (language, emotion) says and how: a function of the seed only.

    instructions: "fixed" (the short list above) or "grammar" (English: the training half of
    `grammar_questions`, hundreds of distinct requests; other languages keep their list)."""
    lang_id = sorted(VOICES).index(language)
    ss = np.random.SeedSequence([seed, lang_id, EMOTIONS.index(emotion), index])
    rng = np.random.default_rng(ss)
    voices = VOICES[language]
    voice = voices[int(rng.integers(len(voices)))]
    if rng.uniform() < INSTRUCTION_SHARE:
        pool, kind = NEUTRAL_INSTRUCTIONS[language], "instruction"
        if instructions == "grammar" and language == "en":
            pool = tuple(q for q, _ in grammar_questions())
        elif instructions not in ("fixed", "grammar"):
            raise ValueError(f"instructions must be 'fixed' or 'grammar', got {instructions!r}")
    else:
        pool, kind = EMOTIONAL_STATEMENTS[language][emotion], "statement"
    text = pool[int(rng.integers(len(pool)))]
    return {
        "text": text,
        "kind": kind,
        "voice": voice,
        "clip_seed": int(ss.generate_state(1)[0]),
    }


def _split_counts(n: int, fractions: Sequence[float]) -> Tuple[int, int, int]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"split fractions must be three non-negative numbers (train, validation, test) "
            f"summing to 1, got {tuple(fractions)}"
        )
    n_val = int(round(n * fractions[1]))
    n_test = int(round(n * fractions[2]))
    if fractions[0] > 0 and n_val + n_test >= n and n > 0:
        # Tiny corpora still get a training clip: take it from the larger held-out split.
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        elif n_val > 0:
            n_val -= 1
    return n - n_val - n_test, n_val, n_test


SPLITS = ("train", "validation", "test")


def synthetic_plan(
    num_per_emotion: int,
    languages: Sequence[str] = ("en",),
    seed: int = 0,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    instructions: str = "fixed",
) -> List[dict]:
    """The corpus's records without audio, in a fixed order (`instructions`: see
    `_clip_plan`).

    Each record holds the manifest fields (id, transcript, emotion, label, speaker, voice,
    gender (of the voice, `voice_gender`), language, split, kind) plus `clip_seed`; `render_synthetic(record)` makes its audio.
    Each clip depends only on the seed and its (language, emotion, index), and splits are
    drawn per (language, emotion), so every split holds every class when it is non-empty.
    """
    if num_per_emotion < 1:
        raise ValueError(f"num_per_emotion must be at least 1, got {num_per_emotion}")
    for language in languages:
        if language not in VOICES:
            raise ValueError(f"unknown language {language!r}; expected one of {sorted(VOICES)}")
    counts = _split_counts(num_per_emotion, split_fractions)
    plan = []
    for language in languages:
        lang_id = sorted(VOICES).index(language)
        for label, emotion in enumerate(EMOTIONS):
            order = np.random.default_rng([seed, 7919, lang_id, label]).permutation(num_per_emotion)
            split_of = {}
            for rank, index in enumerate(order):
                split_of[int(index)] = SPLITS[
                    0 if rank < counts[0] else 1 if rank < counts[0] + counts[1] else 2
                ]
            for index in range(num_per_emotion):
                clip = _clip_plan(language, emotion, index, seed, instructions)
                plan.append(
                    {
                        "id": f"synth-{language}-{emotion}-{index:05d}",
                        "transcript": clip["text"],
                        "emotion": emotion,
                        "label": label,
                        "speaker": clip["voice"],
                        "voice": clip["voice"],
                        "gender": voice_gender(clip["voice"]),
                        "language": language,
                        "split": split_of[index],
                        "kind": clip["kind"],
                        "clip_seed": clip["clip_seed"],
                    }
                )
    return plan


def render_synthetic(record: dict) -> np.ndarray:
    """Audio (float32, 16 kHz) of one `synthetic_plan` record."""
    return synthesize(
        record["transcript"], record["emotion"], record["voice"], seed=record["clip_seed"]
    )


def iter_synthetic_examples(
    num_per_emotion: int,
    languages: Sequence[str] = ("en",),
    seed: int = 0,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    instructions: str = "fixed",
):
    """Yields `(record, audio)` for every clip of `synthetic_plan(...)`, rendering lazily."""
    for record in synthetic_plan(num_per_emotion, languages, seed, split_fractions,
                                 instructions):
        yield record, render_synthetic(record)


def build_synthetic_corpus(
    out_dir: str | os.PathLike,
    num_per_emotion: int,
    languages: Sequence[str] = ("en",),
    seed: int = 0,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    progress: bool = True,
    instructions: str = "fixed",
) -> Dict[str, str]:
    """Writes a synthetic emotional speech corpus: 16 kHz PCM-16 WAVs plus JSONL manifests.

    Layout: `out_dir/wav/<id>.wav` and `out_dir/{train,validation,test}.jsonl`, one line per
    clip with fields id, audio (absolute path), transcript, emotion, label (index into
    `EMOTIONS`), speaker, voice, language, split, kind ("instruction" or "statement") and
    words (each spoken word as [text, start s, end s] in the clip, from eSpeak's word events:
    the targets of the `align_words` warm-up). The same arguments always produce the same
    files.

    Args:
      out_dir: output folder (created).
      num_per_emotion: clips per emotion and language.
      languages: subset of ("en", "zh").
      seed: corpus seed.
      split_fractions: (train, validation, test) shares, applied per emotion and language.
      progress: show a tqdm bar.
      instructions: "fixed" or "grammar" (see `_clip_plan`).

    Returns:
      `{split: manifest path}` for the three splits (a split may be empty for tiny corpora).
    """
    import soundfile as sf
    from tqdm.auto import tqdm

    out_dir = os.path.abspath(os.fspath(out_dir))
    wav_dir = os.path.join(out_dir, "wav")
    os.makedirs(wav_dir, exist_ok=True)
    manifests = {split: os.path.join(out_dir, f"{split}.jsonl") for split in SPLITS}
    total = num_per_emotion * len(EMOTIONS) * len(languages)
    files = {split: open(path, "w", encoding="utf-8") for split, path in manifests.items()}
    try:
        plan = synthetic_plan(num_per_emotion, languages, seed, split_fractions, instructions)
        for record in tqdm(plan, total=total, desc="synthetic corpus", unit="clip",
                           disable=not progress):
            audio, words = synthesize(record["transcript"], record["emotion"], record["voice"],
                                      seed=record["clip_seed"], with_words=True)
            path = os.path.join(wav_dir, record["id"] + ".wav")
            sf.write(path, audio, SAMPLING_RATE, subtype="PCM_16")
            line = {"id": record["id"], "audio": path}
            line.update((k, v) for k, v in record.items() if k not in ("id", "clip_seed"))
            line["words"] = words
            files[record["split"]].write(json.dumps(line, ensure_ascii=False) + "\n")
    finally:
        for f in files.values():
            f.close()
    return manifests
