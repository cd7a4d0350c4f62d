"""Next-token cross-entropy and PaLM's z-loss, returned separately."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from palmlite.layers import check_ids


def cross_entropy_and_z_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                             mask_BxT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and mean log²Z over the (masked) tokens.

    PaLM §5 adds ``1e-4 * log²Z`` to the loss, pulling the softmax normaliser Z towards 1
    for stability; the coefficient is the caller's choice (``loss = ce + coef * z``).
    Targets lie in [0, V): checked in an eager call; under jit one out of range makes the
    loss NaN.
    """
    check_ids("target id", targets_BxT, logits_BxTxV.shape[-1])
    logits = logits_BxTxV.astype(jnp.float32)
    log_z_BxT = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BxT = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    ce_BxT = log_z_BxT - target_logit_BxT
    if mask_BxT is None:
        mask_BxT = jnp.ones_like(ce_BxT)
    mask_BxT = mask_BxT.astype(jnp.float32)
    denom = jnp.maximum(mask_BxT.sum(), 1.0)
    return (ce_BxT * mask_BxT).sum() / denom, (log_z_BxT**2 * mask_BxT).sum() / denom
