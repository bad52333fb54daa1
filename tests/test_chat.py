"""The chat turn and the chat command on a tiny random FreezeEmpath with real speech files:
one JSONL line per item, bad items get error records while the others succeed, the failure
count is returned; prompts match the training frame; conversations keep and drop turns."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from flax import linen as nn

from freezeempath_jax import inference as chat
from freezeempath_jax.models import presets
from freezeempath_jax.models.configs import EMOTIONS
from freezeempath_jax.checkpoints.model_tree import init_boxed_params
from freezeempath_jax.text import ByteTokenizer, ChatFormat, PromptBuilder

CFG = presets.TINY
SECONDS = 3.0  # clip length of configs/tiny.py: 150 encoder frames -> 30 speech tokens


def _random_params(seed=0):
    """Numpy-random values for every part (compiling `init` is slow on CPU)."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda r: init_boxed_params(CFG, r),
                                          jax.random.PRNGKey(0)))
    rng = np.random.RandomState(seed)

    def make(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.asarray(1.0 + 0.1 * rng.randn(*s.shape), s.dtype)
        std = 1.0 if "embedding" in name else 0.1
        return jnp.asarray(std * rng.randn(*s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(make, shapes)


@pytest.fixture(scope="module")
def model():
    tok = ByteTokenizer(CFG.llm.vocab_size, CFG.speech_token_id, CFG.emotion_token_id)
    return chat.ChatModel(CFG, _random_params(), tok, chat_template="plain",
                          audio_seconds=SECONDS, max_units=8)


def test_chat_command_writes_one_line_per_item(model, shared_audio_dir, tmp_path):
    good = [shared_audio_dir / "helpful_base_1.wav", shared_audio_dir / "vicuna_2.wav",
            shared_audio_dir / "helpful_base_4.wav"]
    long = tmp_path / "long.wav"
    sf.write(long, 0.1 * np.random.RandomState(0).randn(16000 * 31).astype(np.float32), 16000)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    garbage = tmp_path / "garbage.wav"
    garbage.write_text("this is not audio")
    items = [("a", good[0]), ("missing", tmp_path / "nope.wav"), ("b", good[1]),
             ("long", long), ("garbage", garbage), ("empty", empty), ("c", good[2])]
    manifest = tmp_path / "questions.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "audio": str(p)}) + "\n"
                                for i, p in items))
    out = tmp_path / "out" / "answers.jsonl"
    failed = chat.run_chat(model, str(manifest), str(out), max_new_tokens=6, batch_size=2,
                           progress=False)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["question_id"] for r in lines] == [i for i, _ in items]
    assert failed == 4
    by_id = {r["question_id"]: r for r in lines}
    for qid, path in items:
        r = by_id[qid]
        assert r["audio"] == str(path)
        if qid in ("missing", "long", "garbage", "empty"):
            assert set(r) == {"question_id", "audio", "error"}
            assert str(path) in r["error"]
            continue
        assert "error" not in r
        assert isinstance(r["prediction"], str)
        units = [int(u) for u in r["prediction_units"].split()]
        assert all(0 <= u < CFG.speech_decoder.unit_vocab_size for u in units)
        probs = r["emotion"]["probabilities"]
        assert list(probs) == list(EMOTIONS)
        assert abs(sum(probs.values()) - 1.0) < 1e-5
        assert r["emotion"]["label"] == max(probs, key=probs.get)
    assert "30 s" in by_id["long"]["error"]

    # A single audio file is one item; the same seed gives the same answer.
    single = tmp_path / "single.jsonl"
    assert chat.run_chat(model, str(good[0]), str(single), max_new_tokens=6, batch_size=2,
                         progress=False) == 0
    (one,) = [json.loads(x) for x in single.read_text().splitlines()]
    assert one["question_id"] == "helpful_base_1"
    assert one["prediction"] == by_id["a"]["prediction"]
    assert one["prediction_units"] == by_id["a"]["prediction_units"]


def test_chat_prompt_is_the_empathy_prompt_never_the_emotion_question(model):
    """A first chat turn is token for token the prompt of stage 2b's chat rows; stage 2a (and
    2a rows mixed into 2b) ask about the emotion under a different prompt, so the chat prompt
    never carries the 2a target "The speaker sounds ..."."""
    from freezeempath_jax.train.batches import BatchBuilder

    tok = ByteTokenizer(CFG.llm.vocab_size, CFG.speech_token_id, CFG.emotion_token_id)
    q = CFG.emotion.num_queries
    chat_ids = model.prompt_ids([], 30, q)
    b2b = BatchBuilder(CFG, "2b", "emotion_ce", tok, 30, chat_template="plain", target_len=32)
    assert b2b.prompt.tolist() == chat_ids
    assert b2b.prompt_for({"task": "2b"}).tolist() == chat_ids
    question = b2b.prompt_for({"task": "2a"}).tolist()
    assert question != chat_ids
    assert question == BatchBuilder(CFG, "2a", "emotion_ce", tok, 30,
                                    chat_template="plain").prompt.tolist()
    fmt = ChatFormat.named("plain", CFG.system_prompt)
    want = PromptBuilder(tok, fmt, 30, q).speech_prompt(CFG.user_template)
    assert chat_ids == want
    # one 2b batch holds both kinds of rows, each with its reply right after its own prompt
    rec = {"id": "r", "emotion": "sad", "label": 3, "reply": "ok", "mel": np.zeros((80, 8))}
    batch = b2b([dict(rec, task="2a"), dict(rec, task="2b")])
    for row, prompt in ((0, question), (1, chat_ids)):
        p = len(prompt)
        assert batch["input_ids"][row, :p].tolist() == prompt
        assert batch["loss_positions"][row, 0] == p - 1
    assert tok.decode(batch["input_ids"][0, len(question):]).startswith("The speaker sounds")
    assert tok.decode(batch["input_ids"][1, len(chat_ids):]).startswith("ok")


def _turn(model, reply, with_embeds=True, transcript=None):
    h = CFG.llm.hidden_size
    return chat.Turn(reply_ids=model.codec.encode(reply), reply=reply, emotion="sad",
                     transcript=transcript,
                     speech_embeds=np.ones((30, h), np.float32) if with_embeds else None,
                     emotion_embedding=np.ones((1, h), np.float32) if with_embeds else None)


def test_history_prompts_and_context_limit(model):
    c = model.codec
    earlier = [_turn(model, "hi there"), _turn(model, "ok")]
    ids = model.prompt_ids(earlier, 30, 1)
    assert ids.count(CFG.speech_token_id) == 90 and ids.count(CFG.emotion_token_id) == 3
    first = model.prompt_ids([], 30, 1)
    assert ids[:len(first)] == first  # the oldest turn opens the prompt as a first turn would
    assert c.decode(ids).count("assistant: ") == 3 and "hi there\nuser: " in c.decode(ids)

    text_model = chat.ChatModel(CFG, model.params, c, chat_template="plain",
                                audio_seconds=SECONDS, history="text")
    ids = text_model.prompt_ids([_turn(model, "hi", transcript="how are you")], 30, 1)
    assert ids.count(CFG.speech_token_id) == 30
    assert "how are you (with a sad emotional tone)." in c.decode(ids)

    # Context: 2 earlier turns fit in full length, only the newest fits in a smaller limit.
    conv = chat.Conversation(earlier)
    full = len(model.prompt_ids(earlier, 30, 1))
    model_small = chat.ChatModel(CFG, model.params, c, chat_template="plain",
                                 audio_seconds=SECONDS, max_context=full + 4 - 1)
    with pytest.warns(UserWarning, match="dropped its 1 oldest"):
        kept, got, dropped = model_small._fit(conv, 30, 1, max_new_tokens=4)
    assert dropped == 1 and kept == earlier[1:] and got == model.prompt_ids(earlier[1:], 30, 1)
    tiny = chat.ChatModel(CFG, model.params, c, chat_template="plain", audio_seconds=SECONDS,
                          max_context=10)
    with pytest.raises(ValueError, match="context limit"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tiny._fit(conv, 30, 1, max_new_tokens=4)


def test_chatbot_keeps_turns(model, shared_audio_dir):
    from freezeempath_jax.audio import load_audio
    bot = chat.Chatbot(model, max_new_tokens=4, speech=False, temperature=0.0)
    a = load_audio(shared_audio_dir / "vicuna_1.wav")
    r1 = bot(a)
    r2 = bot(a)
    assert r1.units is None and len(bot.conversation.turns) == 2
    assert bot.conversation.turns[0].reply_ids == r1.text_ids
    assert bot.conversation.turns[1].speech_embeds.shape == (30, CFG.llm.hidden_size)
    # the embeddings of a turn stay on the device, in the history too (no host round trip)
    assert isinstance(bot.conversation.turns[1].speech_embeds, jax.Array)
    assert isinstance(bot.conversation.turns[1].emotion_embedding, jax.Array)
    enc = model.encode([a], 2)
    assert isinstance(enc.speech, jax.Array) and isinstance(enc.ser_logits, np.ndarray)
    assert r1.emotion == r2.emotion  # same clip, same SER head
    # The second turn hears the first: its prompt is longer, so generation saw a new shape.
    assert len(model.prompt_ids(bot.conversation.turns[:1], 30, 1)) > len(
        model.prompt_ids([], 30, 1))


def _tiny_unit_decoder():
    """A random units-to-waveform decoder small enough for CPU tests, whose codebook is the
    tiny model's unit vocabulary."""
    from freezeempath_jax.models import configs as C
    from freezeempath_jax.models.unit_decoder import init_params

    cfg = C.UnitDecoderConfig(
        codec=C.SemanticCodecConfig(codebook_size=CFG.speech_decoder.unit_vocab_size,
                                    codebook_dim=4, hidden_size=16),
        length_regulator=C.LengthRegulatorConfig(channels=16, in_channels=16,
                                                 sampling_ratios=(1,)),
        dit=C.DiTConfig(hidden_dim=16, num_heads=2, depth=2, content_dim=16, style_dim=8,
                        wavenet_hidden_dim=16, wavenet_num_layers=2,
                        frequency_embedding_size=16),
        bigvgan=C.BigVGANConfig(upsample_initial_channel=128, resblock_kernel_sizes=(3,),
                                resblock_dilation_sizes=((1,),)),
        prompt_frames=4, diffusion_steps=2, length_bucket=16)
    return cfg, init_params(cfg, jax.random.key(0))


def test_chat_speaks_replies_to_wav_files(model, shared_audio_dir, tmp_path):
    """--audio-out: one 22,050 Hz WAV per answered item from its units, named by question id,
    `prediction_audio` on its line; the same seed gives the same bytes; a decoder that cannot
    speak an item's units fails that item only; no decoder at all is one usage error."""
    decoder = _tiny_unit_decoder()
    manifest = tmp_path / "q.jsonl"
    manifest.write_text(json.dumps({"id": "a/1", "audio": str(shared_audio_dir /
                                                                "helpful_base_1.wav")}) + "\n"
                        + json.dumps({"id": "b", "audio": str(shared_audio_dir /
                                                              "vicuna_2.wav")}) + "\n")
    runs = []
    for n in range(2):
        out, wavs = tmp_path / f"answers{n}.jsonl", tmp_path / f"wav{n}"
        assert chat.run_chat(model, str(manifest), str(out), max_new_tokens=6, batch_size=2,
                             progress=False, audio_out=str(wavs), unit_decoder=decoder) == 0
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        runs.append([open(r["prediction_audio"], "rb").read() for r in rows])
        for r in rows:
            assert r["prediction_audio"].startswith(str(wavs))
            audio, rate = sf.read(r["prediction_audio"])
            assert rate == 22050 and len(audio) > 0 and np.isfinite(audio).all()
        assert sorted(p.name for p in wavs.iterdir()) == ["a_1.wav", "b.wav"]
    assert runs[0] == runs[1]  # same model, input and seed: the same bytes

    # a decoder whose codebook is smaller than the units the model emits: per-item errors
    cfg, params = decoder
    import dataclasses
    small = dataclasses.replace(cfg, codec=dataclasses.replace(cfg.codec, codebook_size=1))
    out = tmp_path / "small.jsonl"
    failed = chat.run_chat(model, str(manifest), str(out), max_new_tokens=6, batch_size=2,
                           progress=False, audio_out=str(tmp_path / "w"),
                           unit_decoder=(small, params))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert failed == 2 and [r["question_id"] for r in rows] == ["a/1", "b"]
    for r in rows:
        assert "prediction_audio" not in r
        assert "outside the decoder's codebook [0, 1)" in r["error"]

    from freezeempath_jax.inference.cli import ChatUsageError
    with pytest.raises(ChatUsageError, match="--audio-out needs a units-to-waveform decoder"):
        chat.run_chat(model, str(manifest), str(tmp_path / "x.jsonl"), progress=False,
                      audio_out=str(tmp_path / "w2"))


def test_chat_speaks_with_the_demo_codec_and_streams(model, shared_audio_dir, tmp_path):
    """The demo's unit codec behind the same interface: `--unit-decoder` takes its saved
    folder, WAVs are 16 kHz and byte-identical for the same seed; `ChatModel(unit_decoder=)`
    returns the audio in the Reply, and `stream_reply` yields audio chunks that together
    speak the same units."""
    from freezeempath_jax.checkpoints.unit_decoder import save_unit_codec
    from freezeempath_jax.inference.chat import ChatModel
    from freezeempath_jax.models import unit_codec
    from freezeempath_jax.models.configs import UnitCodecConfig

    ccfg = UnitCodecConfig(codebook_size=CFG.speech_decoder.unit_vocab_size,
                           griffin_lim_iters=4, length_bucket=16)
    params = unit_codec.init_params(ccfg, jax.random.key(0))
    folder = save_unit_codec(str(tmp_path / "codec"), ccfg, params)
    manifest = tmp_path / "q.jsonl"
    manifest.write_text(json.dumps({"id": "c", "audio": str(shared_audio_dir /
                                                            "vicuna_2.wav")}) + "\n")
    got = []
    for n in range(2):
        out = tmp_path / f"a{n}.jsonl"
        assert chat.run_chat(model, str(manifest), str(out), max_new_tokens=6, batch_size=1,
                             progress=False, audio_out=str(tmp_path / f"w{n}"),
                             unit_decoder=folder) == 0
        row = json.loads(out.read_text())
        audio, rate = sf.read(row["prediction_audio"])
        assert rate == 16000 and len(audio) == 320 * len(row["prediction_units"].split())
        got.append(open(row["prediction_audio"], "rb").read())
    assert got[0] == got[1]

    voiced = ChatModel(model.config, model.params, model.codec, chat_template="plain",
                       audio_seconds=model.audio_seconds, max_units=8,
                       unit_decoder=(ccfg, params))
    from freezeempath_jax.audio import load_audio
    clip = load_audio(str(shared_audio_dir / "vicuna_2.wav"))
    reply = voiced.respond([clip], max_new_tokens=6, temperature=0.0, seed=0)[0]
    assert reply.sampling_rate == 16000 and len(reply.audio) == 320 * len(reply.units)
    events = list(voiced.stream_reply(clip, max_new_tokens=6, temperature=0.0, seed=0,
                                      chunk_units=4))
    chunks = [a for kind, a in events if kind == "audio"]
    text = [t for kind, ids in events if kind == "text" for t in ids]
    assert text == reply.text_ids
    assert sum(len(c) for c in chunks) == len(reply.audio)
    assert all(len(c) == 4 * 320 for c in chunks[:-1])
