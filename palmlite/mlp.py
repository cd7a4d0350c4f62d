"""The feed-forward block: SwiGLU / GEGLU (gated, three matrices) or GELU / ReLU (two)."""

from __future__ import annotations

import math

import jax
from flax import nnx

from palmlite.config import ModelConfig
from palmlite.layers import Dense

# The nonlinearity; for gated variants it is applied to the gate branch only.
ACTIVATION_FNS = {
    "swiglu": jax.nn.silu,  # Swish(xW) * xV (Shazeer 2020; PaLM §2)
    "geglu": lambda x: jax.nn.gelu(x, approximate=True),  # GELU(xW) * xV (Shazeer 2020)
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2's tanh approximation
    "relu": jax.nn.relu,  # the original Transformer
}


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.d_ff
        self.act = ACTIVATION_FNS[cfg.activation]
        self.up = Dense(cfg, (D,), (F,), ("embed",), ("mlp",), rngs=rngs)
        self.gate = Dense(cfg, (D,), (F,), ("embed",), ("mlp",), rngs=rngs) if cfg.gated else None
        self.down = Dense(cfg, (F,), (D,), ("mlp",), ("embed",), rngs=rngs,
                          scale=1.0 / math.sqrt(2 * cfg.n_layers))  # GPT-2 §2.3

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        if self.gate is not None:
            h_BxTxF = self.act(self.gate(x_BxTxD)) * self.up(x_BxTxD)
        else:
            h_BxTxF = self.act(self.up(x_BxTxD))
        return self.down(h_BxTxF)
