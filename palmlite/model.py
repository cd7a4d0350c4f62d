"""The decoder: embeddings -> n_layers blocks (serial | parallel) -> norm -> logits.

Read top to bottom, this file is PaLM §2 with each of its choices behind a config field:
the block (parallel vs serial), the positions (added here or inside attention), tied
embeddings and biases. Shapes: B batch, T length, D d_model, V vocab, N heads, S cache slots.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from palmlite.attention import (Attention, KVCache, LayerCache, RelativePositionBias,
                                alibi_bias, padding_mask, visible_slots)
from palmlite.config import ModelConfig
from palmlite.layers import Norm, check_ids, normal_param
from palmlite.mlp import MLP
from palmlite.moe import MoE, MoEStats
from palmlite.sharding import constrain
from palmlite import retro

# What a rematerialised block keeps from its forward pass (jax.checkpoint policies):
# "full" keeps only its input and recomputes the rest in the backward (least memory);
# "dots" keeps the matmul outputs and recomputes the cheap elementwise work in between.
REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def sinusoidal_embedding(pos_BxT: jax.Array, d_model: int) -> jax.Array:
    """Fixed sin/cos position features of 'Attention Is All You Need' §3.5."""
    half = d_model // 2
    freq_F = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxTxF = pos_BxT.astype(jnp.float32)[..., None] * freq_F
    return jnp.concatenate([jnp.sin(angle_BxTxF), jnp.cos(angle_BxTxF)], axis=-1)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, i: int, *, rngs: nnx.Rngs):
        self.parallel = cfg.block == "parallel"
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg, rngs=rngs)
        # PaLM's parallel block feeds attention and MLP from the same normalised input.
        self.mlp_norm = None if self.parallel else Norm(cfg)
        # GLaM §3: a mixture of experts replaces the FFN of every `moe.every`-th layer.
        self.mlp = MoE(cfg, rngs=rngs) if cfg.is_moe_layer(i) else MLP(cfg, rngs=rngs)
        # RETRO §2.4: chunked cross-attention to the retrieved neighbours in some layers.
        self.cca = retro.ChunkedCrossAttention(cfg, rngs=rngs) if cfg.is_cca_layer(i) else None

    def ffn(self, h_BxTxD, domains_B=None) -> tuple[jax.Array, MoEStats | None]:
        """The FFN's output, and its routing statistics if it is a mixture of experts (whose
        router may read each sequence's domain: ``MoEConfig.routing``)."""
        if isinstance(self.mlp, MoE):
            return self.mlp(h_BxTxD, domains_B)
        return self.mlp(h_BxTxD), None

    def reads_neighbours(self, retrieved: retro.Retrieved | None) -> bool:
        return self.cca is not None and retrieved is not None

    def __call__(self, x_BxTxD, pos_BxT, bias_BxNxTxS, cache: LayerCache | None,
                 mask_Bx1xTxS: jax.Array | None = None, retrieved: retro.Retrieved | None = None,
                 domains_B: jax.Array | None = None):
        if self.parallel:  # PaLM §2: y = x + Attn(LN(x)) + MLP(LN(x)); ~15% faster at scale
            h_BxTxD = self.attn_norm(x_BxTxD)
            a_BxTxD, cache = self.attn(h_BxTxD, pos_BxT, bias_BxNxTxS, cache, mask_Bx1xTxS)
            f_BxTxD, stats = self.ffn(h_BxTxD, domains_B)
            y_BxTxD = x_BxTxD + a_BxTxD + f_BxTxD
            if self.reads_neighbours(retrieved):  # RETRO: a third parallel branch, + CCA(x)
                y_BxTxD = y_BxTxD + self.cca(x_BxTxD, retrieved)
            return y_BxTxD, cache, stats
        # serial (GPT-2, Gopher): y = x + MLP(LN(x + Attn(LN(x))))
        a_BxTxD, cache = self.attn(self.attn_norm(x_BxTxD), pos_BxT, bias_BxNxTxS, cache,
                                   mask_Bx1xTxS)
        x_BxTxD = x_BxTxD + a_BxTxD
        if self.reads_neighbours(retrieved):  # RETRO's block: attention, CCA, FFN (§2.4)
            x_BxTxD = x_BxTxD + self.cca(x_BxTxD, retrieved)
        f_BxTxD, stats = self.ffn(self.mlp_norm(x_BxTxD), domains_B)
        return x_BxTxD + f_BxTxD, cache, stats


class Transformer(nnx.Module):
    """``Transformer(cfg, rngs=nnx.Rngs(seed))(tokens_BxT) -> float32 logits_BxTxV``.

    With a cache (``attention.init_cache``), ``model(tokens_BxT, positions_BxT, cache)``
    appends the T tokens to it and returns ``(logits_BxTxV, new_cache)``: prefill is one
    call with the prompt, each decoding step one call with T = 1. A negative position
    marks padding, which no real query attends to, with or without a cache.

    Token ids lie in [0, vocab_size), and with learned positions a position is below
    max_seq_len: an eager call checks both (``layers.check_ids``); under jit they are the
    caller's contract (palmlite's data and generation keep it).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D = cfg.d_model
        self.embed_VxD = normal_param(rngs, cfg, (cfg.vocab_size, D), ("vocab", "embed"),
                                      cfg.embed_init_std)
        learned, relative = cfg.position == "learned", cfg.position == "relative"
        # GPT-2: a learned vector per absolute position.
        self.pos_embed_TxD = normal_param(rngs, cfg, (cfg.max_seq_len, D), (None, "embed"),
                                          cfg.embed_init_std) if learned else None
        self.relative_bias = RelativePositionBias(cfg, rngs=rngs) if relative else None
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = Norm(cfg)
        # An untied output embedding starts like the input one, so logits start small.
        self.unembed_DxV = None if cfg.tie_embeddings else normal_param(
            rngs, cfg, (D, cfg.vocab_size), ("embed", "vocab"), cfg.embed_init_std)
        # RETRO: the neighbour encoder, run at the first CCA layer (palmlite.retro)
        self.encoder = retro.RetroEncoder(cfg, rngs=rngs) if cfg.retro else None
        self.first_cca = next((i for i in range(cfg.n_layers) if cfg.is_cca_layer(i)), None)

    def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
                 cache: KVCache | None = None, neighbours=None, domains=None
                 ) -> jax.Array | tuple[jax.Array, KVCache]:
        logits_BxTxV, cache, _ = self.forward(tokens_BxT, positions_BxT, cache, neighbours,
                                              domains)
        return logits_BxTxV if cache is None else (logits_BxTxV, cache)

    def forward(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
                cache: KVCache | None = None, neighbours=None, domains=None
                ) -> tuple[jax.Array, KVCache | None, list[MoEStats]]:
        """``__call__``'s work, plus the statistics of each MoE layer (``moe.moe_stats``).

        ``domains``: each sequence's domain id, int32 [B] (a ``mix:`` corpus's batches carry
        them), read only by an MoE whose router sees the domain (``MoEConfig.routing``).

        RETRO (``cfg.retro``): ``neighbours`` are the token ids B x C x J x R retrieved for
        each of the C = T / chunk_size chunks (``palmlite.retrieval``); None turns retrieval
        off, which leaves exactly the base decoder. Decoding with a ``RetroCache`` in the
        cache takes a ``retro.NewNeighbours`` instead (``generate.retro_generate_tokens``).
        """
        x_BxTxD, cache, stats = self.trunk(tokens_BxT, positions_BxT, cache, neighbours, domains)
        return self.unembed(x_BxTxD), cache, stats

    def hidden_states(self, tokens_BxT: jax.Array) -> jax.Array:
        """The final norm's output, B x T x D float32: what the output layer reads (RETRO's
        frozen embedder averages it over each chunk: ``palmlite.retrieval``)."""
        x_BxTxD, _, _ = self.trunk(tokens_BxT)
        return self.final_norm(x_BxTxD).astype(jnp.float32)

    def trunk(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
              cache: KVCache | None = None, neighbours=None, domains=None
              ) -> tuple[jax.Array, KVCache | None, list[MoEStats]]:
        """Embeddings and blocks: the residual stream before the final norm."""
        cfg, T = self.cfg, tokens_BxT.shape[1]
        check_ids("token id", tokens_BxT, cfg.vocab_size)
        # Only given positions can be negative (padding); the default 0..T-1 needs no mask.
        padded = positions_BxT is not None
        if cfg.position == "learned":  # a table of max_seq_len rows
            if positions_BxT is None and cache is None and T > cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens is longer than max_seq_len="
                                 f"{cfg.max_seq_len}, the learned position table's length")
            if padded:
                check_ids("position", jnp.maximum(positions_BxT, 0), cfg.max_seq_len)
        if positions_BxT is None:  # consecutive positions, continuing after the cached ones
            pos_T = jnp.arange(T) if cache is None else cache.length + jnp.arange(T)
            positions_BxT = jnp.broadcast_to(pos_T, tokens_BxT.shape)
        x_BxTxD = self.embed(tokens_BxT, positions_BxT)
        if cache is None:  # training: the T tokens are the keys, attended causally
            k_pos_BxS, layers = positions_BxT, [None] * cfg.n_layers
            mask_Bx1xTxS = padding_mask(positions_BxT) if padded else None
        else:  # decoding: the T tokens join the cache; the keys are all of its S slots
            k_pos_BxS = jax.lax.dynamic_update_slice(
                cache.pos_BxS, positions_BxT.astype(jnp.int32), (0, cache.length))
            visible_Bx1xTxS = visible_slots(positions_BxT, k_pos_BxS)
            layers = [LayerCache(k, v, cache.length, visible_Bx1xTxS)
                      for k, v in zip(cache.k, cache.v)]
            mask_Bx1xTxS = None  # the cache's mask (visible_slots) covers padding
        bias_BxNxTxS = None  # relative / ALiBi: one bias for all layers, computed once
        if cfg.position == "relative":
            bias_BxNxTxS = self.relative_bias(positions_BxT, k_pos_BxS)
        elif cfg.position == "alibi":
            bias_BxNxTxS = alibi_bias(positions_BxT, k_pos_BxS, cfg.n_heads)
        stats, run_block = [], Block.__call__
        if cfg.remat != "none" and cache is None:  # trade FLOPs for activation memory
            run_block = nnx.remat(Block.__call__, policy=REMAT_POLICIES[cfg.remat])
        retrieved, rcache = None, None if cache is None else cache.retro
        for i, block in enumerate(self.blocks):
            if i == self.first_cca and (neighbours is not None or rcache is not None):
                # RETRO §2.3: the encoder reads the chunks' activations at this layer's input
                retrieved, rcache = retro.condition(
                    self.encoder, self.embed_VxD, x_BxTxD, neighbours, positions_BxT,
                    None if cache is None else cache.length, rcache)
            x_BxTxD, layers[i], layer_stats = run_block(block, x_BxTxD, positions_BxT,
                                                        bias_BxNxTxS, layers[i], mask_Bx1xTxS,
                                                        retrieved, domains)
            stats += [layer_stats] if layer_stats is not None else []
        if cache is None:
            return x_BxTxD, None, stats
        return x_BxTxD, KVCache(k=tuple(c.k_BxSxKxH for c in layers),
                                v=tuple(c.v_BxSxKxH for c in layers), pos_BxS=k_pos_BxS,
                                length=cache.length + T, retro=rcache), stats

    def embed(self, tokens_BxT: jax.Array, positions_BxT: jax.Array) -> jax.Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        # FSDP gathers the table before the lookup, as it does every weight before its matmul:
        # the lookup's gradient is then summed on each device and reduce-scattered, where a
        # d_model-split table would need the batch-split gradient all-gathered first.
        table_VxD = constrain(self.embed_VxD[...], ("vocab", None))
        x_BxTxD = table_VxD[tokens_BxT].astype(dtype)
        if cfg.position == "learned":
            x_BxTxD = x_BxTxD + self.pos_embed_TxD[...][positions_BxT].astype(dtype)
        elif cfg.position == "sinusoidal":
            x_BxTxD = x_BxTxD + sinusoidal_embedding(positions_BxT, cfg.d_model).astype(dtype)
        return x_BxTxD

    def unembed(self, x_BxTxD: jax.Array) -> jax.Array:
        """Final norm, then logits in the compute dtype, returned as float32.

        The matmul's output stays in the compute dtype on purpose: its gradient then flows
        back in bf16 too, and the two largest backward matmuls (V x D by B·T) run on bf16
        tensor cores instead of float32 ones (measured on an H100: ~20% of a GPT-2 124M
        step). The loss itself is taken in float32."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        x_BxTxD = self.final_norm(x_BxTxD)
        if cfg.tie_embeddings:  # PaLM §2: the input embedding is the output layer too
            # No 1/sqrt(D) logit scale: PaLM pairs it with N(0,1) embeddings; with 0.02 it
            # makes the output layer learn sqrt(D) times slower (see ModelConfig).
            w_DxV = self.embed_VxD[...].T
        else:
            w_DxV = self.unembed_DxV[...]
        return jnp.dot(x_BxTxD, w_DxV.astype(dtype)).astype(jnp.float32)
