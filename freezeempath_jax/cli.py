"""`freezeempath-jax` console script: convert, train, distill, chat, transcribe, eval, demo.

Only wiring lives here; every subcommand calls a library function that notebooks can call too.
`train` is parsed by absl + ml_collections config flags (so `--config.train.steps=N` works);
the others by argparse.
"""

from __future__ import annotations

import argparse
import sys


def _convert(args):
    from freezeempath_jax.checkpoints import convert
    convert(args.kind, args.src, args.out, dtype=args.dtype, whisper=args.whisper)
    print(f"converted {args.kind} checkpoint {args.src} -> {args.out}")
    return 0


def _distill(args):
    from freezeempath_jax.distill import run_distill
    n = run_distill(args.model, args.input, args.output, mode=args.mode,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    seed=args.seed, batch_size=args.batch_size)
    print(f"wrote {n} targets to {args.output}")
    return 0


def _on_off(value: str) -> bool:
    """argparse type of an on/off switch (`--dual-thinking on|off`)."""
    v = str(value).strip().lower()
    if v in ("on", "true", "yes", "1"):
        return True
    if v in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected 'on' or 'off', got {value!r}")


def _chat(args):
    from freezeempath_jax.checkpoints.errors import CheckpointError
    from freezeempath_jax.inference.cli import ChatUsageError, run_chat
    overrides = {k: v for k, v in (("llm", args.llm), ("whisper", args.whisper),
                                   ("freezeempath", args.release)) if v}
    try:
        failed = run_chat(args.model, args.input, args.output, temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens, seed=args.seed,
                          batch_size=args.batch_size, init_overrides=overrides or None,
                          audio_out=args.audio_out, unit_decoder=args.unit_decoder,
                          dual_thinking=args.dual_thinking, mesh=args.mesh,
                          unit_temperature=args.unit_temperature)
    except (ChatUsageError, CheckpointError, FileNotFoundError) as e:
        # the user's paths (input, output, model and its frozen parts): one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def _transcribe(args):
    from freezeempath_jax.inference.transcribe import run_transcribe
    failed = run_transcribe(args.model, args.input, args.output, batch_size=args.batch_size,
                            language=args.language)
    return 1 if failed else 0


def _eval(args):
    from freezeempath_jax.evaluation import run_eval
    failed = run_eval(args.model, args.task, args.input, args.output, judge=args.judge,
                      asr=args.asr, llm=args.llm, data_dir=args.data_dir, split=args.split,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      mode=args.mode, seed=args.seed, resamples=args.resamples)
    return 1 if failed else 0


def _demo(args):
    from freezeempath_jax.demo import run_demo
    run_demo(workdir=args.workdir, quick=args.quick, speech=args.speech, seed=args.seed)
    return 0


def _train(argv):
    from freezeempath_jax.train.cli import main_train
    return main_train(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freezeempath-jax", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a checkpoint (HF, OpenAI .pt, CTranslate2, GGUF, "
                                       "FreezeEmpath release) into this project's orbax format")
    c.add_argument("--kind", choices=["whisper", "llm", "freezeempath", "unit_decoder"],
                   required=True)
    c.add_argument("--from", dest="src", required=True, help="input file or directory")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--dtype", default=None, help="parameter dtype (default: float32 for small "
                                                  "parts, bfloat16 for the frozen 7B parts)")
    c.add_argument("--whisper", default=None,
                   help="for --kind freezeempath: a separate Whisper checkpoint")
    c.set_defaults(fn=_convert)

    sub.add_parser("train", help="train a stage: --config configs/tiny.py --config.stage=2a "
                                 "--config.train.steps=N --workdir DIR (resumes from DIR)",
                   add_help=False)

    d = sub.add_parser("distill", help="write the frozen LLM's own replies (training targets)")
    d.add_argument("--model", required=True, help="checkpoint directory or config file")
    d.add_argument("--input", required=True, help="JSONL manifest with transcripts")
    d.add_argument("--output", required=True, help="output JSONL")
    d.add_argument("--mode", choices=["reply", "emotion_reply", "empathetic"], default="reply")
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--batch-size", type=int, default=8)
    d.set_defaults(fn=_distill)

    h = sub.add_parser("chat", help="answer spoken questions (one audio file or a JSONL manifest)")
    h.add_argument("--model", required=True, help="converted/trained checkpoint dir or config")
    h.add_argument("--input", required=True, help="audio file or JSONL manifest {id, audio}")
    h.add_argument("--output", required=True, help="answers JSONL (written as it goes)")
    h.add_argument("--temperature", type=float, default=0.7)
    h.add_argument("--max-new-tokens", type=int, default=256)
    h.add_argument("--seed", type=int, default=42)
    h.add_argument("--batch-size", type=int, default=4)
    h.add_argument("--llm", default=None, metavar="PATH",
                   help="frozen LLM checkpoint to use instead of the path or package the "
                        "model's config names (init.llm)")
    h.add_argument("--whisper", default=None, metavar="PATH",
                   help="frozen Whisper encoder instead of the one the config names "
                        "(init.whisper)")
    h.add_argument("--release", default=None, metavar="PATH",
                   help="FreezeEmpath release checkpoint instead of the one the config names "
                        "(init.freezeempath)")
    h.add_argument("--audio-out", default=None, metavar="DIR",
                   help="speak each reply: DIR/<question_id>.wav from its speech units "
                        "(adds prediction_audio to the line)")
    h.add_argument("--unit-decoder", default=None, metavar="PATH",
                   help="units-to-waveform decoder for --audio-out: the release's decoder "
                        "folder, a converted one or the demo's unit codec (default: "
                        "MODEL/unit_decoder)")
    h.add_argument("--dual-thinking", default=None, type=_on_off, metavar="on|off",
                   help="OSUM-EChat dual thinking: open each reply with a paralinguistic "
                        "analysis from the model's heads, e.g. '(The user sounds like a woman, "
                        "and sad.)' (the line gets `analysis`); default: as the checkpoint "
                        "was trained (data.dual_thinking)")
    h.add_argument("--mesh", default=None, metavar="DATAxFSDPxTENSOR",
                   help="run sharded over the local devices, e.g. 1x-1x1 (parameters over "
                        "fsdp, as training); the config's mesh.rules map the axes")
    h.add_argument("--unit-temperature", type=float, default=None,
                   help="temperature of speech-unit sampling (default: the checkpoint's "
                        "data.unit_temperature - the demo's stage 3 stores 0.3 for its "
                        "small decoder - else the release's 1.0)")
    h.set_defaults(fn=_chat)

    t = sub.add_parser("transcribe", help="speech recognition with a Whisper checkpoint "
                                          "(greedy, no timestamps)")
    t.add_argument("--model", required=True, help="Whisper checkpoint: Hugging Face dir, "
                                                  "OpenAI .pt or CTranslate2 dir")
    t.add_argument("--input", required=True, help="audio file or JSONL manifest {id, audio}")
    t.add_argument("--output", required=True, help="transcripts JSONL {id, audio, text}")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--language", default="en", help="language token of multilingual models")
    t.set_defaults(fn=_transcribe)

    e = sub.add_parser("eval", help="evaluate a model: ser, spoken_qa, empathy, ablation, "
                                    "retention (docs/evaluation.md)")
    e.add_argument("--model", required=True, help="checkpoint dir, workdir or config file")
    e.add_argument("--task", required=True,
                   choices=["ser", "spoken_qa", "empathy", "ablation", "retention"])
    e.add_argument("--input", required=True,
                   help="JSONL manifest (ser also takes tfds:<name>)")
    e.add_argument("--output", required=True, help="output directory")
    e.add_argument("--judge", default=None, help="causal LM checkpoint for LLM-judge scores "
                                                 "(empathy)")
    e.add_argument("--asr", default=None, help="Whisper checkpoint transcribing spoken replies "
                                               "(spoken_qa --mode s2s)")
    e.add_argument("--llm", default=None, help="the frozen LLM alone (retention): causal LM "
                                               "checkpoint or .gguf")
    e.add_argument("--mode", default="s2t", choices=["s2t", "s2s"], help="spoken_qa mode")
    e.add_argument("--data-dir", default=None, help="TFDS data dir for --input tfds:<name>")
    e.add_argument("--split", default="test", help="TFDS split for --input tfds:<name>")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    e.set_defaults(fn=_eval)

    m = sub.add_parser("demo", help="end-to-end CPU demo on real small models and synthetic "
                                    "emotional speech")
    m.add_argument("--workdir", default="demo_out")
    m.add_argument("--quick", action="store_true",
                   help="fewer training steps (the reduced run CI tests)")
    voice = m.add_mutually_exclusive_group()
    voice.add_argument("--speech", dest="speech", action="store_const", const="train",
                       default="shipped",
                       help="train stage 3 (the speech decoder on the demo unit codec) here "
                            "instead of using the decoder the package ships; about 50 min "
                            "more on a 2-core CPU (--quick: about 15)")
    voice.add_argument("--no-speech", dest="speech", action="store_const", const="off",
                       help="text replies only (by default the replies are spoken with the "
                            "shipped speech decoder: chat/audio/, report/speech.json)")
    m.add_argument("--seed", type=int, default=0,
                   help="training seed (the corpus is the same for every seed)")
    m.set_defaults(fn=_demo)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return _train(["freezeempath-jax train"] + argv[1:]) or 0
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
