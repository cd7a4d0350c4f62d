"""Validation loss, perplexity and bits per byte over consecutive windows of a dataset."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from palmlite.losses import cross_entropy_and_z_loss


@nnx.jit
def _summed_loss(model, batch):
    tokens_BxT1, neighbours = (batch["tokens"], batch["neighbours"]) if isinstance(batch, dict) \
        else (batch, None)
    logits_BxTxV = model(tokens_BxT1[:, :-1], neighbours=neighbours)
    ce, _ = cross_entropy_and_z_loss(logits_BxTxV, tokens_BxT1[:, 1:])
    return ce * tokens_BxT1[:, 1:].size


def evaluate(model, dataset, seq_len: int, batch_size: int = 8,
             max_batches: int | None = None, put=jnp.asarray, windows=None) -> dict[str, float]:
    """Mean next-token loss over ``dataset``'s first windows, in nats, perplexity and bits/byte.

    Bits per byte (loss / ln 2 / bytes-per-token) compares runs across tokenizers. ``put``
    moves each [batch_size, seq_len + 1] numpy batch to the devices (training on a mesh
    passes its sharded placement, which several hosts need). ``windows``: the windows to
    use instead of ``dataset.windows``, e.g. RETRO's dict of tokens and their neighbours
    (``palmlite.retrieval``).
    """
    n_max = None if max_batches is None else max_batches * batch_size
    if windows is None:
        windows = dataset.windows(seq_len, n_max)
    tokens = windows["tokens"] if isinstance(windows, dict) else windows
    n_full = min(len(tokens), n_max or len(tokens)) // batch_size * batch_size
    if n_full == 0:
        raise ValueError(f"the {dataset.split} split ({len(dataset):,} tokens) has fewer than "
                         f"batch_size={batch_size} windows of seq_len={seq_len}")
    rows = lambda i: jax.tree.map(lambda x: x[i:i + batch_size], windows)
    total = sum(float(_summed_loss(model, put(rows(i)))) for i in range(0, n_full, batch_size))
    loss = total / (n_full * seq_len)
    return dict(loss=loss, perplexity=math.exp(min(loss, 700.0)),
                bits_per_byte=dataset.bits_per_byte(loss), tokens=n_full * seq_len)
