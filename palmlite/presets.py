"""Named model sizes: the papers' tables and teaching sizes for a laptop CPU.

``presets.get(name)`` returns a validated ``ModelConfig``; ``presets.names()`` lists them.
Paper shapes come from PaLM Table 1, Gopher Table 1, GPT-2 (Radford et al. 2019) and
GLaM Table 1. ``dense_twin`` / ``moe_twin`` convert between an MoE and the dense model with
the same FLOPs per token.
"""

from __future__ import annotations

from palmlite.config import ModelConfig, MoEConfig, RetroConfig

# PaLM §2: SwiGLU, parallel blocks, multi-query, RoPE, tied embeddings, no biases,
# 256k vocabulary, head size 256 at every scale, d_ff = 4 d_model, 2048 context.
PALM = dict(vocab_size=256_000, n_kv_heads=1, head_dim=256, max_seq_len=2048, norm="layernorm",
            activation="swiglu", block="parallel", position="rope", tie_embeddings=True,
            use_bias=False)
# Gopher §2: RMSNorm, relative positions, 32k vocabulary, serial blocks, GELU MLP of 4 d_model.
GOPHER = dict(vocab_size=32_000, max_seq_len=2048, norm="rmsnorm", activation="gelu",
              block="serial", position="relative", tie_embeddings=True, use_bias=False)
# GPT-2: learned positions, GELU, serial, LayerNorm with biases everywhere, tied, 1024 context.
GPT2 = dict(vocab_size=50_257, max_seq_len=1024, norm="layernorm", activation="gelu",
            block="serial", position="learned", tie_embeddings=True, use_bias=True)
# GLaM §3/§4: the FFN of every other layer is a top-2 MoE of 64 experts, GEGLU FFNs
# (gated GELU), relative position biases, 256k SentencePiece vocabulary, 1024 context,
# serial blocks, multi-head attention. Not in our notes (GLaM inherits them from
# GShard/Lingvo; treat as guesses): LayerNorm without biases, tied embeddings. GLaM's
# relative bias is per layer; palmlite's is one T5 table shared by all layers.
GLAM = dict(vocab_size=256_000, max_seq_len=1024, norm="layernorm", activation="geglu",
            block="serial", position="relative", tie_embeddings=True, use_bias=False,
            moe=MoEConfig(n_experts=64, top_k=2, every=2))
# RETRO Table 2's 172M model: Gopher's architecture at 12 layers, width 896, 16 heads of 64,
# d_ff 3584, a 128k SentencePiece vocabulary (RETRO §2.1), 2048 tokens; retrieval: chunks of
# 64, 2 neighbours with continuations, CCA at layers 6, 9, 12 (Table 10), a 2-layer encoder
# of width 896. palmlite counts 121M + 38.5M non-embedding parameters where the paper says
# 132M -> 172M: Gopher's Transformer-XL attention has a D x (heads x 64) relative-position
# projection per layer that palmlite's T5-style bias replaces (tests/test_retro.py).
_RETRO_BASE = dict(GOPHER, vocab_size=128_000, n_layers=12, n_heads=16, n_kv_heads=16,
                   head_dim=64, d_model=896, d_ff=3584)
# Teaching sizes: PaLM's toggles (the ModelConfig defaults), small enough for a laptop CPU.
TEACHING = dict(vocab_size=8192, n_kv_heads=1, norm="rmsnorm")


def _palm(n_layers, n_heads, d_model):
    return dict(PALM, n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_ff=4 * d_model)


def _gopher(n_layers, n_heads, head_dim, d_model):
    return dict(GOPHER, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                head_dim=head_dim, d_model=d_model, d_ff=4 * d_model)


def _gpt2(n_layers, n_heads, d_model):
    return dict(GPT2, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads, d_model=d_model,
                d_ff=4 * d_model)


def _glam(n_layers, n_heads, d_model, d_ff):
    return dict(GLAM, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads, d_model=d_model,
                d_ff=d_ff)


def _teaching(n_layers, n_heads, d_model, max_seq_len):
    return dict(TEACHING, n_layers=n_layers, n_heads=n_heads, d_model=d_model,
                d_ff=4 * d_model, max_seq_len=max_seq_len)


_PRESETS: dict[str, dict] = {
    "tiny": _teaching(2, 4, 64, 128),
    "small": _teaching(4, 4, 128, 256),
    "medium": _teaching(6, 8, 256, 256),
    "large": _teaching(8, 8, 512, 512),
    "palm-8b": _palm(32, 16, 4096),
    "palm-62b": _palm(64, 32, 8192),
    "palm-540b": _palm(118, 48, 18432),
    "gopher-44m": _gopher(8, 16, 32, 512),
    "gopher-117m": _gopher(12, 12, 64, 768),
    "gopher-417m": _gopher(12, 12, 128, 1536),
    "gopher-1.4b": _gopher(24, 16, 128, 2048),
    "gopher-7.1b": _gopher(32, 32, 128, 4096),
    "gopher-280b": _gopher(80, 128, 128, 16384),
    "gpt2-124m": _gpt2(12, 12, 768),
    "gpt2-350m": _gpt2(24, 16, 1024),
    "gpt2-774m": _gpt2(36, 20, 1280),
    "gpt2-1.5b": _gpt2(48, 25, 1600),
    # GLaM's "B/E" names: the dense base model's size / the number of experts.
    "glam-0.1b-64e": _glam(12, 12, 768, 3072),
    "glam-1.7b-64e": _glam(24, 16, 2048, 8192),
    "glam-8b-64e": _glam(32, 32, 4096, 16384),
    "glam-64b-64e": _glam(64, 128, 8192, 32768),
    # Teaching MoEs: PaLM's toggles with GLaM's every-other-layer top-2 routing.
    "tiny-moe-4e": dict(_teaching(2, 4, 64, 128), moe=MoEConfig(n_experts=4, top_k=2, every=2)),
    "small-moe-8e": dict(_teaching(4, 4, 128, 256), moe=MoEConfig(n_experts=8, top_k=2, every=2)),
    "retro-132m": _RETRO_BASE,  # RETRO's baseline (no retrieval)
    "retro-172m": dict(_RETRO_BASE, retro=RetroConfig()),
    # A teaching RETRO: small's decoder, chunks of 32 tokens (4 per 128-token sequence), CCA
    # at layer 2 of 4 (RETRO's rule below 6 layers: one mid-depth layer), and a 2-layer
    # encoder of width 32: the encoder reads k·r / m = 4 neighbour tokens per decoder token,
    # so at the paper's own width it would cost ~3x the 4-layer decoder (RETRO's 2 encoder
    # layers against 12 decoder layers cost ~0.7x); at width 32 a step costs ~1.4x its
    # baseline's FLOPs (benchmarks/retro_step.py).
    # The notebook's and the quick study's RETRO: tiny's decoder with the same retrieval.
    "tiny-retro": dict(_teaching(2, 4, 64, 128), retro=RetroConfig(
        chunk_size=32, encoder_d_model=32)),
    "small-retro": dict(_teaching(4, 4, 128, 256), retro=RetroConfig(
        chunk_size=32, encoder_d_model=32)),
}


def names() -> list[str]:
    return list(_PRESETS)


def get(name: str, **overrides) -> ModelConfig:
    """The preset ``name`` (with optional field overrides), validated."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {names()}")
    return ModelConfig(**{**_PRESETS[name], **overrides})


def _ffn_scale(cfg: ModelConfig, moe: MoEConfig) -> float:
    """Active FFN width of the MoE model over that of its base: each MoE layer runs top_k
    experts (plus the shared one), each as wide as the base FFN."""
    n_moe = cfg.n_layers // moe.every
    return (cfg.n_layers + (moe.top_k + moe.shared_expert - 1) * n_moe) / cfg.n_layers


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """The dense model with (nearly) the FLOPs per token of the MoE ``cfg``.

    Every layer's d_ff grows so that the FFN FLOPs summed over layers match: with top-2
    on every other layer, d_ff x 1.5. Unmatched: the router's D·E per MoE layer (< 1% at
    any preset size) and d_ff's rounding to an integer.
    """
    return cfg.replace(moe=None, d_ff=round(cfg.d_ff * _ffn_scale(cfg, cfg.moe)))


def moe_twin(cfg: ModelConfig, n_experts: int, top_k: int = 2, every: int = 2,
             **moe_fields) -> ModelConfig:
    """The MoE with (nearly) the FLOPs per token of the dense ``cfg``: the inverse of
    ``dense_twin``, each expert as wide as d_ff / the active width ratio."""
    moe = MoEConfig(n_experts=n_experts, top_k=top_k, every=every, **moe_fields)
    return cfg.replace(moe=moe, d_ff=round(cfg.d_ff / _ffn_scale(cfg, moe)))
