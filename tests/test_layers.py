"""palmlite.layers: the dense layer's hand-written backward equals autodiff's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from palmlite import ModelConfig
from palmlite.layers import Dense, matmul


def grads(f, *args):
    """f's value and its gradients for a random output cotangent."""
    y, vjp = jax.vjp(f, *args)
    dy = jax.random.normal(jax.random.key(9), y.shape, y.dtype)
    return y, vjp(dy)


@pytest.mark.parametrize("shape_x, shape_w", [
    ((48, 8), (8, 24)),           # narrow input: the weight gradient transposes x
    ((48, 24), (24, 8)),          # narrow output: it transposes the output gradient
    ((3, 40, 16), (3, 16, 12)),   # batched over a leading axis
])
def test_matmul_gradients_equal_autodiff(shape_x, shape_w):
    kx, kw = jax.random.split(jax.random.key(0))
    x, w = jax.random.normal(kx, shape_x), jax.random.normal(kw, shape_w)
    y, (dx, dw) = grads(matmul, x, w)
    y_ref, (dx_ref, dw_ref) = grads(jnp.matmul, x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)
    assert dw.shape == w.shape and dx.shape == x.shape


def test_matmul_keeps_bfloat16():
    x = jnp.ones((16, 4), jnp.bfloat16)
    w = jnp.ones((4, 8), jnp.bfloat16)
    y, (dx, dw) = grads(matmul, x, w)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16


@pytest.mark.parametrize("in_shape, out_shape", [((12,), (4, 6)), ((4, 6), (12,)), ((12,), (20,))])
@pytest.mark.parametrize("use_bias", [False, True])
def test_dense_equals_tensordot(in_shape, out_shape, use_bias):
    """Dense flattens its multi-axis kernel (D -> N x H, N x H -> D) into one matmul: the
    same outputs and parameter gradients as contracting the trailing axes directly."""
    cfg = ModelConfig(vocab_size=16, d_model=12, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=20,
                      max_seq_len=8, use_bias=use_bias)
    layer = Dense(cfg, in_shape, out_shape, (None,) * len(in_shape), (None,) * len(out_shape),
                  rngs=nnx.Rngs(0))
    if use_bias:
        layer.bias[...] = jax.random.normal(jax.random.key(3), out_shape)
    x = jax.random.normal(jax.random.key(1), (2, 5, *in_shape))
    graphdef, params = nnx.split(layer)

    def reference(params, x):
        m = nnx.merge(graphdef, params)
        y = jnp.tensordot(x, m.kernel[...], len(in_shape))
        return y + m.bias[...] if use_bias else y

    y, (dp, dx) = grads(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
    y_ref, (dp_ref, dx_ref) = grads(reference, params, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(dp_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
