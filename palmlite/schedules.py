"""Learning-rate schedules and optimizers of the papers, as optax objects.

- ``warmup_cosine`` (Gopher §C/Table 1): linear warm-up from 1e-7 to the peak over
  ``warmup_steps``, then cosine decay to 10% of the peak at the last step.
- ``rsqrt`` (PaLM §5): constant peak for ``warmup_steps`` (PaLM: 1e-2 for 10k steps), then
  peak · sqrt(warmup_steps / step), i.e. decaying as 1/sqrt(step).
- ``constant``.

Optimizers: ``adamw``; ``adafactor`` as PaLM used it (§5: no factorisation, which makes it
Adam with parameter scaling; β1 = 0.9, β2 = 1 − step^−0.8, update clipping at 1.0, weight
decay lr²); ``sgd`` (with momentum 0.9).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

GOPHER_WARMUP_INIT = 1e-7  # Gopher: "warmed up from 1e-7"
GOPHER_FINAL_FRACTION = 0.1  # Gopher: "cosine decay to 1/10 of the maximum"


def make_schedule(kind: str, peak_lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    if kind == "constant":
        return optax.constant_schedule(peak_lr)
    if kind == "warmup_cosine":
        warmup = min(warmup_steps, total_steps)
        return optax.warmup_cosine_decay_schedule(
            init_value=GOPHER_WARMUP_INIT, peak_value=peak_lr, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=GOPHER_FINAL_FRACTION * peak_lr)
    if kind == "rsqrt":
        hold = max(warmup_steps, 1)
        return lambda step: peak_lr * jnp.sqrt(hold / jnp.maximum(step, hold))
    raise ValueError(f"schedule={kind!r} is invalid: expected 'warmup_cosine', 'rsqrt' or 'constant'")


def make_optimizer(kind: str, schedule: optax.Schedule, *, weight_decay: float, grad_clip: float,
                   beta1: float, beta2: float) -> optax.GradientTransformation:
    """Global-norm clipping (PaLM, Gopher: 1.0), then the optimizer itself."""
    clip = optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity()
    if kind == "adamw":
        opt = optax.adamw(schedule, b1=beta1, b2=beta2, weight_decay=weight_decay)
    elif kind == "adafactor":
        # PaLM §5: each step decays weights by lr(step)²; here weight_decay · lr(step)²,
        # so weight_decay=1 is PaLM's recipe.
        opt = optax.adafactor(schedule, factored=False, decay_rate=0.8, clipping_threshold=1.0,
                              momentum=beta1, multiply_by_parameter_scale=True,
                              weight_decay_rate=lambda step: weight_decay * schedule(step) ** 2)
    elif kind == "sgd":
        opt = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=0.9))
    else:
        raise ValueError(f"optimizer={kind!r} is invalid: expected 'adamw', 'adafactor' or 'sgd'")
    return optax.chain(clip, opt)


def from_config(tc) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """The schedule and optimizer a ``TrainConfig`` asks for."""
    schedule = make_schedule(tc.schedule, tc.lr, tc.total_steps, tc.warmup_steps)
    return schedule, make_optimizer(tc.optimizer, schedule, weight_decay=tc.weight_decay,
                                    grad_clip=tc.grad_clip, beta1=tc.beta1, beta2=tc.beta2)


def frozen_except(tx: optax.GradientTransformation, trainable) -> optax.GradientTransformation:
    """``tx`` on the parameters whose state path ``trainable(path)`` accepts; zero updates
    (and no optimizer state) for the rest, which therefore never change: RETRO-fitting's
    frozen base (RETRO §4.2). Clipping's global norm is over the trainable ones only."""
    def labels(params):
        def label(path, _):
            keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
            return "train" if trainable(keys) else "frozen"
        return jax.tree_util.tree_map_with_path(label, params)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
