"""RETRO's model side (Borgeaud et al. 2021): the neighbour encoder and chunked cross-attention.

A RETRO decoder is a palmlite decoder whose sequence is cut into chunks of M tokens. Each
chunk u comes with J neighbours retrieved from a database (``palmlite.retrieval``), each R
tokens long: a database chunk and, by default, its continuation (R = 2M). Two modules
read them:

- ``RetroEncoder`` (§2.3): a small bidirectional Transformer over each neighbour, shared
  by all neighbours and chunks, that also attends to the decoder's activations of the
  chunk that retrieved it (taken at the input of the first CCA layer: "query conditioning").
- ``ChunkedCrossAttention`` (§2.4) in a few decoder layers: the tokens from the last one of
  chunk u to the last but one of chunk u+1 attend to chunk u's encoded neighbours. Chunk
  u's neighbours were retrieved with chunk u's tokens, which the last token of chunk u has
  all seen: causality holds, and the first M - 1 tokens read nothing.

Positions inside both cross-attentions are relative, as in the paper, here by RoPE: a
query's and a key's rotation depend on their places in the chunk frame (the neighbour's
token j sits at j, the query at its distance from chunk u's start), so q·k sees offsets.

With neighbours ``None`` the CCA branches are skipped and the decoder is exactly the base
model: RETRO-fitting (§4.2) relies on that. Decoding keeps a ``RetroCache`` beside the
KV cache (the activations that condition the encoder, and the encoded neighbours of every
chunk retrieved so far); ``palmlite.generate.retro_generate_tokens`` retrieves every M tokens.

Shapes: B batch, T length, D decoder width, W encoder width, C chunks, M chunk size,
J neighbours per chunk, R neighbour length, S slots, N query heads, K key/value heads,
H head size; G = B·C·J neighbour rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from palmlite.attention import apply_rope
from palmlite.config import ModelConfig
from palmlite.layers import Dense, Norm, check_ids, normal_param
from palmlite.mlp import MLP
from palmlite.sharding import constrain


def encoder_config(cfg: ModelConfig) -> ModelConfig:
    """The encoder's own sizes as a ModelConfig: width W, FFN width, its layer count (for
    the residual init scale) and the decoder's heads, head size, norm and activation."""
    retro = cfg.retro
    W = retro.encoder_d_model or cfg.d_model
    d_ff = retro.encoder_d_ff or max(1, round(cfg.d_ff * W / cfg.d_model))
    return cfg.replace(d_model=W, d_ff=d_ff, n_layers=retro.encoder_layers, head_dim=cfg.head_size,
                       block="serial", moe=None, retro=None)


class CrossAttention(nnx.Module):
    """Queries from x (width cfg.d_model), keys and values from a context of width
    ``kv_width``; no causal mask (the callers choose what is visible by what they pass)."""

    def __init__(self, cfg: ModelConfig, kv_width: int, *, rngs: nnx.Rngs, out_scale: float):
        self.theta = cfg.rope_theta
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        self.q = Dense(cfg, (D,), (N, H), ("embed",), ("heads", "head_dim"), rngs=rngs)
        self.k = Dense(cfg, (kv_width,), (K, H), ("embed",), ("kv_heads", "head_dim"), rngs=rngs)
        self.v = Dense(cfg, (kv_width,), (K, H), ("embed",), ("kv_heads", "head_dim"), rngs=rngs)
        self.o = Dense(cfg, (N, H), (D,), ("heads", "head_dim"), ("embed",), rngs=rngs,
                       scale=out_scale)

    def __call__(self, x_BxQxD: jax.Array, ctx_BxSxW: jax.Array, q_pos: jax.Array,
                 k_pos_S: jax.Array) -> jax.Array:
        """``q_pos`` broadcasts to B x Q: the positions RoPE gives the queries (a 1-D one
        is shared by all rows, and so are its rotation angles)."""
        rows = lambda pos: pos.reshape(1, -1) if jnp.ndim(pos) == 1 else pos
        q_BxQxNxH = apply_rope(self.q(x_BxQxD), rows(q_pos), self.theta)
        k_BxSxKxH = apply_rope(self.k(ctx_BxSxW), rows(k_pos_S), self.theta)
        return self.o(attend(q_BxQxNxH, k_BxSxKxH, self.v(ctx_BxSxW)))


def attend(q_BxQxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array) -> jax.Array:
    """Softmax attention of every query over every key (logits and softmax in float32), the
    K shared key/value heads repeated to N first. Plain einsums: on the CPU 3x faster than
    ``jax.nn.dot_product_attention``'s grouped path at RETRO's shapes (forward + backward,
    128 neighbours x 64 tokens x 4 heads; benchmarks/NOTES.md)."""
    N, K = q_BxQxNxH.shape[2], k_BxSxKxH.shape[2]
    k_BxSxNxH = jnp.repeat(k_BxSxKxH, N // K, axis=2) if N != K else k_BxSxKxH
    v_BxSxNxH = jnp.repeat(v_BxSxKxH, N // K, axis=2) if N != K else v_BxSxKxH
    q_BxQxNxH = q_BxQxNxH * (1.0 / math.sqrt(q_BxQxNxH.shape[-1]))
    logits_BxNxQxS = jnp.einsum("bqnh,bsnh->bnqs", q_BxQxNxH, k_BxSxNxH,
                                preferred_element_type=jnp.float32)
    probs_BxNxQxS = jax.nn.softmax(logits_BxNxQxS, axis=-1).astype(v_BxSxNxH.dtype)
    return jnp.einsum("bnqs,bsnh->bqnh", probs_BxNxQxS, v_BxSxNxH)


class EncoderLayer(nnx.Module):
    """RETRO §2.3: self-attention over the neighbour (bidirectional), cross-attention to the
    retrieving chunk's decoder activations, then the FFN; each a pre-norm residual branch."""

    def __init__(self, ecfg: ModelConfig, decoder_width: int, conditioned: bool, *,
                 rngs: nnx.Rngs):
        scale = 1.0 / math.sqrt(2 * ecfg.n_layers)  # GPT-2 §2.3, over the encoder's depth
        self.self_norm = Norm(ecfg)
        self.self_attn = CrossAttention(ecfg, ecfg.d_model, rngs=rngs, out_scale=scale)
        self.cross_norm = Norm(ecfg) if conditioned else None
        self.cross_attn = CrossAttention(ecfg, decoder_width, rngs=rngs,
                                         out_scale=scale) if conditioned else None
        self.mlp_norm = Norm(ecfg)
        self.mlp = MLP(ecfg, rngs=rngs)

    def __call__(self, e_GxRxW: jax.Array, h_BCxMxD: jax.Array) -> jax.Array:
        (G, R, W), (BC, M) = e_GxRxW.shape, h_BCxMxD.shape[:2]
        x_GxRxW = self.self_norm(e_GxRxW)
        e_GxRxW = e_GxRxW + self.self_attn(x_GxRxW, x_GxRxW, jnp.arange(R), jnp.arange(R))
        if self.cross_attn is not None:
            # The J neighbours of a chunk all read that chunk's activations and nothing masks
            # them, so their J·R tokens are one chunk's queries: the chunk's keys and values
            # are projected once, not J times. The neighbour's token j and the chunk's token
            # i sit at j and i of one chunk frame.
            J = G // BC
            x_BCxJRxW = self.cross_norm(e_GxRxW).reshape(BC, J * R, W)
            out_BCxJRxW = self.cross_attn(x_BCxJRxW, h_BCxMxD, jnp.tile(jnp.arange(R), J),
                                          jnp.arange(M))
            e_GxRxW = e_GxRxW + out_BCxJRxW.reshape(G, R, W)
        return e_GxRxW + self.mlp(self.mlp_norm(e_GxRxW))


class RetroEncoder(nnx.Module):
    """Neighbour tokens B x C x J x R (+ the decoder's chunk activations B x C x M x D) ->
    encoded neighbours B x C x (J·R) x W, the keys and values of chunked cross-attention."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        ecfg, retro = encoder_config(cfg), cfg.retro
        self.shared = retro.shared_embeddings  # else its own table (RETRO's default, Table 13)
        self.embed_VxW = None if self.shared else normal_param(
            rngs, ecfg, (cfg.vocab_size, ecfg.d_model), ("vocab", "embed"), cfg.embed_init_std)
        self.layers = nnx.List([EncoderLayer(ecfg, cfg.d_model, retro.query_conditioning,
                                             rngs=rngs) for _ in range(retro.encoder_layers)])
        self.final_norm = Norm(ecfg)
        self.vocab_size, self.dtype = cfg.vocab_size, jnp.dtype(cfg.dtype)
        self.chunk_size, self.n_neighbours = retro.chunk_size, retro.n_neighbours
        self.neighbour_len = retro.neighbour_len

    def __call__(self, nbr_BxCxJxR: jax.Array, h_BxCxMxD: jax.Array,
                 decoder_embed_VxD: nnx.Param) -> jax.Array:
        (B, C, J, R), M = nbr_BxCxJxR.shape, h_BxCxMxD.shape[2]
        check_ids("neighbour token id", nbr_BxCxJxR, self.vocab_size)
        table_VxW = decoder_embed_VxD if self.shared else self.embed_VxW
        table_VxW = constrain(table_VxW[...], ("vocab", None))  # gathered, as Transformer.embed
        e_GxRxW = table_VxW[nbr_BxCxJxR.reshape(B * C * J, R)].astype(self.dtype)
        h_BCxMxD = h_BxCxMxD.reshape(B * C, M, -1)  # what chunk u's neighbours attend to
        for layer in self.layers:
            e_GxRxW = layer(e_GxRxW, h_BCxMxD)
        return self.final_norm(e_GxRxW).reshape(B, C, J * R, -1)


class Retrieved(NamedTuple):
    """What the CCA layers read: every chunk's encoded neighbours B x C x (J·R) x W, and
    for a decoding call the positions of its tokens (None: a whole sequence, T = C·M)."""

    enc_BxCxSxW: jax.Array
    pos_BxT: jax.Array | None = None


class ChunkedCrossAttention(nnx.Module):
    """RETRO §2.4: token t reads the neighbours of chunk u = (t + 1) // M - 1, none if u < 0."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        retro = cfg.retro
        self.M, self.J, self.R = retro.chunk_size, retro.n_neighbours, retro.neighbour_len
        self.norm = Norm(cfg)
        self.attn = CrossAttention(cfg, encoder_config(cfg).d_model, rngs=rngs,
                                   out_scale=1.0 / math.sqrt(2 * cfg.n_layers))

    def key_positions(self) -> jax.Array:
        return jnp.tile(jnp.arange(self.R), self.J)  # each neighbour's tokens at 0 .. R-1

    def __call__(self, x_BxTxD: jax.Array, retrieved: Retrieved) -> jax.Array:
        h_BxTxD = self.norm(x_BxTxD)
        if retrieved.pos_BxT is not None:
            return self.decode(h_BxTxD, retrieved)
        (B, T, D), M = h_BxTxD.shape, self.M
        C, S, W = retrieved.enc_BxCxSxW.shape[1:]
        # Shift left by M - 1: row u·M + i of the shifted sequence is token u·M + M - 1 + i,
        # so chunk u's M queries are the last token of chunk u and the first M - 1 of u + 1.
        shifted_BxTxD = jnp.pad(h_BxTxD[:, M - 1:], ((0, 0), (0, M - 1), (0, 0)))
        out_BCxMxD = self.attn(shifted_BxTxD.reshape(B * C, M, D),
                               retrieved.enc_BxCxSxW.reshape(B * C, S, W),
                               M - 1 + jnp.arange(M), self.key_positions())
        # Shift back: the first M - 1 tokens read nothing (zero), the window's padding is cut.
        return jnp.pad(out_BCxMxD.reshape(B, T, D)[:, :T - M + 1], ((0, 0), (M - 1, 0), (0, 0)))

    def decode(self, h_BxTxD: jax.Array, retrieved: Retrieved) -> jax.Array:
        """Each query gathers its own chunk's neighbours (the same function, one token at a
        time: what a decoding step needs)."""
        B, T, D = h_BxTxD.shape
        pos_BxT = retrieved.pos_BxT
        u_BxT = (pos_BxT + 1) // self.M - 1
        enc_BxTxSxW = jnp.take_along_axis(retrieved.enc_BxCxSxW,
                                          jnp.maximum(u_BxT, 0)[:, :, None, None], axis=1)
        out_BTx1xD = self.attn(h_BxTxD.reshape(B * T, 1, D),
                               enc_BxTxSxW.reshape(B * T, *enc_BxTxSxW.shape[2:]),
                               (pos_BxT - u_BxT * self.M).reshape(B * T, 1), self.key_positions())
        return jnp.where((u_BxT >= 0)[..., None], out_BTx1xD.reshape(B, T, D), 0)


# ---- decoding: the cache beside the KV cache ------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RetroCache:
    """The decoder activations that condition the encoder (at the first CCA layer's input,
    one per slot) and the encoded neighbours of every chunk retrieved so far."""

    h_BxSxD: jax.Array
    enc_BxCxSxW: jax.Array


def init_retro_cache(cfg: ModelConfig, batch: int, max_len: int) -> RetroCache:
    """Room for ``max_len`` tokens and their max_len // M chunks (dtype: cfg.dtype)."""
    retro, dtype = cfg.retro, jnp.dtype(cfg.dtype)
    W, C = encoder_config(cfg).d_model, max(1, max_len // retro.chunk_size)
    return RetroCache(jnp.zeros((batch, max_len, cfg.d_model), dtype),
                      jnp.zeros((batch, C, retro.n_neighbours * retro.neighbour_len, W), dtype))


class NewNeighbours(NamedTuple):
    """A decoding call's retrievals: the neighbours of chunks first_chunk .. first_chunk + c - 1,
    chunks that are complete once this call's tokens are in (their last token is in it or
    before it)."""

    first_chunk: Any  # int or int32 scalar
    nbr_BxcxJxR: jax.Array


def condition(encoder: RetroEncoder, embed_VxD, x_BxTxD: jax.Array, neighbours,
              pos_BxT: jax.Array, start, rcache: RetroCache | None):
    """(Retrieved, new RetroCache) at the first CCA layer. Training: ``neighbours`` is
    B x C x J x R for the C = T / M chunks of x. Decoding: x's activations join the cache at
    slot ``start`` and ``neighbours`` (a ``NewNeighbours`` or None) are encoded into it."""
    M = encoder.chunk_size
    if rcache is None:
        (B, T, D), expected = x_BxTxD.shape, (x_BxTxD.shape[0], x_BxTxD.shape[1] // M,
                                               encoder.n_neighbours, encoder.neighbour_len)
        if T % M or tuple(neighbours.shape) != expected:
            raise ValueError(f"a RETRO sequence of {T} tokens needs a multiple of chunk_size={M} "
                             f"tokens and neighbours of shape {expected} (B, C, J, R), got "
                             f"{tuple(neighbours.shape)}")
        return Retrieved(encoder(neighbours, x_BxTxD.reshape(B, T // M, M, D), embed_VxD)), None
    h_BxSxD = jax.lax.dynamic_update_slice(rcache.h_BxSxD, x_BxTxD.astype(rcache.h_BxSxD.dtype),
                                           (0, start, 0))
    enc_BxCxSxW = rcache.enc_BxCxSxW
    if neighbours is not None:
        u0, nbr_BxcxJxR = neighbours
        (B, c), D = nbr_BxcxJxR.shape[:2], h_BxSxD.shape[-1]
        h_BxcMxD = jax.lax.dynamic_slice(h_BxSxD, (0, u0 * M, 0), (B, c * M, D))
        enc_BxcxSxW = encoder(nbr_BxcxJxR, h_BxcMxD.reshape(B, c, M, D), embed_VxD)
        enc_BxCxSxW = jax.lax.dynamic_update_slice(
            enc_BxCxSxW, enc_BxcxSxW.astype(enc_BxCxSxW.dtype), (0, u0, 0, 0))
    return Retrieved(enc_BxCxSxW, pos_BxT), RetroCache(h_BxSxD, enc_BxCxSxW)


# ---- RETRO-fitting (§4.2) ----------------------------------------------------------------
def retrofit(base, retro_cfg, seed: int = 0):
    """A RETRO model around a trained ``base`` Transformer: its decoder's parameters copied,
    a fresh encoder and CCA layers, and CCA's output projections at zero, so the model
    starts exactly at the base one with retrieval on or off. Training then updates only
    what ``retro_trainable`` marks (the base stays frozen, as in RETRO §4.2)."""
    from palmlite.model import Transformer  # the model imports this module
    model = Transformer(base.cfg.replace(retro=retro_cfg), rngs=nnx.Rngs(seed))
    nnx.update(model, nnx.state(base, nnx.Param))
    zero_cca_outputs(model)
    return model


def zero_cca_outputs(model) -> None:
    """Set each CCA layer's output projection (and bias) to zero: the CCA branch adds nothing
    until training moves it."""
    for block in model.blocks:
        if block.cca is not None:
            for p in (block.cca.attn.o.kernel, block.cca.attn.o.bias):
                if p is not None:
                    p[...] = jnp.zeros_like(p[...])


def retro_trainable(path: tuple) -> bool:
    """Whether a parameter (by its state path) is RETRO's own: the encoder or a CCA layer."""
    return path[0] == "encoder" or "cca" in path
