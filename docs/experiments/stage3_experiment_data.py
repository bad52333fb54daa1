"""Experiment record (2026-12-07, docs/speech_out.md "Phonemes as positions"), not part of the
package: the stage-3 records the phoneme experiment trains and scores on.

The seed-0 full demo's chat model answers the full speech recipe's 480 training clips
greedily (`stage3_records`: cached LLM states, eSpeak renders in the user's style, the codec
fitted on them, aligned unit ends) and the speech report's held-out set (8 held-out grammar
questions x 5 emotions, the report's voices and seeds).

usage: python stage3_experiment_data.py DEMO_WORKDIR OUT.pkl [N_TRAIN]
"""
import os, pickle, sys, time
import numpy as np
from freezeempath_jax import demo
from freezeempath_jax.audio import load_audio
from freezeempath_jax.data import synthetic
from freezeempath_jax.data.manifests import read_manifest
from freezeempath_jax.inference.loading import load_chat_model
from freezeempath_jax.models.configs import EMOTIONS
from freezeempath_jax.train.speech_targets import stage3_records

wd = sys.argv[1]; out = sys.argv[2]
n_train = int(sys.argv[3]) if len(sys.argv) > 3 else 480
bot = load_chat_model(os.path.join(wd, f"stage_{demo.FINAL_STAGE}"))
train = demo._stratified(read_manifest(os.path.join(wd, "data", "train.jsonl")), n_train)
clips = [load_audio(r["audio"]) for r in train]
tic = time.time()
kt, (cc, cp), _ = stage3_records(bot, train, clips, max_new_tokens=demo.REPLY_TOKENS,
                                 codec_config=demo.codec_config(), max_units=demo.MAX_REPLY_UNITS)
print("train records", len(kt), time.time() - tic, flush=True)
pool = synthetic.grammar_questions(held_out=True)
picks = np.random.default_rng(23).choice(len(pool), size=8, replace=False)
voices = synthetic.VOICES["en"]
ev, evc = [], []
for n, k in enumerate(picks):
    q = pool[int(k)][0]
    for i, e in enumerate(EMOTIONS):
        evc.append(synthetic.synthesize(q, e, voice=voices[n % len(voices)], seed=int(k) * 5 + i))
        ev.append({"id": f"h{n}_{e}", "emotion": e, "question": q})
ke, _, _ = stage3_records(bot, ev, evc, max_new_tokens=demo.REPLY_TOKENS, codec_config=cc,
                          codec_params=cp, max_units=demo.MAX_REPLY_UNITS)
print("eval records", len(ke), time.time() - tic, flush=True)
vocab = {}
for r in kt + ke:
    for t in r["reply_ids"]:
        if t not in vocab:
            vocab[t] = bot.codec.decode([t])
with open(out, "wb") as f:
    pickle.dump(dict(train=kt, eval=ke, codec=(cc, cp), tokstr=vocab), f)
print("done", time.time() - tic)
