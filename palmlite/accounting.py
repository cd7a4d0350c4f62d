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
DEVICES_PER_CHIP = {"tpu v2": 2, "tpu v3": 2}  # JAX devices (TensorCores) per chip


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
    return router_params(cfg) + experts * ffn_weights(cfg) + shared


def router_params(cfg: ModelConfig) -> int:
    """One MoE layer's router: D x E reading tokens, Z x E reading the domain (Task-MoE; a
    table counted whole, like the embedding), none with a fixed map."""
    moe = cfg.moe
    return {"token": cfg.d_model, "task": moe.n_domains, "fixed": 0}[moe.routing] * moe.n_experts


def norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.use_bias else 1)


def cross_attention_params(cfg: ModelConfig, kv_width: int) -> int:
    """Queries from cfg.d_model, keys and values from ``kv_width`` (RETRO's CCA and encoder)."""
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size
    biases = (N * H + 2 * K * H + D) if cfg.use_bias else 0
    return D * N * H + 2 * kv_width * K * H + N * H * D + biases


def retro_params(cfg: ModelConfig) -> dict[str, int]:
    """RETRO's additions (``palmlite.retro``): the encoder's layers, its own embedding table
    (none when shared), and the CCA layers, each with its norm. Zero without ``cfg.retro``."""
    if cfg.retro is None:
        return dict(encoder=0, encoder_embedding=0, cca=0)
    from palmlite.retro import encoder_config  # the encoder's derived sizes
    ecfg, retro = encoder_config(cfg), cfg.retro
    W = ecfg.d_model
    layer = cross_attention_params(ecfg, W) + mlp_params(ecfg) + 2 * norm_params(ecfg)
    if retro.query_conditioning:  # cross-attention to the chunk's decoder activations
        layer += cross_attention_params(ecfg, cfg.d_model) + norm_params(ecfg)
    cca = cross_attention_params(cfg, W) + norm_params(cfg)
    return dict(encoder=retro.encoder_layers * layer + norm_params(ecfg),
                encoder_embedding=0 if retro.shared_embeddings else cfg.vocab_size * W,
                cca=len(retro.layers(cfg.n_layers)) * cca)


def count_params(cfg: ModelConfig, active: bool = False) -> int:
    """Number of parameters of ``Transformer(cfg)``, computed analytically.

    ``active``: the parameters one token uses, which differ from the total only for a
    mixture of experts (its top_k experts, the router and everything dense).
    """
    norms_per_block = 1 if cfg.block == "parallel" else 2  # PaLM's parallel block shares one
    block = attention_params(cfg) + norms_per_block * norm_params(cfg)
    ffns = sum(ffn_params(cfg, i, active) for i in range(cfg.n_layers))
    retro = retro_params(cfg)
    return embedding_params(cfg) + cfg.n_layers * block + ffns + norm_params(cfg) + \
        retro["encoder"] + retro["cca"]


def embedding_params(cfg: ModelConfig) -> int:
    """The token embedding (and an untied output layer) and position tables: what Kaplan
    et al. 2020 (§2.1) leave out of N, whose power laws are cleaner without them."""
    embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    position = {"learned": cfg.max_seq_len * cfg.d_model,
                "relative": cfg.relative_buckets * cfg.n_heads}.get(cfg.position, 0)
    return embed + position + retro_params(cfg)["encoder_embedding"]


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
    retro = retro_params(cfg)  # the encoder's FLOPs are counted per encoder token below
    decoder = 6.0 * (count_params(cfg, active=True) - retro["encoder"] -
                     retro["encoder_embedding"]) + \
        12.0 * cfg.n_layers * cfg.n_heads * cfg.head_size * T
    return decoder + retro_flops_per_token(cfg)


def retro_flops_per_token(cfg: ModelConfig) -> float:
    """RETRO's extra training FLOPs per decoder token, beyond its parameters' 6N (whose CCA
    share ``flops_per_token`` counts): each chunk of M tokens has J neighbours of R tokens,
    so the encoder's weights (6 FLOPs per weight and token, the lookup table excluded) see
    J·R / M encoder tokens per decoder token, except the keys and values of the chunk's
    decoder activations, projected once per chunk token; each encoder token attends to R
    neighbour tokens (and the chunk's M activations), and each decoder token to J·R encoded
    ones in every CCA layer: 12 FLOPs per query, key and head dimension, like self-attention."""
    if cfg.retro is None:
        return 0.0
    retro, NH = cfg.retro, cfg.n_heads * cfg.head_size
    M, J, R = retro.chunk_size, retro.n_neighbours, retro.neighbour_len
    per_chunk_token = 0.0
    if retro.query_conditioning:  # (D x K·H) keys and values, (K·H) biases, in every layer
        from palmlite.retro import encoder_config  # the encoder's derived sizes
        ecfg = encoder_config(cfg)
        KH = ecfg.n_kv_heads * ecfg.head_size
        per_chunk_token = 6.0 * retro.encoder_layers * 2 * KH * (cfg.d_model + ecfg.use_bias)
    per_encoder_token = 6.0 * retro_params(cfg)["encoder"] - per_chunk_token + \
        12.0 * retro.encoder_layers * NH * (R + (M if retro.query_conditioning else 0))
    cca_attention = 12.0 * len(retro.layers(cfg.n_layers)) * NH * J * R
    return J * R / M * per_encoder_token + per_chunk_token + cca_attention


def remat_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """The forward work ``cfg.remat`` recomputes in the backward pass, per token: what
    hardware FLOPs (HFU) add to model FLOPs (MFU; PaLM §4.1 and Appendix B).

    "dots" keeps every weight matmul's output and recomputes the attention products q·k and
    p·v (batched matmuls, which its policy does not save): 4·L·H·Q·T. "full" recomputes
    each block's forward: 2 FLOPs per active block weight plus those products, except each
    branch's last matmul (attention's output projection, the FFN's down projection), whose
    output the backward pass never reads, so XLA drops it. The textbook "6N becomes 8N"
    (HFU = 8/6 MFU) counts those too. The embedding, final norm and output layer are outside
    the blocks and never recomputed, and RETRO's encoder is not rematerialised."""
    if cfg.remat == "none":
        return 0.0
    T = cfg.max_seq_len if seq_len is None else seq_len
    attention_forward = 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_size * T
    if cfg.remat == "dots":
        return attention_forward
    retro = retro_params(cfg)
    blocks = count_params(cfg, active=True) - embedding_params(cfg) - norm_params(cfg) - \
        retro["encoder"]
    return 2.0 * (blocks - _branch_outputs(cfg)) + attention_forward


def _branch_outputs(cfg: ModelConfig) -> int:
    """Active weights of every block's last matmul per branch: attention's output projection
    and the down projection of the FFN (or of a token's top_k experts and a shared one)."""
    D, F, bias = cfg.d_model, cfg.d_ff, cfg.use_bias
    attention_out = cfg.n_heads * cfg.head_size * D + (D if bias else 0)
    mlp_down = F * D + (D if bias else 0)
    total = 0
    for i in range(cfg.n_layers):
        moe = cfg.moe if cfg.is_moe_layer(i) else None
        ffn_down = mlp_down if moe is None else \
            moe.top_k * F * D + (mlp_down if moe.shared_expert else 0)  # experts: no biases
        total += attention_out + ffn_down
    return total


def hardware_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Model FLOPs plus the rematerialisation's recomputation: what the chips execute."""
    return flops_per_token(cfg, seq_len) + remat_flops_per_token(cfg, seq_len)


def mfu(tokens_per_second: float, cfg: ModelConfig, seq_len: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware's peak FLOP/s."""
    return tokens_per_second * flops_per_token(cfg, seq_len) / peak_flops


def hfu(tokens_per_second: float, cfg: ModelConfig, seq_len: int, peak_flops: float) -> float:
    """Hardware FLOPs utilisation: the same with the recomputed FLOPs counted (PaLM reports
    57.8% HFU beside 46.2% MFU for 540B)."""
    return tokens_per_second * hardware_flops_per_token(cfg, seq_len) / peak_flops


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str | None = None) -> int:
    """Bytes of K and V cached per generated token: 2·L·K·H·bytes (PaLM §2, multi-query)."""
    itemsize = jnp.dtype(dtype or cfg.dtype).itemsize
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_size * itemsize


def device_peak_flops(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s of one JAX device from its ``device_kind``; None if unknown. A TPU v2
    or v3 chip is two JAX devices (one per TensorCore), so each gets half the chip's peak;
    from v4 on, a chip's cores are one device (megacore) and v5e/v6e have one core."""
    kind = device_kind.lower()
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(name):
            return PEAK_FLOPS[name] / DEVICES_PER_CHIP.get(name, 1)
    return None


def step_communication(cfg: ModelConfig, tokens_per_step: int, pods: int, data: int, model: int,
                       bytes_per_value: int = 2) -> dict[str, float]:
    """Bytes each chip sends per training step over each mesh axis, for PaLM's layout
    (§4): ``pods`` slices joined by data parallelism over the slower data-centre network,
    and inside each slice ``data``-way fully sharded data parallelism (FSDP) and
    ``model``-way tensor parallelism. Ring collectives: an all-gather or reduce-scatter of
    S bytes over n chips sends (n-1)/n·S per chip, an all-reduce twice that.

    - pod: the all-reduce of each chip's gradient shard, N / (data·model) values, across
      the pods (PaLM's cross-pod transfer).
    - data: gathering the chip's model-parallel slice of the weights, N / model values,
      before the forward and the backward (and again for a rematerialised forward), and
      reduce-scattering its gradient.
    - model: all-reducing the activations [tokens on the chip's data shard, d_model] after
      each block's attention and FFN (one fused all-reduce per parallel block in the
      forward, two in a serial one), forward and backward (and the recomputed forward).
    Estimates of volume, not of time: overlap and link speeds are the hardware's."""
    N = count_params(cfg)
    ring = lambda n: (n - 1) / n
    forwards = 2 if cfg.remat == "none" else 3  # forward, backward (, recomputed forward)
    weights_per_chip = N / model * bytes_per_value
    tokens_per_chip = tokens_per_step / (pods * data)
    reduces = (1 if cfg.block == "parallel" else 2) * cfg.n_layers * forwards
    return {"pod": 2 * ring(pods) * N / (data * model) * bytes_per_value,
            "data": ring(data) * weights_per_chip * (forwards + 1),
            "model": 2 * ring(model) * reduces * tokens_per_chip * cfg.d_model * bytes_per_value}
