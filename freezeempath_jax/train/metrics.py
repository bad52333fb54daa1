"""Training observability: scalar logs (JSONL + TensorBoard), throughput, MFU, NaN guard.

`MetricsWriter` writes every logged scalar twice: one JSON object per line in
`<workdir>/metrics.jsonl` ({"step", "split", "time", name: value, ...}) and TensorBoard event
files under `<workdir>/tensorboard/` (tag `<split>/<name>`). Only the first host writes.

`Throughput` turns wall time between log points into samples/s, tokens/s and, given the
FLOPs of one step and the peak FLOP/s of the devices, model FLOPs utilisation.

`check_finite` is the NaN/inf guard: it raises `NonFiniteError` naming the step and metric.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, Mapping, Optional

import numpy as np


class NonFiniteError(FloatingPointError):
    """A training metric became NaN or infinite; the message names the step and metric."""


def check_finite(step: int, metrics: Mapping[str, float], last_good: Optional[int] = None,
                 checkpoint_dir: Optional[str] = None) -> None:
    """Raises `NonFiniteError` when any metric is NaN or +-inf."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(float(v))}
    if not bad:
        return
    name, value = sorted(bad.items())[0]
    where = (f"the last good checkpoint is step {last_good} in {checkpoint_dir}"
             if last_good is not None else "no checkpoint was written yet")
    raise NonFiniteError(
        f"training stopped at step {step}: metric {name!r} is {value} "
        f"(non-finite: {sorted(bad)}); the state of this step was not saved, {where}. "
        "Lower train.lr, check the data of this step, or resume from that checkpoint.")


def to_host(metrics: Mapping) -> Dict[str, float]:
    """Device scalars -> Python floats (one transfer for the whole dict)."""
    import jax
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


class MetricsWriter:
    """JSONL + TensorBoard scalar logger (no-op on hosts other than the first)."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True,
                 resume_step: Optional[int] = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            self._truncate(resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                     purge_step=resume_step)
        self._file = open(self.path, "a", encoding="utf-8")

    def _truncate(self, step: int):
        """Drops lines a killed run logged after the checkpoint it resumes from, so the log
        reads as one uninterrupted run."""
        with open(self.path, encoding="utf-8") as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(keep)

    def write(self, step: int, scalars: Mapping[str, float], split: str = "train"):
        if not self.enabled:
            return
        row = {"step": int(step), "split": split, "time": time.time()}
        row.update({k: float(v) for k, v in scalars.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self):
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str):
    """All rows of a metrics.jsonl file (for tests, notebooks and the README curves)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Throughput:
    """Rates between log points: samples/s, tokens/s, model TFLOP/s when FLOPs are known,
    and MFU when the device's peak is known too.

    flops_per_step: model FLOPs of one optimizer step (train.flops; frozen LLM counted
    with its forward and input-gradient backward). peak_flops: per-device peak FLOP/s.
    """

    def __init__(self, batch_size: int, tokens_per_step: int,
                 flops_per_step: Optional[float] = None, peak_flops: Optional[float] = None,
                 num_devices: int = 1):
        self.batch_size, self.tokens_per_step = batch_size, tokens_per_step
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self.num_devices = num_devices
        self._t, self._steps = None, 0

    def start(self):
        self._t, self._steps = time.perf_counter(), 0

    def tick(self, steps: int = 1):
        self._steps += steps

    def rates(self) -> Dict[str, float]:
        """Rates since the last call (or `start`); resets the window."""
        now = time.perf_counter()
        if self._t is None or self._steps == 0:
            self._t, self._steps = now, 0
            return {}
        dt = max(now - self._t, 1e-9)
        steps = self._steps
        out = {"steps_per_sec": steps / dt,
               "samples_per_sec": steps * self.batch_size / dt,
               "tokens_per_sec": steps * self.tokens_per_step / dt}
        if self.flops_per_step:
            achieved = steps * self.flops_per_step / dt  # model FLOP/s over all devices
            out["model_tflops_per_sec"] = achieved / 1e12
            if self.peak_flops:
                out["mfu"] = achieved / (self.peak_flops * self.num_devices)
        self._t, self._steps = now, 0
        return out


# Dense bf16 peak FLOP/s per device, for MFU when config.train.peak_flops is not set.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def guess_peak_flops(device_kind: str) -> Optional[float]:
    """Peak bf16 FLOP/s of a device kind string (jax `device.device_kind`), else None."""
    for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if device_kind.startswith(name) or name in device_kind:
            return flops
    return None


def weighted_mean(rows, weights: Mapping[str, str]) -> Dict[str, float]:
    """Combines per-batch metric dicts: metrics in `weights` are averaged weighted by the
    named count (e.g. ser_accuracy by num_ser_examples), counts summed, others plain means."""
    out: Dict[str, float] = {}
    if not rows:
        return out
    counts = {c for c in weights.values()}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        if k in counts:
            out[k] = float(sum(vals))
        elif k in weights and weights[k] in rows[0]:
            w = [r[weights[k]] for r in rows]
            out[k] = float(sum(v * x for v, x in zip(vals, w)) / max(sum(w), 1.0))
        else:
            out[k] = float(np.mean(vals))
    return out


# Which count weights which metric when eval batches are combined (losses.finalize_metrics).
EVAL_WEIGHTS = {"loss_ce": "num_tokens", "token_accuracy": "num_tokens",
                "loss_ser": "num_ser_examples", "ser_accuracy": "num_ser_examples",
                **{m: f"num_{c}_examples" for c in ("gender", "age")
                   for m in (f"loss_{c}", f"{c}_accuracy")}}
