"""Per-device memory of one chat turn (7B shape by default) on meshes this machine does not
have: compile only, from abstract arrays (library: `freezeempath_jax.inference.plan`).

    python launch/chat_plan.py                                  # 1, 4 and 8 devices
    python launch/chat_plan.py --meshes 1x4x1,2x2x2 --batch 4

The meshes are fake CPU devices, whose count must be in XLA_FLAGS before jax starts: this
script reads `--meshes` and sets it before anything imports jax.
"""

import math
import os
import sys


def _devices_needed(argv) -> int:
    """Devices of the largest mesh in `--meshes` (default 8); the library validates values."""
    text = "1x1x1,1x4x1,1x8x1"
    for i, arg in enumerate(argv):
        if arg == "--meshes" and i + 1 < len(argv):
            text = argv[i + 1]
        elif arg.startswith("--meshes="):
            text = arg.split("=", 1)[1]
    sizes = [1]
    for item in filter(None, text.split(",")):
        try:
            sizes.append(abs(math.prod(int(d) for d in item.lower().split("x"))))
        except ValueError:
            pass  # reported by sharding.parse_mesh
    return max(sizes)


if __name__ == "__main__":
    argv = sys.argv[1:]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={_devices_needed(argv)}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    from freezeempath_jax.inference import plan  # noqa: E402  (jax starts here)

    sys.exit(plan.main(argv))
