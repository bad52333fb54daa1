"""Experiment record (2026-12-07, docs/speech_out.md "Phonemes as positions"), not part of the
package: the demo speech decoder reading each word's eSpeak phonemes as sequence positions
right before that word's units.

Sequence per reply: for each token t: [the LLM state that produced t] [phoneme symbols of the
words t completes, each its own position, '|' opening a word] [the units of those words]
[EOS]. Trained 500 steps like the trainer (AdamW 2e-3, warmup 3% + cosine, clip 1.0, batch 8,
unit input noise 0.25); held-out replies spoken with a KV cache, unit temperature 0.3, scored
by Whisper tiny.en. Records from stage3_experiment_data.py (PHON_DATA, default
/tmp/s28/data480.pkl).

usage: python phoneme_positions.py STEPS OUT.json [N_EVAL]
"""
import collections, dataclasses, json, os, pickle, re, sys, time

# --- eSpeak NG text-to-phonemes through ctypes (espeak_TextToPhonemes) ---
import ctypes, espeakng_loader as e
_lib = ctypes.cdll.LoadLibrary(e.get_library_path())
_lib.espeak_Initialize.restype = ctypes.c_int
r = _lib.espeak_Initialize(1, 0, e.get_data_path().encode(), 0)  # AUDIO_OUTPUT_RETRIEVAL... 1=SYNCHRONOUS
assert r > 0, r
assert _lib.espeak_SetVoiceByName(b"en-us") == 0
_lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
_lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]

def phonemes(text, sep="_"):
    buf = ctypes.create_string_buffer(text.encode("utf-8"))
    p = ctypes.c_void_p(ctypes.addressof(buf))
    out = []
    while p.value is not None:
        s = _lib.espeak_TextToPhonemes(ctypes.byref(p), 1, ord(sep) << 8 if sep else 0)
        if s is None: break
        out.append(s.decode("utf-8", "replace"))
    return " ".join(out)
import numpy as np, jax, jax.numpy as jnp, optax


from freezeempath_jax.models import presets, unit_codec
from freezeempath_jax.models.speech_decoder import SpeechDecoder
from freezeempath_jax.models.causal_lm import init_cache
from freezeempath_jax.evaluation.speech_out import word_error_rate, prosody, normalize_words

steps, out_path = int(sys.argv[1]), sys.argv[2]
n_eval = int(sys.argv[3]) if len(sys.argv) > 3 else None
D = pickle.load(open(os.environ.get("PHON_DATA", "/tmp/s28/data480.pkl"), "rb"))
train, evals, (cc, cp), tokstr = D["train"], D["eval"], D["codec"], D["tokstr"]
if n_eval: evals = evals[:n_eval]
H = 576; UNIT_EOS = 513; NU = 512
TEXT, PH, UNIT, EOS = 0, 1, 2, 3

# ---------- phonemes ----------
STRESS = "',%="
_pcache = {}
def word_phones(w):
    """symbols of one whitespace word: '|' then phoneme symbols (stress marks split off)."""
    if w not in _pcache:
        syms = []
        for sub in phonemes(w.replace('"', " ").strip() or w).split():
            syms.append("|")
            for p in sub.split("_"):
                while p and p[0] in STRESS:
                    syms.append(p[0]); p = p[1:]
                if p: syms.append(p)
        _pcache[w] = syms
    return _pcache[w]

def align(r):
    """per token: (words completed, phone symbols, units span)."""
    ids = r["reply_ids"]; tue = r["token_unit_ends"]
    full = "".join(tokstr[t] for t in ids)
    lead = len(full) - len(full.lstrip())
    text = full.strip()
    assert text == r["reply"].strip(), (text, r["reply"])
    ce, acc = [], 0
    for t in ids:
        acc += len(tokstr[t]); ce.append(max(0, min(acc - lead, len(text))))
    words = [(m.group(), m.end()) for m in re.finditer(r"\S+", text)]
    out, w, prev_u = [], 0, 0
    for i in range(len(ids)):
        done = []
        while w < len(words) and words[w][1] <= ce[i]:
            done.append(words[w][0]); w += 1
        ph = [s for x in done for s in word_phones(x)]
        out.append((done, ph, r["units"][prev_u:tue[i]]))
        prev_u = tue[i]
    assert w == len(words)
    return out, r["units"][prev_u:]

ALIGN = {}
stats = collections.Counter()
for r in train + evals + D["eval"]:
    if r["id"] in ALIGN: continue
    a, rest = align(r)
    ALIGN[r["id"]] = (a, rest)
    for done, ph, u in a:
        stats[(bool(done), bool(len(u)))] += 1
    stats["rest_nonempty"] += bool(len(rest))
print("align (word-completing, has-units) counts:", dict(stats), flush=True)
SYMS = sorted({s for a, _ in ALIGN.values() for _, ph, _ in a for s in ph})
P = len(SYMS); SID = {s: 514 + i for i, s in enumerate(SYMS)}
print("phoneme inventory", P, " ".join(SYMS), flush=True)
for w in ["sorry", "tennis", "lettuce", "I'm", "AI,"]:
    print("  ", w, word_phones(w), flush=True)

def layout(r):
    """kind, id, text index per position."""
    a, rest = ALIGN[r["id"]]
    kind, ids, tix = [], [], []
    for t, (_, ph, u) in enumerate(a):
        kind.append(TEXT); ids.append(0); tix.append(t)
        for s in ph: kind.append(PH); ids.append(SID[s]); tix.append(0)
        for x in u: kind.append(UNIT); ids.append(int(x)); tix.append(0)
        kind.append(EOS); ids.append(UNIT_EOS); tix.append(0)
    for x in rest: kind.append(UNIT); ids.append(int(x)); tix.append(0)
    kind.append(EOS); ids.append(UNIT_EOS); tix.append(0)
    return kind, ids, tix

Lmax = max(len(layout(r)[0]) for r in train + evals)
S = -(-Lmax // 64) * 64
print("max seq", Lmax, "S", S, flush=True)
T = 33
sd = presets.demo_speech_decoder(512, 600)
sd = dataclasses.replace(sd, lm=dataclasses.replace(sd.lm, vocab_size=514 + P,
                         max_position_embeddings=max(sd.lm.max_position_embeddings, 1024)),
                         max_length=max(sd.max_length, S))
model = SpeechDecoder(sd, H)

def batch(recs):
    b = len(recs)
    hid = np.zeros((b, T, H), np.float32)
    kind = np.full((b, S), -1, np.int32); ids = np.zeros((b, S), np.int32)
    tix = np.zeros((b, S), np.int32); mask = np.zeros((b, S), np.int32)
    for i, r in enumerate(recs):
        n = len(r["reply_ids"]); hid[i, :n] = r["llm_hidden_prev"][:n]
        k, d, x = layout(r); L = len(k)
        kind[i, :L] = k; ids[i, :L] = d; tix[i, :L] = x; mask[i, :L] = 1
    tgt = np.zeros_like(ids); tgt[:, :-1] = ids[:, 1:]
    lm = np.zeros((b, S), np.float32)
    lm[:, :-1] = ((kind[:, 1:] == UNIT) | (kind[:, 1:] == EOS)).astype(np.float32)
    return hid, kind, ids, tix, mask, tgt, lm

def _init(m, hid, tid, tok):
    m.fuse(hid, tid)
    return m(m.lm.embed(tok))

def embed(m, i): return m.lm.embed(i)

def forward(p, hid, kind, ids, tix, mask):
    v = {"params": p}
    b = hid.shape[0]
    fused = model.apply(v, hid, jnp.zeros(hid.shape[:2], jnp.int32), method=SpeechDecoder.fuse)
    tin = jnp.take_along_axis(fused, tix[..., None], axis=1)
    emb = model.apply(v, ids, method=embed)
    x = jnp.where((kind == TEXT)[..., None], tin, emb)
    return model.apply(v, x, attention_mask=mask).logits.astype(jnp.float32)

B = 8
hb = batch(train[:B])
params = model.init(jax.random.key(0), jnp.asarray(hb[0]), jnp.zeros((B, T), jnp.int32),
                    jnp.asarray(hb[2]), method=_init)["params"]
print("params", sum(x.size for x in jax.tree.leaves(params)), list(params), flush=True)
warm = max(1, int(np.ceil(steps * 0.03)))
sched = optax.warmup_cosine_decay_schedule(0.0, 2e-3, warm, steps + 1, 0.0)
tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lambda c: sched(c + 1), weight_decay=0.0))
opt = tx.init(params)

@jax.jit
def step(params, opt, hid, kind, ids_in, tix, mask, tgt, lm):
    def lf(p):
        lg = forward(p, hid, kind, ids_in, tix, mask)
        tl = jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, tgt[..., None], -1)[..., 0]
        return jnp.sum(tl * lm) / jnp.maximum(jnp.sum(lm), 1.0)
    l, g = jax.value_and_grad(lf)(params)
    up, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, up), opt, l

@jax.jit
def tf_acc(params, hid, kind, ids, tix, mask, tgt, lm):
    lg = forward(params, hid, kind, ids, tix, mask)
    return jnp.sum((jnp.argmax(lg, -1) == tgt) * lm), jnp.sum(lm)

# ---------- train ----------
rng = np.random.default_rng(0); drng = np.random.default_rng(1)
order, log = [], []
tic = time.time()
for s in range(steps):
    if len(order) < B: order += list(rng.permutation(len(train)))
    pick, order = order[:B], order[B:]
    hid, kind, ids, tix, mask, tgt, lm = batch([train[i] for i in pick])
    hit = (drng.random(ids.shape) < 0.25) & (kind == UNIT)
    ids_in = np.where(hit, drng.integers(0, NU, ids.shape), ids).astype(np.int32)
    params, opt, l = step(params, opt, hid, kind, ids_in, tix, mask, tgt, lm)
    if s % 50 == 0 or s == steps - 1:
        l = float(l); log.append((s, l))
        print(f"step {s} loss {l:.3f} {time.time()-tic:.0f}s", flush=True)
train_s = time.time() - tic
pickle.dump(jax.device_get(params), open(out_path.replace(".json", "") + ".params.pkl", "wb"))

# ---------- teacher-forced accuracy ----------
c = n = 0
for i in range(0, len(evals), B):
    part = evals[i:i + B]; part = part + [part[-1]] * (B - len(part))
    bb = batch(part)
    if len(evals[i:i + B]) < B:  # do not count padded duplicates
        bb = bb[:6] + (bb[6] * (np.arange(B) < len(evals[i:i + B]))[:, None],)
    a, m = tf_acc(params, *bb); c += float(a); n += float(m)
tf = c / n
print("tf_acc", tf, flush=True)

# ---------- free-running generation ----------
CS = 1024
v = {"params": params}

@jax.jit
def feed_text(params, cache, h):
    v = {"params": params}
    x = model.apply(v, h[None, None], jnp.zeros((1, 1), jnp.int32), method=SpeechDecoder.fuse)
    o = model.apply(v, x, cache=cache)
    return o.logits[0, -1], o.cache

@jax.jit
def feed_tok(params, cache, tok):
    v = {"params": params}
    x = model.apply(v, jnp.reshape(tok, (1, 1)), method=embed)
    o = model.apply(v, x, cache=cache)
    return o.logits[0, -1], o.cache

allowed = np.full((514 + P,), -1e9, np.float32); allowed[:NU] = 0; allowed[UNIT_EOS] = 0
allowed = jnp.asarray(allowed)
@jax.jit
def sample(logits, rec, draw):
    k = jax.random.fold_in(jax.random.fold_in(jax.random.key(1), rec), draw)
    return jax.random.categorical(k, logits / 0.3 + allowed)

tic = time.time()
gen_units = []
for ri, r in enumerate(evals):
    a, _ = ALIGN[r["id"]]
    cache = init_cache(sd.lm, 1, CS)
    units, draw = [], 0
    def speak(logits, cache, cap):
        global draw
        n = 0
        while True:
            u = int(sample(logits, ri, draw)); draw += 1
            if u == UNIT_EOS or n >= cap or len(units) >= 600:
                return feed_tok(params, cache, jnp.int32(UNIT_EOS))
            units.append(u); n += 1
            logits, cache = feed_tok(params, cache, jnp.int32(u))
    for t, (_, ph, _) in enumerate(a):
        logits, cache = feed_text(params, cache, jnp.asarray(r["llm_hidden_prev"][t]))
        for s_ in ph:
            logits, cache = feed_tok(params, cache, jnp.int32(SID[s_]))
        logits, cache = speak(logits, cache, 75)
    speak(logits, cache, 600)
    gen_units.append(np.asarray(units, np.int32))
    if ri % 10 == 0: print("gen", ri, len(units), f"{time.time()-tic:.0f}s", flush=True)
gen_s = time.time() - tic
print("gen_s", gen_s, flush=True)

audio = unit_codec.decode_units(cc, cp, [x if len(x) else np.zeros(1, np.int32) for x in gen_units])
from freezeempath_jax.inference.transcribe import WhisperASR
from freezeempath_jax.real_models import whisper_tiny_en_ct2
asr = WhisperASR.load(whisper_tiny_en_ct2(), batch_size=8, max_new_tokens=96)
hyps = asr.transcribe(audio)
rows = []
for r, au, h, u in zip(evals, audio, hyps, gen_units):
    p = prosody(au, len(normalize_words(r["reply"])))
    rows.append(dict(id=r["id"], emotion=r["emotion"], reply=r["reply"], asr=h,
                     wer=word_error_rate(r["reply"], h), units=len(u), f0=p.get("f0_hz"),
                     rate=p.get("rate_wps")))
wer = [x["wer"] for x in rows]
def med(e):
    xs = [x["f0"] for x in rows if x["emotion"] == e and x["f0"]]
    return float(np.nanmedian(xs)) if xs else None
res = dict(arm="phon", steps=steps, S=S, phonemes=P, align=dict((str(k), v) for k, v in stats.items()),
           train_s=train_s, gen_s=gen_s, tf_acc=tf, loss_log=log,
           wer_mean=float(np.mean(wer)), wer_median=float(np.median(wer)),
           f0={e: med(e) for e in ("sad", "happy")}, rows=rows)
json.dump(res, open(out_path, "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "rows"}))
