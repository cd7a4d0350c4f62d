"""Validation loss, perplexity and bits per byte over consecutive windows of a dataset."""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from palmlite.losses import cross_entropy_and_z_loss


@nnx.jit
def _summed_loss(model, batch_BxT1):
    ce, _ = cross_entropy_and_z_loss(model(batch_BxT1[:, :-1]), batch_BxT1[:, 1:])
    return ce * batch_BxT1[:, 1:].size


def evaluate(model, dataset, seq_len: int, batch_size: int = 8,
             max_batches: int | None = None, put=jnp.asarray) -> dict[str, float]:
    """Mean next-token loss over ``dataset``'s first windows, in nats, perplexity and bits/byte.

    Bits per byte (loss / ln 2 / bytes-per-token) compares runs across tokenizers. ``put``
    moves each [batch_size, seq_len + 1] numpy batch to the devices (training on a mesh
    passes its sharded placement, which several hosts need).
    """
    windows = dataset.windows(seq_len, None if max_batches is None else max_batches * batch_size)
    n_full = len(windows) // batch_size * batch_size
    if n_full == 0:
        raise ValueError(f"the {dataset.split} split ({len(dataset):,} tokens) has fewer than "
                         f"batch_size={batch_size} windows of seq_len={seq_len}")
    total = sum(float(_summed_loss(model, put(windows[i:i + batch_size])))
                for i in range(0, n_full, batch_size))
    loss = total / (n_full * seq_len)
    return dict(loss=loss, perplexity=math.exp(min(loss, 700.0)),
                bits_per_byte=dataset.bits_per_byte(loss), tokens=n_full * seq_len)
