"""Train one stage: the same flags as `freezeempath-jax train` (the logic is in the library).

    python launch/train.py --config configs/tiny.py --config.stage=2a \\
        --config.train.steps=300 --workdir /tmp/tiny_2a
    python launch/train.py --config configs/freezeempath_7b.py --config.stage=1 \\
        --config.init.llm=/ckpt/Qwen2.5-7B-Instruct ... --workdir gs://bucket/runs/stage1

A workdir holding a checkpoint is resumed. On several hosts run the same command on each
(launch/tpu_pod.sh, launch/gpu_slurm.sh): the trainer calls `jax.distributed.initialize`
itself when the environment describes a multi-process job
(`train.step.maybe_initialize_distributed`), so nothing here touches jax before it does.
"""

from absl import app, flags

from freezeempath_jax.train import cli

if __name__ == "__main__":
    # absl's app.run gives --help (listing the trainer's flags, adopted as this script's own);
    # main_train then gets the program name alone and re-reads the flags app.run parsed.
    cli.define_flags()
    flags.adopt_module_key_flags(cli)
    app.run(cli.main_train)
