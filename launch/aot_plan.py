"""Per-device memory of the full-size train step on meshes this machine does not have.

    python launch/aot_plan.py                                  # 7B, stage 1, default meshes
    python launch/aot_plan.py --stage 2a --meshes 8:1x8x1,256:2x64x2 --grad-accum 2
    python launch/aot_plan.py --target cuda                    # GPU compiler, needs CUDA jax

Compiles ahead of time from abstract shapes only (library: `freezeempath_jax.train.plan`).
With the default `--target cpu` the meshes are fake CPU devices, whose count must be in
XLA_FLAGS before jax starts: this script reads `--meshes` and sets it before anything
imports jax.
"""

import math
import os
import sys


def _flag(argv, name):
    """The value of `--name VALUE` or `--name=VALUE` in argv (the last one), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _largest_mesh(text) -> int:
    """Devices of the largest mesh in a `--meshes` value (`[N:]AxBxC,...`); the library's
    parser validates the value properly once jax is up."""
    if text is None:
        return 256  # the largest of plan.DEFAULT_MESHES
    sizes = [1]
    for item in filter(None, (s.strip() for s in text.split(","))):
        count, _, dims = item.rpartition(":")
        try:
            sizes.append(int(count) if count else
                         abs(math.prod(int(d) for d in dims.lower().split("x"))))
        except ValueError:
            pass  # malformed: reported by plan.parse_meshes
    return max(sizes)


if __name__ == "__main__":
    argv = sys.argv[1:]
    n = _largest_mesh(_flag(argv, "--meshes"))
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={n}").strip()
    if (_flag(argv, "--target") or "cpu") == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"  # fake host devices even where a GPU is present
    from freezeempath_jax.train import plan  # noqa: E402  (jax starts here)

    sys.exit(plan.main(argv))
