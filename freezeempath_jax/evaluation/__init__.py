"""Evaluation: the paper's tables and the controls it lacks (DESIGN.md section 10).

One module per task - `ser`, `spoken_qa`, `empathy`, `ablation`, `retention` - each with an
`evaluate_*(chat_model, records, ...) -> dict` that notebooks and the demo call directly;
`run_eval` is the `freezeempath-jax eval` command: it reads the input, runs the task and
writes DIR/results.json, DIR/items.jsonl and the task's table or plot. Shared pieces
(manifests, text scores, bootstrap intervals) are in `common`, the controlled prompts in
`replies`, the LLM judge in `judge`. Nothing here imports `freezeempath_jax.train`.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from freezeempath_jax.evaluation.ablation import evaluate_ablation
from freezeempath_jax.evaluation.common import error_count, read_manifest, write_outputs
from freezeempath_jax.evaluation.empathy import evaluate_empathy
from freezeempath_jax.evaluation.judge import LMJudge, parse_rating
from freezeempath_jax.evaluation.retention import evaluate_retention
from freezeempath_jax.evaluation.ser import evaluate_ser, plot_confusion, read_tfds
from freezeempath_jax.evaluation.spoken_qa import evaluate_spoken_qa

TASKS = ("ser", "spoken_qa", "empathy", "ablation", "retention")


def _records(task: str, input_path: str, data_dir: Optional[str], split: str):
    if input_path.startswith("tfds:"):
        if task != "ser":
            raise ValueError("tfds: inputs are SER corpora; use them with --task ser")
        return read_tfds(input_path[len("tfds:"):], split, data_dir)
    required = {"ser": ("audio", "emotion"), "spoken_qa": ("audio",), "empathy": ("audio",),
                "ablation": (), "retention": ()}[task]
    return read_manifest(input_path, required)


def run_eval(model, task: str, input_path: str, output_dir: str, *, judge=None, asr=None,
             llm=None, audio_fn: Optional[Callable] = None, data_dir: Optional[str] = None,
             split: str = "test", batch_size: int = 8, max_new_tokens: int = 128,
             mode: str = "s2t", seed: int = 0, resamples: int = 1000,
             progress: bool = True) -> int:
    """Runs `task` on `input_path` (a JSONL manifest, or `tfds:<name>` for ser) and writes
    `output_dir`/results.json, items.jsonl and, per task, confusion.png (ser) or
    ablation.md. Returns the number of items that could not be scored.

    model: a `ChatModel` or anything `inference.load_chat_model` accepts. judge: an
    `LMJudge`, a callable `prompts -> answers`, or a causal LM path (empathy, ablation).
    asr: a `WhisperASR` or Whisper checkpoint path (spoken_qa s2s). llm: `(config, params,
    tokenizer)` or a causal LM path (retention: the LLM alone). audio_fn: units -> waveform
    (spoken_qa s2s).
    """
    from freezeempath_jax.inference.loading import load_chat_model

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    records = _records(task, input_path, data_dir, split)
    # a ChatModel (or anything answering `respond`, e.g. a test stub) is used as it is
    cm = model if hasattr(model, "respond") else load_chat_model(model)
    if isinstance(judge, (str, os.PathLike)):
        judge = LMJudge.load(os.fspath(judge))
    common = dict(batch_size=batch_size, progress=progress)
    gen = dict(common, max_new_tokens=max_new_tokens)
    boot = dict(resamples=resamples, seed=seed)
    if task == "ser":
        results = evaluate_ser(cm, records, **common, **boot)
    elif task == "spoken_qa":
        results = evaluate_spoken_qa(cm, records, mode=mode, audio_fn=audio_fn, asr=asr,
                                     **gen, **boot)
    elif task == "empathy":
        results = evaluate_empathy(cm, records, judge=judge, **gen, **boot)
    elif task == "ablation":
        results = evaluate_ablation(cm, records, judge=judge, **gen, **boot)
    else:
        if llm is None:
            raise ValueError("retention compares with the LLM loaded alone: pass llm= "
                             "(--llm PATH)")
        if isinstance(llm, (str, os.PathLike)):
            from freezeempath_jax.distill import load_llm
            llm = load_llm(os.fspath(llm))
        results = evaluate_retention(cm, records, llm, **gen)
    results["input"] = input_path
    write_outputs(output_dir, results, records)
    if task == "ser" and results["n"]:
        plot_confusion(results, os.path.join(output_dir, "confusion.png"))
        for name, head in results.get("paralinguistic", {}).items():  # OSUM-EChat heads
            plot_confusion(head, os.path.join(output_dir, f"confusion_{name}.png"),
                           title=name)
    if task == "ablation":
        from freezeempath_jax.evaluation.ablation import write_table
        write_table(results, output_dir)
    return error_count(records)


__all__ = ["TASKS", "run_eval", "evaluate_ser", "evaluate_spoken_qa", "evaluate_empathy",
           "evaluate_ablation", "evaluate_retention", "read_manifest", "read_tfds",
           "LMJudge", "parse_rating", "plot_confusion"]
