"""The two building bricks every module uses: a dense (einsum) layer and a norm.

Every parameter is created here with its **logical axis names** (``vocab``, ``embed``,
``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``expert``) as ``out_sharding`` metadata, so a
device mesh can later shard the model by rules alone (``nnx.get_partition_spec``).
Parameters are stored in ``cfg.param_dtype`` and cast to ``cfg.dtype`` for compute.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from palmlite.config import ModelConfig


def check_ids(what: str, ids, limit: int) -> None:
    """Raise if integer ``ids`` fall outside [0, limit): checked on concrete arrays only
    (eager calls, where it costs one reduction); under jit nothing is checked, and JAX's
    gathers clamp an out-of-range index (an embedding lookup) or fill it with NaN (a
    target's log-probability): the contract is the caller's there."""
    if isinstance(ids, jax.core.Tracer):
        return
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= limit):
        raise ValueError(f"{what} out of range: values from {ids.min()} to {ids.max()}, "
                         f"expected 0 .. {limit - 1}")


def make_param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter annotated with logical axes (eager sharding off: no mesh needed here)."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def normal_param(rngs: nnx.Rngs, cfg: ModelConfig, shape: tuple[int, ...],
                 axes: tuple[str | None, ...], std: float) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.dtype(cfg.param_dtype))
    return make_param(value, axes)


@jax.custom_vjp
def matmul(x_xNxI: jax.Array, w_xIxO: jax.Array) -> jax.Array:
    """x · w over N rows (tokens), batched over any leading axes the two share, with the
    backward pass written out: the weight gradient transposes the narrower of x and the
    output gradient. Left to autodiff, XLA:CPU transposes the N x O output gradient, fused
    into the elementwise op that made it (a GELU's or SwiGLU's backward) at ~10 ns an
    element: a SwiGLU FFN's forward + backward at 2048 x 128 -> 512 took 42 ms that way
    and 14 ms this way (benchmarks/NOTES.md). The same products, so the
    same gradients (tests/test_layers.py)."""
    return x_xNxI @ w_xIxO


def _matmul_fwd(x_xNxI, w_xIxO):
    return x_xNxI @ w_xIxO, (x_xNxI, w_xIxO)


def _matmul_bwd(residuals, dy_xNxO):
    x_xNxI, w_xIxO = residuals
    T = lambda a: jnp.swapaxes(a, -1, -2)
    if x_xNxI.shape[-1] <= dy_xNxO.shape[-1]:
        dw_xIxO = T(x_xNxI) @ dy_xNxO
    else:
        dw_xIxO = T(T(dy_xNxO) @ x_xNxI)
    return dy_xNxO @ T(w_xIxO), dw_xIxO


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nnx.Module):
    """y = x · W (+ b), contracting the trailing ``in_shape`` dims of x.

    Kernels are multi-dimensional (e.g. D -> N x H for queries) so that heads are a
    real axis a mesh can split. Init: N(0, (init_scale * scale)^2 / fan_in).
    """

    def __init__(self, cfg: ModelConfig, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 in_axes: tuple[str, ...], out_axes: tuple[str, ...], *, rngs: nnx.Rngs,
                 scale: float = 1.0):
        self.n_in = len(in_shape)
        self.dtype = jnp.dtype(cfg.dtype)
        std = cfg.init_scale * scale / math.sqrt(math.prod(in_shape))
        self.kernel = normal_param(rngs, cfg, in_shape + out_shape, in_axes + out_axes, std)
        zeros = jnp.zeros(out_shape, jnp.dtype(cfg.param_dtype))
        self.bias = make_param(zeros, out_axes) if cfg.use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        in_shape, out_shape = kernel.shape[:self.n_in], kernel.shape[self.n_in:]
        rows = x.shape[:x.ndim - self.n_in]
        y_NxO = matmul(x.astype(self.dtype).reshape(math.prod(rows), math.prod(in_shape)),
                       kernel.reshape(math.prod(in_shape), math.prod(out_shape)))
        y = y_NxO.reshape(rows + out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Norm(nnx.Module):
    """RMSNorm (Gopher §2: rescale only) or LayerNorm (centre, then rescale); in float32."""

    def __init__(self, cfg: ModelConfig):
        self.kind, self.eps, self.dtype = cfg.norm, cfg.norm_eps, jnp.dtype(cfg.dtype)
        pdtype = jnp.dtype(cfg.param_dtype)
        self.scale = make_param(jnp.ones((cfg.d_model,), pdtype), ("embed",))
        # RMSNorm has no bias by definition; LayerNorm has one unless biases are off (PaLM).
        has_bias = cfg.norm == "layernorm" and cfg.use_bias
        self.bias = make_param(jnp.zeros((cfg.d_model,), pdtype), ("embed",)) if has_bias else None

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        x = x_BxTxD.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
        x = x * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(self.dtype)
