"""ModelConfig: every architectural choice of PaLM / Gopher / GPT-2 as one named field.

The config is the single source of truth: the model, the parameter and FLOP
accounting and the CLI all read it, and nothing else decides an architectural
choice. It validates itself on construction, before any JAX code runs, so a
typo costs a clear ``ValueError`` instead of a confusing trace.

How the model is trained (data, optimizer, schedule, precision) is ``TrainConfig``'s, in
``palmlite.train_config``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
BLOCKS = ("parallel", "serial")
POSITIONS = ("rope", "learned", "sinusoidal", "relative", "alibi", "none")
ABSOLUTE_POSITIONS = ("learned", "sinusoidal")  # added to the embeddings; the rest see offsets only
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("blocked", "xla", "cudnn")
REMATS = ("none", "full", "dots")
# MoEConfig's toggles (Pathways: one sparse model, many tasks). What the load-balancing loss
# averages over, and what the router sees: the token (Switch/GLaM), its domain alone
# (Task-MoE, Kudugunta et al. 2021), or a fixed domain -> experts map (the upper bound).
BALANCE_SCOPES = ("batch", "sequence")
ROUTINGS = ("token", "task", "fixed")
# Every string toggle of ModelConfig and its allowed values: the one list that validation,
# the tests and the notebooks read.
# Seeds are 32-bit: numpy's generators and jax.random.key take any of them (and no larger).
MAX_SEED = 2**32 - 1
TOGGLES = {"norm": NORMS, "activation": ACTIVATIONS, "block": BLOCKS, "position": POSITIONS,
           "dtype": DTYPES, "param_dtype": DTYPES, "attention_impl": ATTENTION_IMPLS,
           "remat": REMATS}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """A GLaM / Switch mixture of experts replacing the FFN of every ``every``-th layer.

    The MoE layers are those with index i where (i + 1) % every == 0: with GLaM's
    every=2 the 2nd, 4th, ... layers are sparse and the first layer stays dense (GLaM §3);
    every=1 makes every layer an MoE (Switch). ``capacity_factor`` also picks the dispatch:
    a float is GShard's fixed-capacity einsum (tokens over an expert's capacity skip it and
    ride the residual), None is dropless (tokens sorted by expert, one grouped matmul).
    Experts use the model's activation toggle and, like Switch's T5 experts, no biases.
    """

    n_experts: int = 8  # E; GLaM: 64
    top_k: int = 2  # experts per token: 1 Switch, 2 GLaM/GShard
    every: int = 2  # GLaM: every other FFN is an MoE
    capacity_factor: float | None = 1.25  # C = ceil(k·tokens/E · factor); None: dropless
    # Tokens per routing group, over which capacity is shared (GShard's G). None: each
    # sequence is a group (GShard's one-hot einsum). A number: groups of that many tokens
    # (several sequences; a call with fewer tokens is one group), dispatched by scatter and
    # gather, whose cost does not grow with the group: larger groups drop fewer tokens.
    group_size: int | None = None
    aux_loss_coef: float = 0.01  # Switch §2.2 load balancing α (GLaM also 0.01)
    router_z_loss_coef: float = 1e-3  # ST-MoE §3.1
    router_init_scale: float = 0.1  # Switch §2.4: router init 10x smaller than the default
    shared_expert: bool = False  # a dense FFN every token also goes through (DeepSeekMoE)
    # Switch §2.2's f_i and P_i averaged over each call's whole batch ("batch": domains can
    # specialise, the batch as a whole is balanced) or over each sequence ("sequence": every
    # sequence must spread its tokens, so a one-domain sequence cannot keep to a few experts).
    balance_scope: str = "batch"
    # "token": the router reads each token (Switch, GLaM). "task": it reads the sequence's
    # domain alone, a learned n_domains x E logit table (Task-MoE §3), so every token of a
    # domain shares its experts. "fixed": domain d always uses experts d·top_k .. d·top_k +
    # top_k - 1 with equal gates (no router: the specialisation upper bound).
    routing: str = "token"
    n_domains: int | None = None  # domains the "task" and "fixed" routers know (a mix: corpus)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        req = lambda ok, name, allowed: _require(ok, name, getattr(self, name), allowed, "MoEConfig")
        for f in dataclasses.fields(self):
            _check_type(f, getattr(self, f.name), "MoEConfig")
        for name in ("n_experts", "top_k", "every"):
            req(getattr(self, name) > 0, name, "a positive integer")
        req(self.top_k <= self.n_experts, "top_k", f"at most n_experts={self.n_experts}")
        req(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor",
            "a positive number or None (dropless)")
        req(self.group_size is None or self.group_size > 0, "group_size",
            "a positive number of tokens or None (one group per sequence)")
        req(self.group_size is None or self.capacity_factor is not None, "group_size",
            "None when capacity_factor is None (dropless routing has no groups)")
        for name in ("aux_loss_coef", "router_z_loss_coef"):
            req(getattr(self, name) >= 0, name, "a number >= 0")
        req(self.router_init_scale > 0, "router_init_scale", "a positive number")
        req(self.balance_scope in BALANCE_SCOPES, "balance_scope", f"one of {BALANCE_SCOPES}")
        req(self.routing in ROUTINGS, "routing", f"one of {ROUTINGS}")
        by_domain = self.routing != "token"
        req(self.n_domains is None or self.n_domains > 0, "n_domains", "a positive integer or None")
        req(self.n_domains is not None or not by_domain, "n_domains",
            f"the number of domains when routing={self.routing!r} (a positive integer)")
        req(self.routing != "fixed" or self.n_domains * self.top_k <= self.n_experts, "n_domains",
            f"at most n_experts / top_k = {self.n_experts // self.top_k} with routing='fixed' "
            "(each domain gets top_k experts of its own)")

    def replace(self, **changes: Any) -> "MoEConfig":
        return _replace(self, changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoEConfig":
        return cls().replace(**d)


@dataclasses.dataclass(frozen=True)
class RetroConfig:
    """RETRO (Borgeaud et al. 2021): the decoder reads neighbours retrieved for each chunk.

    The sequence is cut into chunks of ``chunk_size`` tokens; each chunk's ``n_neighbours``
    nearest database chunks (with their continuations) are encoded by a small bidirectional
    encoder and read by chunked cross-attention (CCA) in ``cca_layers``, causally: the
    tokens from the last one of chunk u to the last but one of chunk u+1 read chunk u's
    neighbours (RETRO §2.4). ``palmlite.retro`` is the model side, ``palmlite.retrieval``
    the database.
    """

    chunk_size: int = 64  # m; RETRO §2.1: 64-token chunks (must divide the sequence length)
    n_neighbours: int = 2  # k neighbours per chunk; RETRO trains with 2 (§4)
    continuation: bool = True  # a neighbour is its chunk + the next m tokens (r = 2m), Table 13
    # The decoder layers with CCA, counted from 1 as in RETRO's Table 10; None: RETRO's rule,
    # every 3rd layer from the 6th (9th beyond 15 layers), one mid-depth layer if fewer than 6.
    cca_layers: tuple[int, ...] | None = None
    encoder_layers: int = 2  # RETRO §2.3: a 2-layer bidirectional encoder
    encoder_d_model: int | None = None  # encoder width; None: the decoder's (RETRO: 896 both)
    encoder_d_ff: int | None = None  # encoder FFN width; None: the decoder's d_ff ratio
    shared_embeddings: bool = False  # the encoder reads the decoder's token embedding (Table 13)
    query_conditioning: bool = True  # the encoder attends to its chunk's decoder activations

    def __post_init__(self):
        if isinstance(self.cca_layers, list):  # from JSON
            object.__setattr__(self, "cca_layers", tuple(self.cca_layers))
        self.validate()

    @property
    def neighbour_len(self) -> int:
        """r: tokens per neighbour, its chunk and (with ``continuation``) the next chunk."""
        return self.chunk_size * (2 if self.continuation else 1)

    def validate(self) -> None:
        req = lambda ok, name, allowed: _require(ok, name, getattr(self, name), allowed,
                                                 "RetroConfig")
        for f in dataclasses.fields(self):
            _check_type(f, getattr(self, f.name), "RetroConfig")
        for name in ("chunk_size", "n_neighbours", "encoder_layers"):
            req(getattr(self, name) > 0, name, "a positive integer")
        for name in ("encoder_d_model", "encoder_d_ff"):
            req(getattr(self, name) is None or getattr(self, name) > 0, name,
                "a positive integer or None (the decoder's)")
        layers = self.cca_layers
        req(layers is None or (len(layers) > 0 and all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers) and
            list(layers) == sorted(set(layers))), "cca_layers",
            "None or a non-empty increasing tuple of layer numbers (from 1)")

    def layers(self, n_layers: int) -> tuple[int, ...]:
        """The CCA layers (from 1) of an ``n_layers`` decoder: ``cca_layers`` or RETRO's rule."""
        if self.cca_layers is not None:
            return self.cca_layers
        if n_layers < 6:  # Table 13: one CCA layer mid-depth is nearly as good (0.823 vs 0.822)
            return ((n_layers + 1) // 2,)
        return tuple(range(6 if n_layers <= 15 else 9, n_layers + 1, 3))  # Table 10

    def replace(self, **changes: Any) -> "RetroConfig":
        return _replace(self, changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RetroConfig":
        return cls().replace(**d)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only Transformer. The defaults are PaLM's choices at a laptop size.

    ``position="relative"`` is a learned, bucketed per-head bias on the attention
    logits (T5-style, one table shared by all layers): the relative-position family
    that Gopher (Transformer-XL style) and GLaM used instead of absolute positions.

    Init: kernels N(0, init_scale² / fan_in), residual-branch outputs further scaled by
    1/sqrt(2 n_layers) (GPT-2 §2.3); embeddings N(0, embed_init_std²), and the output layer
    (tied or not) likewise, so the loss at init is ≈ ln(vocab_size). PaLM §2 instead draws
    embeddings from N(0, 1) and scales tied logits by 1/sqrt(d_model): the same logits at
    init for d_model ≈ 2500, but under Adam the output layer then learns markedly more
    slowly in the short runs a laptop affords, so palmlite does not use that scale.
    """

    vocab_size: int = 8192  # tokenizer size; PaLM 256k, Gopher 32k
    d_model: int = 128  # width of the residual stream
    n_layers: int = 4  # number of Transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 1  # key/value heads: == n_heads MHA, 1 multi-query (PaLM §2), else grouped
    head_dim: int | None = None  # None -> d_model // n_heads; PaLM fixes 256 at every size
    d_ff: int = 512  # hidden width of the MLP; PaLM and GPT-2 use 4 * d_model
    max_seq_len: int = 256  # longest sequence (size of learned position table)
    norm: str = "rmsnorm"  # "rmsnorm" (Gopher §2) | "layernorm" (GPT-2, PaLM)
    activation: str = "swiglu"  # "swiglu" (PaLM §2) | "geglu" | "gelu" (GPT-2) | "relu"
    block: str = "parallel"  # "parallel" attn+MLP from one norm (PaLM §2) | "serial"
    position: str = "rope"  # "rope" (PaLM) | "learned" (GPT-2) | "sinusoidal" | "relative" | "alibi" | "none"
    tie_embeddings: bool = True  # share input and output embedding (PaLM §2)
    use_bias: bool = False  # biases in dense kernels and norms; PaLM: none
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of parameters
    rope_theta: float = 10000.0  # RoPE base wavelength (Su et al. 2021)
    norm_eps: float = 1e-6  # epsilon inside RMSNorm / LayerNorm
    relative_buckets: int = 32  # buckets of the relative bias (T5 default)
    relative_max_distance: int = 128  # distance from which all offsets share one bucket
    embed_init_std: float = 0.02  # GPT-2's 0.02 (PaLM's N(0,1): see the class docstring)
    init_scale: float = 1.0  # multiplies the fan-in (1/sqrt(fan_in)) std of every kernel
    moe: MoEConfig | None = None  # GLaM: mixture-of-experts FFNs (None: dense)
    retro: RetroConfig | None = None  # RETRO: retrieval and chunked cross-attention (None: off)
    # "blocked" (query blocks skip the keys after them; fastest on CPU) | "xla" (JAX's
    # dot_product_attention) | "cudnn" (fused flash attention, NVIDIA GPUs, 16-bit)
    attention_impl: str = "blocked"
    attention_block: int = 64  # queries per block of attention_impl="blocked" (T <= it: one block)
    remat: str = "none"  # recompute in the backward: "none" | "full" (each block) | "dots" (all but matmuls)

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------
    @property
    def head_size(self) -> int:
        """The resolved head dimension (``head_dim`` or ``d_model // n_heads``)."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def gated(self) -> bool:
        """SwiGLU/GEGLU have a third (gate) matrix in the MLP."""
        return self.activation in GATED_ACTIVATIONS

    # ---- validation ----------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field, its value and what is allowed."""
        for f in dataclasses.fields(self):
            _check_type(f, getattr(self, f.name))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                     "d_ff", "max_seq_len", "relative_buckets", "relative_max_distance"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        if self.head_dim is not None:
            _require(self.head_dim > 0, "head_dim", self.head_dim, "a positive integer or None")
        for name in ("rope_theta", "norm_eps", "init_scale"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "a positive number")
        _require(self.embed_init_std >= 0, "embed_init_std", self.embed_init_std, "a number >= 0")
        for name, allowed in TOGGLES.items():
            _require(getattr(self, name) in allowed, name, getattr(self, name), f"one of {allowed}")
        _require(self.n_kv_heads <= self.n_heads and self.n_heads % self.n_kv_heads == 0,
                 "n_kv_heads", self.n_kv_heads,
                 f"a divisor of n_heads={self.n_heads} (n_heads for MHA, 1 for multi-query)")
        if self.head_dim is None:
            _require(self.d_model % self.n_heads == 0, "n_heads", self.n_heads,
                     f"a divisor of d_model={self.d_model} when head_dim is None")
        if self.position == "rope":
            _require(self.head_size % 2 == 0, "head_dim", self.head_size,
                     "an even head size with position='rope' (rotation acts on pairs)")
        if self.position == "sinusoidal":
            _require(self.d_model % 2 == 0, "d_model", self.d_model,
                     "an even width with position='sinusoidal' (sin/cos pairs)")
        if self.attention_impl == "cudnn":
            _require(self.dtype != "float32", "attention_impl", self.attention_impl,
                     "'blocked' or 'xla' with dtype='float32' (cuDNN's fused attention needs "
                     "bfloat16/float16)")
        _require(self.attention_block >= 1, "attention_block", self.attention_block,
                 "a positive number of queries per block")
        if self.moe is not None:
            _require(self.moe.every <= self.n_layers, "moe", self.moe,
                     f"every <= n_layers={self.n_layers} (else no layer is an MoE)")
        if self.retro is not None:
            self._validate_retro()
        if self.position == "relative":
            _require(self.relative_buckets >= 2, "relative_buckets", self.relative_buckets,
                     "at least 2 (half exact offsets, half log-spaced)")
            _require(self.relative_max_distance > self.relative_buckets // 2,
                     "relative_max_distance", self.relative_max_distance,
                     f"more than relative_buckets // 2 = {self.relative_buckets // 2}")

    def _validate_retro(self) -> None:
        retro, L = self.retro, self.n_layers
        _require(all(1 <= i <= L for i in retro.layers(L)), "retro.cca_layers",
                 retro.cca_layers, f"layers within 1..n_layers={L}")
        _require(self.head_size % 2 == 0, "head_dim", self.head_size,
                 "an even head size with retro (its cross-attention rotates pairs: RoPE)")
        if retro.shared_embeddings:
            _require(retro.encoder_d_model in (None, self.d_model), "retro.encoder_d_model",
                     retro.encoder_d_model, f"None or d_model={self.d_model} with "
                     "retro.shared_embeddings=True")

    def is_cca_layer(self, i: int) -> bool:
        """Whether layer i (from 0, like ``is_moe_layer``) has chunked cross-attention."""
        return self.retro is not None and i + 1 in self.retro.layers(self.n_layers)

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i's FFN is a mixture of experts (see ``MoEConfig``)."""
        return self.moe is not None and (i + 1) % self.moe.every == 0

    # ---- copies and serialisation --------------------------------------------------
    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with ``changes`` applied; unknown names raise ``ValueError``."""
        return _replace(self, changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of ``to_dict``; unknown keys raise ``ValueError`` listing the valid ones."""
        if isinstance(d.get("moe"), dict):
            d = {**d, "moe": MoEConfig.from_dict(d["moe"])}
        if isinstance(d.get("retro"), dict):
            d = {**d, "retro": RetroConfig.from_dict(d["retro"])}
        return cls().replace(**d)


def _require(ok: bool, name: str, value: Any, allowed: str, owner: str = "ModelConfig") -> None:
    if not ok:
        raise ValueError(f"{owner}.{name}={value!r} is invalid: expected {allowed}")


_TYPES = {"int": (int,), "int | None": (int, type(None)), "float": (int, float), "bool": (bool,),
          "str": (str,), "str | None": (str, type(None)), "float | None": (int, float, type(None)),
          "MoEConfig | None": (MoEConfig, type(None)),
          "RetroConfig | None": (RetroConfig, type(None)),
          "tuple[int, ...] | None": (tuple, type(None))}


def _check_type(f: dataclasses.Field, value: Any, owner: str = "ModelConfig") -> None:
    """Type-check one field: ``True`` is not an int and ``2.5`` is not a layer count."""
    allowed = _TYPES[f.type]
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if ok and isinstance(value, float):
        ok = math.isfinite(value)
    _require(ok, f.name, value, f"a finite value of type {f.type}", owner)


def _replace(cfg, changes: dict[str, Any]):
    names = [f.name for f in dataclasses.fields(cfg)]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise ValueError(f"{type(cfg).__name__} has no field(s) {unknown}; valid fields: {names}")
    return dataclasses.replace(cfg, **changes)
