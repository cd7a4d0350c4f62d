"""Causal self-attention with n_kv_heads (MHA / GQA / MQA) and every position scheme.

Shapes are named in variable suffixes: B batch, T query length, S key length,
D d_model, N query heads, K key/value heads, H head size.

Position schemes act in three different places, which is the point to learn:
- "learned" / "sinusoidal" are added to the token embeddings (see model.py);
- "rope" rotates queries and keys, so q·k depends on the offset only (PaLM §2);
- "relative" / "alibi" add a per-head bias to the attention logits (Gopher, GLaM; Press et al.).

Decoding keeps a ``KVCache``: each layer's keys and values of the tokens seen so far, so a
new token costs one query against S cached keys instead of recomputing all T² products.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from palmlite.config import ModelConfig
from palmlite.layers import Dense, normal_param


# ---- RoPE (Su et al. 2021; PaLM §2) -----------------------------------------------------
def apply_rope(x_BxTxNxH: jax.Array, pos_BxT: jax.Array, theta: float) -> jax.Array:
    """Rotate each (first-half, second-half) pair of features by angle pos / theta^(2i/H)."""
    half = x_BxTxNxH.shape[-1] // 2
    freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxTx1xF = (pos_BxT.astype(jnp.float32)[..., None] * freq_F)[:, :, None, :]
    sin, cos = jnp.sin(angle_BxTx1xF), jnp.cos(angle_BxTx1xF)
    x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


# ---- attention-logit biases: relative (T5 / Gopher family) and ALiBi --------------------
def relative_bucket(offset: jax.Array, n_buckets: int, max_distance: int) -> jax.Array:
    """T5's causal bucketing of offset = q_pos - k_pos >= 0.

    Half of the buckets hold exact small offsets; the other half are log-spaced up to
    ``max_distance``, beyond which every offset shares the last bucket.
    """
    offset = jnp.maximum(offset, 0)
    exact = n_buckets // 2
    log_ratio = jnp.log(jnp.maximum(offset, 1) / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (n_buckets - exact)).astype(jnp.int32)
    return jnp.where(offset < exact, offset, jnp.minimum(far, n_buckets - 1))


class RelativePositionBias(nnx.Module):
    """A learned bias per (bucketed offset, head), shared by all layers as in T5."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # Small random init: a mild, learnable preference per head and distance.
        self.table_RxN = normal_param(rngs, cfg, (cfg.relative_buckets, cfg.n_heads),
                                      (None, "heads"), std=0.1 * cfg.init_scale)

    def __call__(self, q_pos_BxT: jax.Array, k_pos_BxS: jax.Array) -> jax.Array:
        offset_BxTxS = q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]
        bucket = relative_bucket(offset_BxTxS, self.cfg.relative_buckets,
                                 self.cfg.relative_max_distance)
        return jnp.moveaxis(self.table_RxN[...][bucket], -1, 1)  # -> B x N x T x S


def alibi_slopes(n_heads: int) -> jax.Array:
    """Head slopes 2^(-8 i / n) (Press et al. 2022), interleaved when n is not a power of 2."""
    def powers(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    p = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(p) + powers(2 * p)[0::2][: n_heads - p]
    return jnp.asarray(slopes, jnp.float32)


def alibi_bias(q_pos_BxT: jax.Array, k_pos_BxS: jax.Array, n_heads: int) -> jax.Array:
    """-slope_n * (q_pos - k_pos): a fixed linear penalty on distance, no parameters."""
    offset_BxTxS = (q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]).astype(jnp.float32)
    return -alibi_slopes(n_heads)[None, :, None, None] * offset_BxTxS[:, None]


# ---- the KV cache (incremental decoding) ----------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Every layer's keys and values, S slots per row, filled left to right.

    Only the K = n_kv_heads shared heads are cached: PaLM §2 (after Shazeer 2019) chose
    multi-query attention because decoding is bound by reading this cache, and K = 1
    makes it n_heads times smaller than multi-head attention's.

    All rows write the same slot at each step; ``pos_BxS`` holds the position of the
    token in each slot, negative for an empty slot or padding. A query at position p sees
    exactly the slots with 0 <= position <= p, which is causal masking for every row,
    whatever its padding.
    """

    k: tuple[jax.Array, ...]  # per layer: B x S x K x H, with RoPE already applied
    v: tuple[jax.Array, ...]  # per layer: B x S x K x H
    pos_BxS: jax.Array  # int32 position of each slot's token; -1 = empty or padding
    length: jax.Array  # int32 scalar: slots filled so far; the next write starts here
    retro: Any = None  # RETRO's activations and encoded neighbours (palmlite.retro.RetroCache)

    @property
    def nbytes(self) -> int:
        """Bytes of cached K and V: B·S · ``accounting.kv_cache_bytes_per_token``."""
        return sum(x.nbytes for x in self.k + self.v)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens (dtype: cfg.dtype).

    Size it for prompt + new tokens: inside jit a write past ``max_len`` cannot raise, and
    ``dynamic_update_slice`` would clamp it onto the last slots.
    """
    shape = (batch, max_len, cfg.n_kv_heads, cfg.head_size)
    zeros = [jnp.zeros(shape, jnp.dtype(dtype or cfg.dtype)) for _ in range(2 * cfg.n_layers)]
    return KVCache(k=tuple(zeros[::2]), v=tuple(zeros[1::2]),
                   pos_BxS=jnp.full((batch, max_len), -1, jnp.int32),
                   length=jnp.zeros((), jnp.int32))


class LayerCache(NamedTuple):
    """One layer's share of a ``KVCache`` during a call: where to write, what is visible."""

    k_BxSxKxH: jax.Array
    v_BxSxKxH: jax.Array
    start: jax.Array  # slot of the first new token
    visible_Bx1xTxS: jax.Array  # 0 <= key position <= query position

    def write(self, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array) -> "LayerCache":
        """This cache with the T new keys and values stored from slot ``start`` on."""
        def put(old_BxSxKxH, new_BxTxKxH):
            new_BxTxKxH = new_BxTxKxH.astype(old_BxSxKxH.dtype)
            return jax.lax.dynamic_update_slice(old_BxSxKxH, new_BxTxKxH, (0, self.start, 0, 0))
        return self._replace(k_BxSxKxH=put(self.k_BxSxKxH, k_BxTxKxH),
                             v_BxSxKxH=put(self.v_BxSxKxH, v_BxTxKxH))


def visible_slots(q_pos_BxT: jax.Array, k_pos_BxS: jax.Array) -> jax.Array:
    """The decoding mask: a filled, non-padding slot at or before the query's position."""
    k_pos_Bx1xS = k_pos_BxS[:, None, :]
    visible_BxTxS = (k_pos_Bx1xS >= 0) & (k_pos_Bx1xS <= q_pos_BxT[:, :, None])
    return visible_BxTxS[:, None]


def padding_mask(pos_BxT: jax.Array) -> jax.Array:
    """Without a cache, on top of the causal mask: no real query sees a padding key (negative
    position). A padding query sees every key, so that no row is empty (its softmax stays
    finite whatever the implementation); its output is ignored anyway."""
    key_is_real_Bx1x1xS = pos_BxT[:, None, None, :] >= 0
    query_is_padding_Bx1xTx1 = pos_BxT[:, None, :, None] < 0
    return key_is_real_Bx1x1xS | query_is_padding_Bx1xTx1  # B x 1 x T x S (S = T)


# ---- causal attention in query blocks ------------------------------------------------------
def check_platform(cfg: ModelConfig) -> None:
    """cuDNN's fused attention exists only on NVIDIA GPUs: refuse it elsewhere with the
    field's name, before anything compiles (JAX would fail later, "cuDNN is not detected")."""
    if cfg.attention_impl == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"ModelConfig.attention_impl='cudnn' needs an NVIDIA GPU, and JAX runs "
                         f"on {jax.default_backend()!r} here: use 'blocked' or 'xla'")


def blocked_causal_attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
                             bias_BxNxTxT: jax.Array | None, mask_Bx1xTxT: jax.Array | None,
                             block: int) -> jax.Array:
    """Causal attention whose queries go in blocks of ``block``: block i reads keys
    0 .. end of block i only, so most of the T x T matrix's upper triangle is never computed.

    The same function as ``jax.nn.dot_product_attention(..., is_causal=True)`` (tested to
    1e-5 with its gradients), with about half the softmax work at T = 2·block, one block's
    working set at a time, and a hand-written backward (the textbook softmax VJP, no
    recomputation). On the 2-core CPU a 2-layer study model's train step at B 16, T 128
    takes 23 ms instead of 31 (``benchmarks/NOTES.md``). Logits and softmax in float32.
    Shared K/V heads (GQA / MQA) are repeated to N heads first: cheap at training sizes,
    and the gradient of the repeat sums each group's share back.
    """
    N, K = q_BxTxNxH.shape[2], k_BxTxKxH.shape[2]
    k_BxTxNxH = jnp.repeat(k_BxTxKxH, N // K, axis=2) if N != K else k_BxTxKxH
    v_BxTxNxH = jnp.repeat(v_BxTxKxH, N // K, axis=2) if N != K else v_BxTxKxH
    q_BxTxNxH = q_BxTxNxH * (1.0 / math.sqrt(q_BxTxNxH.shape[-1]))
    return _blocked(block, q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, bias_BxNxTxT, mask_Bx1xTxT)


def _query_blocks(T: int, block: int) -> list[tuple[int, int]]:
    """(start, end) of each block: its queries start..end-1 see keys 0..end-1."""
    return [(start, min(start + block, T)) for start in range(0, T, block)]


def _block_probs(q_BxTxNxH, k_BxTxNxH, bias_BxNxTxT, mask_Bx1xTxT, start, end):
    """Softmax probabilities (float32) of queries start..end-1 over keys 0..end-1."""
    logits_BxNxQxS = jnp.einsum("bqnh,bsnh->bnqs", q_BxTxNxH[:, start:end], k_BxTxNxH[:, :end],
                                preferred_element_type=jnp.float32)
    visible_QxS = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    if bias_BxNxTxT is not None:
        logits_BxNxQxS += bias_BxNxTxT[..., start:end, :end].astype(jnp.float32)
    if mask_Bx1xTxT is not None:
        visible_QxS = visible_QxS & mask_Bx1xTxT[..., start:end, :end]
    logits_BxNxQxS = jnp.where(visible_QxS, logits_BxNxQxS, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits_BxNxQxS, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked(block, q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, bias_BxNxTxT, mask_Bx1xTxT):
    return _blocked_fwd(block, q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, bias_BxNxTxT, mask_Bx1xTxT)[0]


def _blocked_fwd(block, q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, bias_BxNxTxT, mask_Bx1xTxT):
    probs, outs = [], []
    for start, end in _query_blocks(q_BxTxNxH.shape[1], block):
        probs_BxNxQxS = _block_probs(q_BxTxNxH, k_BxTxNxH, bias_BxNxTxT, mask_Bx1xTxT, start, end)
        probs.append(probs_BxNxQxS)
        outs.append(jnp.einsum("bnqs,bsnh->bqnh", probs_BxNxQxS.astype(v_BxTxNxH.dtype),
                               v_BxTxNxH[:, :end]))
    out_BxTxNxH = jnp.concatenate(outs, axis=1)
    return out_BxTxNxH, (q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, bias_BxNxTxT, out_BxTxNxH, probs)


def _blocked_bwd(block, residuals, dout_BxTxNxH):
    """Per block: dV += Pᵀ dO; dP = dO Vᵀ; dS = P ∘ (dP - rowsum(dO ∘ O)); dQ = dS K;
    dK += dSᵀ Q; d(bias) = dS (zero for the keys after the block)."""
    q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, bias_BxNxTxT, out_BxTxNxH, probs = residuals
    T, dtype = q_BxTxNxH.shape[1], q_BxTxNxH.dtype
    delta_BxNxT = jnp.einsum("bqnh,bqnh->bnq", dout_BxTxNxH, out_BxTxNxH,
                             preferred_element_type=jnp.float32)
    dk_BxTxNxH, dv_BxTxNxH = jnp.zeros_like(k_BxTxNxH), jnp.zeros_like(v_BxTxNxH)
    dqs, dbiases = [], []
    for (start, end), probs_BxNxQxS in zip(_query_blocks(T, block), probs):
        dout_BxQxNxH = dout_BxTxNxH[:, start:end]
        dv_BxTxNxH = dv_BxTxNxH.at[:, :end].add(jnp.einsum(
            "bnqs,bqnh->bsnh", probs_BxNxQxS.astype(dtype), dout_BxQxNxH))
        dprobs_BxNxQxS = jnp.einsum("bqnh,bsnh->bnqs", dout_BxQxNxH, v_BxTxNxH[:, :end],
                                    preferred_element_type=jnp.float32)
        dlogits_BxNxQxS = probs_BxNxQxS * (dprobs_BxNxQxS - delta_BxNxT[..., start:end, None])
        dlogits_BxNxQxS_c = dlogits_BxNxQxS.astype(dtype)
        dqs.append(jnp.einsum("bnqs,bsnh->bqnh", dlogits_BxNxQxS_c, k_BxTxNxH[:, :end]))
        dk_BxTxNxH = dk_BxTxNxH.at[:, :end].add(jnp.einsum(
            "bnqs,bqnh->bsnh", dlogits_BxNxQxS_c, q_BxTxNxH[:, start:end]))
        if bias_BxNxTxT is not None:
            dbiases.append(jnp.pad(dlogits_BxNxQxS, [(0, 0)] * 3 + [(0, T - end)]))
    dbias_BxNxTxT = None
    if bias_BxNxTxT is not None:  # summed over the axes the bias was broadcast along
        dbias_BxNxTxT = jnp.concatenate(dbiases, axis=-2)
        broadcast = tuple(i for i, n in enumerate(bias_BxNxTxT.shape) if n == 1)
        dbias_BxNxTxT = dbias_BxNxTxT.sum(broadcast, keepdims=True).astype(bias_BxNxTxT.dtype)
    return jnp.concatenate(dqs, axis=1), dk_BxTxNxH, dv_BxTxNxH, dbias_BxNxTxT, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# ---- the attention layer ------------------------------------------------------------------
class Attention(nnx.Module):
    """Queries have N heads; keys and values K heads shared by groups of N / K queries."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)  # GPT-2 §2.3: residual branches
        self.q = Dense(cfg, (D,), (N, H), ("embed",), ("heads", "head_dim"), rngs=rngs)
        self.k = Dense(cfg, (D,), (K, H), ("embed",), ("kv_heads", "head_dim"), rngs=rngs)
        self.v = Dense(cfg, (D,), (K, H), ("embed",), ("kv_heads", "head_dim"), rngs=rngs)
        self.o = Dense(cfg, (N, H), (D,), ("heads", "head_dim"), ("embed",), rngs=rngs,
                       scale=out_scale)

    def __call__(self, x_BxTxD: jax.Array, pos_BxT: jax.Array, bias_BxNxTxS: jax.Array | None,
                 cache: LayerCache | None = None, mask_Bx1xTxS: jax.Array | None = None,
                 ) -> tuple[jax.Array, LayerCache | None]:
        """Training (``cache=None``): causal attention within x, restricted further by
        ``mask_Bx1xTxS`` if given (``padding_mask``). Decoding: the new K/V are written into
        the cache at ``cache.start`` and the T queries attend over all S slots."""
        q_BxTxNxH = self.q(x_BxTxD)
        k_BxSxKxH = self.k(x_BxTxD)
        v_BxSxKxH = self.v(x_BxTxD)
        if self.cfg.position == "rope":
            q_BxTxNxH = apply_rope(q_BxTxNxH, pos_BxT, self.cfg.rope_theta)
            k_BxSxKxH = apply_rope(k_BxSxKxH, pos_BxT, self.cfg.rope_theta)
        if bias_BxNxTxS is not None:
            bias_BxNxTxS = bias_BxNxTxS.astype(q_BxTxNxH.dtype)
        # jax.nn.dot_product_attention groups the N query heads over the K shared
        # key/value heads itself (no repeated K/V).
        if cache is None and self.cfg.attention_impl == "blocked":
            out_BxTxNxH = blocked_causal_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, bias_BxNxTxS,
                                                   mask_Bx1xTxS, self.cfg.attention_block)
            return self.o(out_BxTxNxH), None
        if cache is None:  # "cudnn": one fused flash-attention kernel, no T x S matrix in
            # memory (unless a mask or bias is one)
            check_platform(self.cfg)
            out_BxTxNxH = jax.nn.dot_product_attention(
                q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, bias=bias_BxNxTxS, mask=mask_Bx1xTxS,
                is_causal=True, implementation=self.cfg.attention_impl)
            return self.o(out_BxTxNxH), None
        # Decoding. A mask, not is_causal: JAX's causal mask lets query t see keys 0..t,
        # which is wrong once the T queries sit after S - T earlier slots.
        cache = cache.write(k_BxSxKxH, v_BxSxKxH)  # RoPE'd keys: rotated once, then cached
        dtype = q_BxTxNxH.dtype
        out_BxTxNxH = jax.nn.dot_product_attention(
            q_BxTxNxH, cache.k_BxSxKxH.astype(dtype), cache.v_BxSxKxH.astype(dtype),
            bias=bias_BxNxTxS, mask=cache.visible_Bx1xTxS)
        return self.o(out_BxTxNxH), cache
