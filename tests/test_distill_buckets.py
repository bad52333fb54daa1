"""The trainer's self-distillation buckets its prompt widths: teacher prompts of different
lengths share one compiled prefill and decode (no new trace per batch width)."""

import types

from flax import linen as nn
from ml_collections import ConfigDict

from freezeempath_jax import sharding
from freezeempath_jax.checkpoints.model_tree import abstract_boxed_params, host_random_params
from freezeempath_jax.inference import sampling
from freezeempath_jax.models import presets
from freezeempath_jax.text.tokenizers import make_tokenizer
from freezeempath_jax.train.targets import PROMPT_BUCKET, ReplyDistiller


def test_reply_distiller_compiles_once_for_prompts_of_different_lengths():
    cfg_model = presets.TINY
    params = host_random_params(nn.meta.unbox(abstract_boxed_params(cfg_model)))
    cfg = ConfigDict({"data": {"cache_dir": "", "chat_template": "plain", "target_len": 4,
                               "teacher_len": 96, "tokenizer": "byte"},
                      "init": {"llm": "", "freezeempath": ""}, "train": {"seed": 0}})
    ts = types.SimpleNamespace(model_config=cfg_model, mesh=sharding.make_mesh((1, 1, 1)))
    tok = make_tokenizer(cfg_model)
    distiller = ReplyDistiller(cfg, ts, {"llm": params["llm"]}, tok)
    lengths = []
    traces = []
    from freezeempath_jax.text.prompts import ChatFormat, PromptBuilder

    framing = PromptBuilder(tok, ChatFormat.named("plain", cfg_model.system_prompt), 0, 0)
    for text in ("Hi?", "Hello there?", "Good day?"):
        recs = [{"id": "a", "transcript": text}, {"id": "b", "transcript": text[:2]}]
        distiller._generate_replies(recs, with_emotion=False, batch=4)
        assert all(isinstance(r["reply_ids"], list) for r in recs)
        lengths.append(len(framing.text_prompt(text)))
        traces.append(sampling.trace_counts().get("prefill", 0))
    # three widths, one bucket
    assert len(set(lengths)) == 3 and len({-(-n // PROMPT_BUCKET) for n in lengths}) == 1
    assert traces[1] == traces[0] and traces[2] == traces[0], traces
