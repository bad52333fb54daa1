"""Conditional flow matching sampler (IndexTTS2's CFM inference): noise -> mel.

Fixed-step Euler from t = 0 to 1 with the DiT as velocity field. The prompt mel fills the
first `prompt_frames` frames of the prompt input and those frames of x are held at zero.
Classifier-free guidance evaluates the conditional and the null inputs (prompt, style and
condition zeroed) as one doubled batch: v = (1 + r) v_cond - r v_null.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from freezeempath_jax.models.dit import DiT


def euler_times(steps: int):
    """(t before each step, step size), both float32 [steps], reproducing the reference's
    float32 `torch.linspace(0, 1, steps + 1)` and its running `t = t + dt`."""
    n = steps + 1
    step = np.float32(1.0) / np.float32(steps)
    span = np.array([np.float32(i) * step if i < n // 2 else
                     np.float32(1.0) - np.float32(steps - i) * step for i in range(n)],
                    np.float32)
    dts = (span[1:] - span[:-1]).astype(np.float32)
    ts = np.zeros(steps, np.float32)
    t = np.float32(span[0])
    for i in range(steps):
        ts[i] = t
        t = np.float32(t + dts[i])
    return ts, dts


def sample(dit: DiT, params, noise, prompt_mel, mu, lens, style, *, steps: int,
           cfg_rate: float):
    """Runs the sampler. noise [B, T, C]; prompt_mel [B, P, C] (P static); mu [B, T, D]
    (the prompt's condition already in front); lens [B] valid frames; style [B, S].
    Returns the mel [B, T, C] including the (zeroed) prompt frames."""
    b, n, c = noise.shape
    p = prompt_mel.shape[1]
    in_prompt = (jnp.arange(n) < p)[None, :, None]
    prompt_x = jnp.pad(prompt_mel.astype(noise.dtype), ((0, 0), (0, n - p), (0, 0)))
    x = jnp.where(in_prompt, 0.0, noise)
    ts, dts = euler_times(steps)
    if cfg_rate > 0:
        # conditional rows then null rows, one estimator call per step
        prompt2 = jnp.concatenate([prompt_x, jnp.zeros_like(prompt_x)])
        style2 = jnp.concatenate([style, jnp.zeros_like(style)])
        mu2 = jnp.concatenate([mu, jnp.zeros_like(mu)])
        lens2 = jnp.concatenate([lens, lens])

    def step(x, tdt):
        t, dt = tdt
        if cfg_rate > 0:
            v = dit.apply({"params": params}, jnp.concatenate([x, x]), prompt2, lens2,
                          jnp.full((2 * b,), t), style2, mu2)
            v = (1.0 + cfg_rate) * v[:b] - cfg_rate * v[b:]
        else:
            v = dit.apply({"params": params}, x, prompt_x, lens, jnp.full((b,), t), style, mu)
        x = x + dt * v
        return jnp.where(in_prompt, 0.0, x), None

    x, _ = jax.lax.scan(step, x, (jnp.asarray(ts), jnp.asarray(dts)))
    return x
