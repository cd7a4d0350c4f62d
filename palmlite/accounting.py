"""Exact parameter, FLOP, KV-cache and MFU accounting, from the config alone.

Nothing here allocates a model, so PaLM 540B is counted as easily as a toy; the tests
check ``count_params`` against instantiated models across every toggle.
"""

from __future__ import annotations

import jax.numpy as jnp

from palmlite.config import ModelConfig

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets. MFU is reported only
# for devices listed here: on a CPU or an unknown device it is None, never a guess.
PEAK_FLOPS = {
    "tpu v2": 45e12,
    "tpu v3": 123e12,
    "tpu v4": 275e12,  # PaLM's chip
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "nvidia a100": 312e12,
    "nvidia h100": 989e12,  # SXM; the PCIe card is lower (756e12)
    "nvidia h200": 989e12,
}


def attention_params(cfg: ModelConfig) -> int:
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size
    weights = D * N * H + 2 * D * K * H + N * H * D  # q, k, v, o
    biases = (N * H + 2 * K * H + D) if cfg.use_bias else 0
    return weights + biases


def ffn_weights(cfg: ModelConfig) -> int:
    """The kernels of one FFN (a dense MLP or one expert)."""
    n_in = 2 if cfg.gated else 1  # SwiGLU/GEGLU: gate and up; GELU/ReLU: up only
    return (n_in + 1) * cfg.d_model * cfg.d_ff


def mlp_params(cfg: ModelConfig) -> int:
    n_in = 2 if cfg.gated else 1
    return ffn_weights(cfg) + ((n_in * cfg.d_ff + cfg.d_model) if cfg.use_bias else 0)


def ffn_params(cfg: ModelConfig, layer: int, active: bool = False) -> int:
    """Layer ``layer``'s FFN: the dense MLP, or router + experts (+ shared expert).

    ``active``: what one token touches, its top_k experts instead of all E (GLaM §3).
    Experts have no biases (see ``MoEConfig``).
    """
    if not cfg.is_moe_layer(layer):
        return mlp_params(cfg)
    moe = cfg.moe
    experts = moe.top_k if active else moe.n_experts
    shared = mlp_params(cfg) if moe.shared_expert else 0
    return cfg.d_model * moe.n_experts + experts * ffn_weights(cfg) + shared


def norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.use_bias else 1)


def count_params(cfg: ModelConfig, active: bool = False) -> int:
    """Number of parameters of ``Transformer(cfg)``, computed analytically.

    ``active``: the parameters one token uses, which differ from the total only for a
    mixture of experts (its top_k experts, the router and everything dense).
    """
    norms_per_block = 1 if cfg.block == "parallel" else 2  # PaLM's parallel block shares one
    block = attention_params(cfg) + norms_per_block * norm_params(cfg)
    ffns = sum(ffn_params(cfg, i, active) for i in range(cfg.n_layers))
    return embedding_params(cfg) + cfg.n_layers * block + ffns + norm_params(cfg)


def embedding_params(cfg: ModelConfig) -> int:
    """The token embedding (and an untied output layer) and position tables: what Kaplan
    et al. 2020 (§2.1) leave out of N, whose power laws are cleaner without them."""
    embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    position = {"learned": cfg.max_seq_len * cfg.d_model,
                "relative": cfg.relative_buckets * cfg.n_heads}.get(cfg.position, 0)
    return embed + position


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token, PaLM Appendix B: 6N + 12·L·H·Q·T.

    6N counts the forward (2N) and backward (4N) matmuls with every parameter; the
    second term is attention's q·k and p·v products over a context of T tokens (L layers,
    H heads of size Q). Rematerialised recomputation is not counted (that is HFU, not MFU).
    N includes the embedding, as in PaLM's own 46.2% calculation. For a mixture of experts
    N is the *active* count (GLaM §3): a token's FLOPs, not the model's size. The MoE's
    dispatch and combine (data movement, or GShard's one-hot einsums) are not model FLOPs.
    """
    T = cfg.max_seq_len if seq_len is None else seq_len
    return 6.0 * count_params(cfg, active=True) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_size * T


def mfu(tokens_per_second: float, cfg: ModelConfig, seq_len: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware's peak FLOP/s."""
    return tokens_per_second * flops_per_token(cfg, seq_len) / peak_flops


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str | None = None) -> int:
    """Bytes of K and V cached per generated token: 2·L·K·H·bytes (PaLM §2, multi-query)."""
    itemsize = jnp.dtype(dtype or cfg.dtype).itemsize
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_size * itemsize


def device_peak_flops(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s of one device from its ``jax.Device.device_kind``; None if unknown."""
    kind = device_kind.lower()
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(name):
            return PEAK_FLOPS[name]
    return None
