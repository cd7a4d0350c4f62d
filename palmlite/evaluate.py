"""Validation loss, perplexity and bits per byte over consecutive windows of a dataset.

RETRO's leakage (Borgeaud et al. 2021, §2.6): ``chunk_overlap`` is r(C), the longest token
substring a chunk shares with any of its neighbours, as a fraction of the chunk. Losses
reported over chunks with r(C) <= alpha (``leakage_curve``) separate retrieval from copying.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from palmlite.losses import cross_entropy_and_z_loss


@nnx.jit
def _summed_loss(model, batch):
    tokens_BxT1, inputs = (batch["tokens"], {k: v for k, v in batch.items() if k != "tokens"}) \
        if isinstance(batch, dict) else (batch, {})
    logits_BxTxV = model(tokens_BxT1[:, :-1], **inputs)
    ce, _ = cross_entropy_and_z_loss(logits_BxTxV, tokens_BxT1[:, 1:])
    return ce * tokens_BxT1[:, 1:].size


def evaluate(model, dataset, seq_len: int, batch_size: int = 8,
             max_batches: int | None = None, put=None, windows=None) -> dict[str, float]:
    """Mean next-token loss over ``dataset``'s first windows, in nats, perplexity and bits/byte.

    Bits per byte (loss / ln 2 / bytes-per-token) compares runs across tokenizers. ``put``
    moves each [batch_size, seq_len + 1] numpy batch to the devices (training on a mesh
    passes its sharded placement, which several hosts need). ``windows``: the windows to
    use instead of ``dataset.windows``, e.g. RETRO's dict of tokens and their neighbours
    (``palmlite.retro_data``).
    """
    put = put or (lambda batch: jax.tree.map(jnp.asarray, batch))
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


def evaluate_domains(model, dataset, seq_len: int, batch_size: int = 8,
                     max_batches: int | None = None, put=None) -> dict:
    """A mixture's validation (``palmlite.mixture.MixtureDataset``): each domain's loss and
    bits per byte, and the mixture's as the weighted sums Σ w_d L_d and
    Σ w_d L_d / ln 2 / Σ w_d bytes-per-token_d.

    The batches mix the domains as training did (``mixture.mixed_windows``), each row told
    its domain, and each row's loss counts for its own domain: a domain-routed mixture of
    experts is then measured under the expert loads it was trained with."""
    from palmlite.mixture import mixed_windows
    put = put or (lambda batch: jax.tree.map(jnp.asarray, batch))
    windows = mixed_windows(dataset, seq_len, None if max_batches is None else
                            max_batches * batch_size)
    n_full = len(windows["domains"]) // batch_size * batch_size
    rows = lambda i: jax.tree.map(lambda x: x[i:i + batch_size], windows)
    row_loss = lambda b: jnp.mean(_token_losses(model, b["tokens"], domains=b["domains"]), -1)
    loss_N = np.concatenate([np.asarray(row_loss(put(rows(i))))
                             for i in range(0, n_full, batch_size)] or [np.zeros(0)])
    domains_N = windows["domains"][:n_full]
    by_domain = {}
    for d, (name, part) in enumerate(zip(dataset.names, dataset.domains)):
        if not (domains_N == d).any():
            raise ValueError(f"the validation split of domain {name!r} has no window of "
                             f"seq_len={seq_len} in the first {n_full} mixed rows: raise "
                             f"max_batches or the domain's share of the validation split")
        by_domain[name] = float(loss_N[domains_N == d].mean())
    loss = dataset.weighted(by_domain)
    return dict(val_loss=loss, val_bits_per_byte=dataset.bits_per_byte(loss),
                val_loss_by_domain=by_domain,
                val_bits_per_byte_by_domain={n: p.bits_per_byte(by_domain[n]) for n, p in
                                             zip(dataset.names, dataset.domains)})


# ---- leakage (RETRO §2.6) -----------------------------------------------------------------
def _longest_common_runs(a_QxM: np.ndarray, b_QxJxR: np.ndarray) -> np.ndarray:
    """int [Q, J]: the longest run of consecutive tokens a[q] shares with each b[q, j].
    Dynamic programming over a's positions, vectorised over queries, neighbours and b's
    positions: run[j, r] = run_prev[j, r - 1] + 1 where a[i] == b[j, r], else 0."""
    Q, M = a_QxM.shape
    J, R = b_QxJxR.shape[1:]
    best = np.zeros((Q, J), np.int64)
    run = np.zeros((Q, J, R + 1), np.int32)  # column 0: the empty prefix
    for i in range(M):
        same = a_QxM[:, i, None, None] == b_QxJxR
        run[..., 1:] = np.where(same, run[..., :-1] + 1, 0)
        np.maximum(best, run.max(-1), out=best)
    return best


def longest_common_substring(a_tokens, b_tokens) -> int:
    """The length of the longest run of consecutive tokens shared by two token sequences."""
    a, b = np.asarray(a_tokens), np.asarray(b_tokens)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"a_tokens and b_tokens must be 1-d token sequences, got shapes "
                         f"{a.shape} and {b.shape}")
    if not a.size or not b.size:
        return 0
    return int(_longest_common_runs(a[None], b[None, None])[0, 0])


def chunk_overlap(chunks_QxM, neighbour_values_QxJxR) -> np.ndarray:
    """float [Q]: RETRO's r(C) (§2.6), the longest token substring each chunk shares with any
    of its neighbours, divided by the chunk size M. r(C) <= 0.125 at M = 64: fewer than 8
    consecutive tokens in common."""
    chunks, values = np.asarray(chunks_QxM), np.asarray(neighbour_values_QxJxR)
    if chunks.ndim != 2 or values.ndim != 3 or values.shape[0] != chunks.shape[0]:
        raise ValueError(f"chunks_QxM must be [Q, M] and neighbour_values_QxJxR [Q, J, R] with "
                         f"one Q, got {chunks.shape} and {values.shape}")
    if not chunks.size or not values.shape[1] or not values.shape[2]:
        return np.zeros(chunks.shape[0])
    step = max(1, 2**24 // max(1, values[0].size))  # queries per block: bounded memory
    runs = np.concatenate([_longest_common_runs(chunks[i:i + step], values[i:i + step])
                           for i in range(0, len(chunks), step)])
    return runs.max(1) / chunks.shape[1]


# ---- RETRO §2.6: how much of retrieval's gain is copying ----------------------------------
@nnx.jit
def _token_losses(model, tokens_BxT1, **inputs):
    """Each next-token loss [B, T], in nats; ``inputs``: the model's other inputs
    (RETRO's ``neighbours``, a mixture's ``domains``)."""
    logits_BxTxV = model(tokens_BxT1[:, :-1], **inputs).astype(jnp.float32)
    target_BxT = jnp.take_along_axis(logits_BxTxV, tokens_BxT1[:, 1:, None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_BxTxV, axis=-1) - target_BxT


def chunk_losses(model, windows, chunk_size: int, batch_size: int = 8,
                 retrieval: bool = True) -> np.ndarray:
    """Mean loss (nats per token) of every window's chunks u = 1 .. C-1, [N, C-1].

    Chunk u's tokens are the targets of positions u·M - 1 .. u·M + M - 2, exactly the
    positions that read chunk u-1's neighbours (RETRO §2.4), so a chunk's loss pairs with
    the overlap between it and those neighbours (``chunk_overlap``). Chunk 0 has
    no neighbours before it and is left out. ``windows``: a dict of ``tokens`` [N, T+1] and
    ``neighbours`` (``retro_data.neighbour_windows``), or tokens alone for a model without
    retrieval; ``retrieval=False`` evaluates a RETRO model with retrieval off.
    """
    tokens = windows["tokens"] if isinstance(windows, dict) else windows
    N, T, M = tokens.shape[0], tokens.shape[1] - 1, chunk_size
    if T % M:
        raise ValueError(f"windows of {T} tokens are not whole chunks of chunk_size={M}")
    out = []
    for i in range(0, N, batch_size):
        nbr = windows["neighbours"][i:i + batch_size] if retrieval and \
            isinstance(windows, dict) else None
        losses_BxT = np.asarray(_token_losses(model, jnp.asarray(tokens[i:i + batch_size]),
                                              neighbours=None if nbr is None else jnp.asarray(nbr)))
        # positions M-1 .. T-2 in rows of M: row u-1 holds chunk u's targets
        out.append(losses_BxT[:, M - 1:T - 1].reshape(len(losses_BxT), T // M - 1, M).mean(-1))
    return np.concatenate(out)


def target_overlap(windows: dict, chunk_size: int) -> np.ndarray:
    """r(C) of every window's chunks u = 1 .. C-1, [N, C-1], paired with ``chunk_losses``:
    the longest token run chunk u shares with any neighbour of chunk u-1 (the neighbours its
    tokens are predicted with), over the chunk size (RETRO §2.6; ``chunk_overlap``)."""
    tokens, nbr_NxCxJxR, M = windows["tokens"], windows["neighbours"], chunk_size
    N, C = nbr_NxCxJxR.shape[:2]
    chunks_NxCxM = tokens[:, :C * M].reshape(N, C, M)
    overlap = chunk_overlap(chunks_NxCxM[:, 1:].reshape(-1, M),
                            nbr_NxCxJxR[:, :-1].reshape(N * (C - 1), *nbr_NxCxJxR.shape[2:]))
    return overlap.reshape(N, C - 1)


def leakage_curve(losses: dict[str, np.ndarray], overlap: np.ndarray,
                  alphas=(0.0, 0.125, 0.25, 0.5, 0.75, 1.0)) -> list[dict]:
    """RETRO §2.6: for each threshold α, each model's mean chunk loss over the chunks whose
    overlap with their neighbours r(C) is at most α (``losses``: name -> [N, C-1], as
    ``chunk_losses``; ``overlap`` likewise). At α = 1 every chunk counts; small α keeps only
    chunks that retrieval could not have copied. Rows: alpha, chunks, fraction, and the
    loss of each model; an α that keeps no chunk has no row."""
    rows = []
    for alpha in alphas:
        kept = overlap <= alpha + 1e-9
        if kept.any():  # a threshold that keeps no chunk has no loss: no row
            rows.append(dict(alpha=float(alpha), chunks=int(kept.sum()),
                             fraction=float(kept.mean()),
                             **{name: float(x[kept].mean()) for name, x in losses.items()}))
    return rows
