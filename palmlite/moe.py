"""GLaM's mixture-of-experts FFN: router -> top-k -> dispatch -> E expert FFNs -> combine.

Shapes: B sequences of T tokens, N = B·T, D d_model, F d_ff, E experts, K top_k, C capacity,
M = N·K routed token-slots, P groups, Z domains. What the router reads is a toggle
(``MoEConfig.routing``): each token (Switch, GLaM), the sequence's domain (Task-MoE), or
nothing (a fixed domain -> experts map). Three dispatches compute the same function:

- ``capacity_factor`` set: GShard's einsum. In each sequence (a GShard group) each expert
  has C slots; slots go to all first choices before any second choice (GShard §2.2), and
  a token-slot that finds its expert full is dropped: it contributes nothing, so the
  token rides the residual.
- ``capacity_factor`` and ``group_size`` set: the same capacity rule over groups of
  ``group_size`` tokens (several sequences), by scatter/gather into [E·C] slot buffers.
- ``capacity_factor=None``: dropless. Token-slots are sorted by expert and each expert's
  contiguous group goes through one grouped matmul (``jax.lax.ragged_dot``).

The layer returns its auxiliary losses and statistics next to its output, and
``Transformer.forward`` hands them up (``model(tokens)`` still returns logits only). They
are return values rather than ``sow``-ed state: sowing outside ``nnx.capture`` is deprecated
in Flax 0.12, and it would mutate the module inside the decoding loop's trace.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from palmlite.config import ModelConfig
from palmlite.layers import normal_param
from palmlite.mlp import ACTIVATION_FNS, MLP
from palmlite.sharding import constrain

BUFFER = ("expert", "batch", None, None)  # the logical axes of an [E, rows, C, D] expert buffer


class Routing(NamedTuple):
    gates_NxK: jax.Array  # float32 combine weights of the chosen experts
    experts_NxK: jax.Array  # int32 expert ids, best first
    aux_loss: jax.Array  # Switch §2.2 load balance E·Σ f_i P_i (1 when balanced), unscaled
    router_z_loss: jax.Array  # ST-MoE: mean (log Σ exp logits)², unscaled
    load_E: jax.Array  # f_i: fraction of the M token-slots routed to expert i
    entropy: jax.Array  # mean entropy of the router's distribution over experts, in nats


class MoEStats(NamedTuple):
    aux_loss: jax.Array
    router_z_loss: jax.Array
    load_E: jax.Array
    dropped_fraction: jax.Array  # token-slots over capacity (0 when dropless)
    router_entropy: jax.Array  # nats; log E when the router is undecided, 0 when certain
    experts_BxTxK: jax.Array  # each token's chosen experts (routing analysis reads them)


def route(logits_NxE: jax.Array, top_k: int, n_groups: int = 1) -> Routing:
    """Top-k routing on float32 logits (Switch §2.4: bf16 routers are unstable).

    The load-balancing loss is Switch's E·Σ f_i P_i within each of ``n_groups`` equal runs
    of tokens (1: the whole call; B: each sequence, ``MoEConfig.balance_scope``), averaged."""
    E = logits_NxE.shape[-1]
    probs_NxE = jax.nn.softmax(logits_NxE, axis=-1)
    gates_NxK, experts_NxK = jax.lax.top_k(probs_NxE, top_k)
    if top_k > 1:  # GLaM/GShard: renormalise over the chosen experts. Top-1 keeps p_i
        gates_NxK = gates_NxK / gates_NxK.sum(-1, keepdims=True)  # (Switch §2.1), else 1
    chosen_NxE = jax.nn.one_hot(experts_NxK, E).sum(1) / top_k
    load_GxE = chosen_NxE.reshape(n_groups, -1, E).mean(1)
    mean_probs_GxE = probs_NxE.reshape(n_groups, -1, E).mean(1)
    aux_loss = E * jnp.mean(jnp.sum(load_GxE * mean_probs_GxE, -1))  # gradient through P_i only
    router_z_loss = jnp.mean(jax.nn.logsumexp(logits_NxE, axis=-1) ** 2)
    entropy = -jnp.mean(jnp.sum(probs_NxE * jax.nn.log_softmax(logits_NxE, axis=-1), -1))
    return Routing(gates_NxK, experts_NxK.astype(jnp.int32), aux_loss, router_z_loss,
                   load_GxE.mean(0), entropy)


def fixed_route(domains_N: jax.Array, top_k: int, n_experts: int) -> Routing:
    """No router: domain d's tokens go to experts d·K .. d·K + K - 1, each gate 1/K. The
    balance "loss" reports E·Σ f_i² (1 when balanced, like Switch's), with no gradient."""
    experts_NxK = (domains_N[:, None] * top_k + jnp.arange(top_k)).astype(jnp.int32)
    gates_NxK = jnp.full(experts_NxK.shape, 1.0 / top_k, jnp.float32)
    load_E = jax.nn.one_hot(experts_NxK, n_experts).sum((0, 1)) / experts_NxK.size
    zero = jnp.zeros((), jnp.float32)
    return Routing(gates_NxK, experts_NxK, n_experts * jnp.sum(load_E ** 2), zero, load_E, zero)


def capacity(n_tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    """Switch §2.2: slots per expert = tokens·k / E · capacity factor (at least 1)."""
    return max(1, math.ceil(n_tokens * top_k / n_experts * factor))


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        moe, D, F = cfg.moe, cfg.d_model, cfg.d_ff
        E, s = moe.n_experts, cfg.init_scale
        self.top_k, self.capacity_factor = moe.top_k, moe.capacity_factor
        self.group_size, self.n_experts = moe.group_size, E
        self.routing, self.per_sequence = moe.routing, moe.balance_scope == "sequence"
        self.dtype = jnp.dtype(cfg.dtype)
        self.act = ACTIVATION_FNS[cfg.activation]
        # The router: token -> logits (Switch, GLaM), or domain -> logits (Task-MoE).
        self.router_DxE = normal_param(rngs, cfg, (D, E), ("embed", "expert"), s *
                                       moe.router_init_scale / math.sqrt(D)) \
            if moe.routing == "token" else None
        self.router_ZxE = normal_param(rngs, cfg, (moe.n_domains, E), (None, "expert"),
                                       s * moe.router_init_scale) if moe.routing == "task" else None
        ffn = lambda shape, axes, std: normal_param(rngs, cfg, shape, axes, std)
        self.up_ExDxF = ffn((E, D, F), ("expert", "embed", "mlp"), s / math.sqrt(D))
        self.gate_ExDxF = ffn((E, D, F), ("expert", "embed", "mlp"),
                              s / math.sqrt(D)) if cfg.gated else None
        self.down_ExFxD = ffn((E, F, D), ("expert", "mlp", "embed"),  # GPT-2 §2.3 scaling
                              s / math.sqrt(F) / math.sqrt(2 * cfg.n_layers))
        self.shared = MLP(cfg, rngs=rngs) if moe.shared_expert else None

    def __call__(self, x_BxTxD: jax.Array, domains_B: jax.Array | None = None
                 ) -> tuple[jax.Array, MoEStats]:
        """``domains_B``: each sequence's domain id (a ``mix:`` corpus), which the "task" and
        "fixed" routings read; the token router ignores it."""
        x_NxD = x_BxTxD.reshape(-1, x_BxTxD.shape[-1]).astype(self.dtype)
        r = self.route(x_NxD, domains_B, x_BxTxD.shape[0])
        if self.capacity_factor is None:
            y_NxD, dropped = self.dropless(x_NxD, r), jnp.zeros((), jnp.float32)
            y_BxTxD = y_NxD.reshape(x_BxTxD.shape)
        elif self.group_size is not None:
            y_NxD, dropped = self.grouped_dispatch(x_NxD, r)
            y_BxTxD = y_NxD.reshape(x_BxTxD.shape)
        else:
            y_BxTxD, dropped = self.einsum_dispatch(x_NxD.reshape(x_BxTxD.shape), r)
        if self.shared is not None:
            y_BxTxD = y_BxTxD + self.shared(x_BxTxD)
        experts_BxTxK = r.experts_NxK.reshape(*x_BxTxD.shape[:2], -1)
        return y_BxTxD, MoEStats(r.aux_loss, r.router_z_loss, r.load_E, dropped, r.entropy,
                                 experts_BxTxK)

    def route(self, x_NxD: jax.Array, domains_B: jax.Array | None, B: int) -> Routing:
        """Routing of the N = B·T tokens, by what ``MoEConfig.routing`` lets the router see."""
        if self.routing == "token":
            logits_NxE = jnp.dot(x_NxD.astype(jnp.float32),
                                 self.router_DxE[...].astype(jnp.float32))
            return route(logits_NxE, self.top_k, B if self.per_sequence else 1)
        if domains_B is None:
            raise ValueError(f"MoEConfig.routing={self.routing!r} routes by domain: pass each "
                             "sequence's domain id (domains=, as a mix: corpus's batches carry)")
        domains_N = jnp.repeat(jnp.asarray(domains_B, jnp.int32), x_NxD.shape[0] // B)
        if self.routing == "fixed":
            return fixed_route(domains_N, self.top_k, self.n_experts)
        logits_NxE = self.router_ZxE[...].astype(jnp.float32)[domains_N]
        return route(logits_NxE, self.top_k, B if self.per_sequence else 1)

    def expert_ffns(self, x: jax.Array, matmul) -> jax.Array:
        """Every expert's FFN on its own rows of ``x``, with the dense MLP's activation toggle.

        ``matmul(x, w_ExIxO)`` applies expert e's kernel to expert e's rows: a batched
        einsum over [E, rows, D] buffers, or a grouped matmul over rows sorted by expert.
        """
        up, gate, down = (None if w is None else w[...].astype(self.dtype)
                          for w in (self.up_ExDxF, self.gate_ExDxF, self.down_ExFxD))
        h = matmul(x, up)
        h = self.act(matmul(x, gate)) * h if gate is not None else self.act(h)
        return matmul(h, down)

    def einsum_dispatch(self, x_BxTxD: jax.Array, r: Routing) -> tuple[jax.Array, jax.Array]:
        """GShard: one-hot dispatch into [E, C] slots, batched expert FFNs, weighted combine.

        Each sequence is a GShard group with its own capacity C: the one-hot einsums cost
        O(T·E·C·D) per sequence, so per token they grow with T, not with the whole batch.
        """
        (B, T, _), (K, E) = x_BxTxD.shape, (self.top_k, self.n_experts)
        C = capacity(T, K, E, self.capacity_factor)
        experts_BxTxK = r.experts_NxK.reshape(B, T, K)
        chosen_BxKxTxE = jax.nn.one_hot(experts_BxTxK.transpose(0, 2, 1), E, dtype=jnp.int32)
        # Slot of each token-slot in its expert's buffer: all 1st choices, then all 2nd, ...
        slot_BxKxTxE = jnp.cumsum(chosen_BxKxTxE.reshape(B, K * T, E), axis=1).reshape(
            B, K, T, E) - 1
        slot_BxTxK = jnp.sum(slot_BxKxTxE * chosen_BxKxTxE, -1).transpose(0, 2, 1)
        kept_BxTxK = slot_BxTxK < C
        expert_BxTxKxE = jax.nn.one_hot(experts_BxTxK, E, dtype=self.dtype)
        # A dropped slot's one-hot over C is all zero (index C is out of range).
        slot_BxTxKxC = jax.nn.one_hot(jnp.where(kept_BxTxK, slot_BxTxK, C), C, dtype=self.dtype)
        # Top-k experts are distinct, so summing over k never puts two slots in one cell.
        dispatch_BxTxExC = jnp.einsum("btke,btkc->btec", expert_BxTxKxE, slot_BxTxKxC)
        gates_BxTxK = r.gates_NxK.reshape(B, T, K).astype(self.dtype)
        combine_BxTxExC = jnp.einsum("btke,btkc->btec", gates_BxTxK[..., None] * expert_BxTxKxE,
                                     slot_BxTxKxC)
        # Expert-major buffers [E, B·C, D]: each expert is one plain matmul (fast on CPU too).
        # On a mesh: experts over the expert axis, rows over the other batch axes (GShard's
        # all-to-all, there and back; sharding.constrain).
        x_ExBxCxD = constrain(jnp.einsum("btec,btd->ebcd", dispatch_BxTxExC, x_BxTxD), BUFFER)
        y_ExBCxD = self.expert_ffns(x_ExBxCxD.reshape(E, B * C, -1),
                                    lambda x, w: jnp.einsum("emi,eio->emo", x, w))
        y_ExBxCxD = constrain(y_ExBCxD.reshape(E, B, C, -1), BUFFER)
        y_BxTxD = jnp.einsum("btec,ebcd->btd", combine_BxTxExC, y_ExBxCxD)
        return y_BxTxD, jnp.mean(~kept_BxTxK, dtype=jnp.float32)

    def grouped_dispatch(self, x_NxD: jax.Array, r: Routing) -> tuple[jax.Array, jax.Array]:
        """Capacity shared by groups of G = ``group_size`` tokens, by scatter and gather.

        The same slot rule as ``einsum_dispatch`` (in each group, all first choices before any
        second choice; a token-slot that finds its expert's C slots full is dropped), but
        each token-slot is written to its slot's row of an [E·C, D] buffer and read back
        from it: O(G·K·D) per group instead of the one-hot einsums' O(G·E·C·D).
        """
        N, D = x_NxD.shape
        K, E = self.top_k, self.n_experts
        G = min(self.group_size, N)
        if N % G:
            raise ValueError(f"MoEConfig.group_size={self.group_size} does not divide the "
                             f"{N} tokens of this call")
        C = capacity(G, K, E, self.capacity_factor)
        # Token-slots of each group k-major: [group, k, token] -> priority order.
        experts_PxM = r.experts_NxK.reshape(N // G, G, K).transpose(0, 2, 1).reshape(N // G, K * G)
        chosen_PxMxE = jax.nn.one_hot(experts_PxM, E, dtype=jnp.int32)
        slot_PxM = jnp.sum((jnp.cumsum(chosen_PxMxE, axis=1) - 1) * chosen_PxMxE, -1)
        kept_PxM = slot_PxM < C
        row_PxM = jnp.where(kept_PxM, experts_PxM * C + slot_PxM, E * C)  # E·C: a dummy row
        token_PxM = jnp.tile(jnp.arange(G), K)[None, :] + (jnp.arange(N // G) * G)[:, None]
        group_PxM = jnp.broadcast_to(jnp.arange(N // G)[:, None], row_PxM.shape)
        buffer_PxRxD = jnp.zeros((N // G, E * C + 1, D), self.dtype).at[group_PxM, row_PxM].set(
            x_NxD[token_PxM])
        x_ExPxCxD = constrain(buffer_PxRxD[:, :-1].reshape(N // G, E, C, D).transpose(1, 0, 2, 3),
                              BUFFER)
        y_ExPCxD = self.expert_ffns(x_ExPxCxD.reshape(E, -1, D),
                                    lambda x, w: jnp.einsum("emi,eio->emo", x, w))
        y_ExPxCxD = constrain(y_ExPCxD.reshape(E, N // G, C, D), BUFFER)
        y_PxRxD = jnp.pad(y_ExPxCxD.transpose(1, 0, 2, 3).reshape(
            N // G, E * C, D), [(0, 0), (0, 1), (0, 0)])
        gates_PxM = r.gates_NxK.reshape(N // G, G, K).transpose(0, 2, 1).reshape(N // G, K * G)
        y_PxMxD = y_PxRxD[group_PxM, row_PxM] * (gates_PxM * kept_PxM).astype(self.dtype)[..., None]
        y_NxD = jnp.zeros_like(x_NxD).at[token_PxM.reshape(-1)].add(y_PxMxD.reshape(-1, D))
        return y_NxD, jnp.mean(~kept_PxM, dtype=jnp.float32)

    def dropless(self, x_NxD: jax.Array, r: Routing) -> jax.Array:
        """Sort the M = N·K token-slots by expert; one grouped matmul per kernel.

        On GPU/TPU ``ragged_dot`` is a grouped GEMM; XLA:CPU lowers it to a masked dense
        matmul over all E experts (E times the FLOPs), so on a CPU prefer the einsum path.
        """
        K, E = self.top_k, self.n_experts
        experts_M = r.experts_NxK.reshape(-1)
        order_M = jnp.argsort(experts_M, stable=True)
        token_M = order_M // K
        sizes_E = jnp.bincount(experts_M, length=E).astype(jnp.int32)
        ys_MxD = self.expert_ffns(x_NxD[token_M], lambda x, w: jax.lax.ragged_dot(x, w, sizes_E))
        gates_M = r.gates_NxK.reshape(-1)[order_M].astype(self.dtype)
        return jnp.zeros_like(x_NxD).at[token_M].add(gates_M[:, None] * ys_MxD)


def moe_stats(stats: list[MoEStats]) -> dict[str, jax.Array]:
    """One forward's MoE statistics (``Transformer.forward``): aux and router-z losses summed
    over the MoE layers (each layer's is a loss term), load and dropped fraction averaged,
    and each layer's load (an average over layers can look balanced while every layer
    overloads a different expert)."""
    n = len(stats)
    return dict(aux_loss=sum(s.aux_loss for s in stats),
                router_z_loss=sum(s.router_z_loss for s in stats),
                expert_load=sum(s.load_E for s in stats) / n,
                expert_load_per_layer=jnp.stack([s.load_E for s in stats]),
                dropped_fraction=sum(s.dropped_fraction for s in stats) / n,
                router_entropy=sum(s.router_entropy for s in stats) / n)
