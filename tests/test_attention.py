import jax
import jax.numpy as jnp
import numpy as np

from palmlite.attention import (alibi_bias, alibi_slopes, apply_rope, padding_mask,
                                relative_bucket)


def test_rope_dot_product_depends_only_on_the_offset():
    """RoPE (Su et al. 2021): <R(m) q, R(n) k> is a function of m - n alone."""
    q = jax.random.normal(jax.random.key(0), (1, 1, 3, 16))
    k = jax.random.normal(jax.random.key(1), (1, 1, 3, 16))

    def score(m, n):
        qm = apply_rope(q, jnp.array([[m]]), 10000.0)
        kn = apply_rope(k, jnp.array([[n]]), 10000.0)
        return jnp.sum(qm * kn, -1)

    np.testing.assert_allclose(score(7, 3), score(107, 103), rtol=1e-4)
    np.testing.assert_allclose(score(0, 0), jnp.sum(q * k, -1), rtol=1e-5)
    assert not np.allclose(score(7, 3), score(7, 4))


def test_rope_is_a_rotation():
    x = jax.random.normal(jax.random.key(2), (2, 5, 4, 8))
    pos = jnp.broadcast_to(jnp.arange(5) * 13, (2, 5))
    y = apply_rope(x, pos, 10000.0)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_relative_buckets_exact_then_logarithmic():
    offsets = jnp.arange(300)
    b = relative_bucket(offsets, 32, 128)
    np.testing.assert_array_equal(b[:16], np.arange(16))  # half the buckets: exact offsets
    assert bool(jnp.all(jnp.diff(b) >= 0))  # monotone in distance
    assert int(b[64]) < 31 and bool(jnp.all(b[128:] == 31))  # saturates at max_distance
    assert int(relative_bucket(jnp.array(-5), 32, 128)) == 0  # future offsets (masked) clamp


def test_alibi_slopes_follow_press_et_al():
    """ALiBi (Press et al. 2022): 8 heads get slopes 1/2, 1/4, ..., 1/256."""
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    assert len(alibi_slopes(12)) == 12 and len(set(np.asarray(alibi_slopes(12)).tolist())) == 12
    pos = jnp.arange(4)[None]
    bias = alibi_bias(pos, pos, 8)
    assert bias.shape == (1, 8, 4, 4)
    np.testing.assert_allclose(bias[0, 0, 3], [-1.5, -1.0, -0.5, 0.0])


def test_padding_mask_hides_padding_keys_from_real_queries_only():
    """Two padding slots, then three tokens: on top of the causal mask, real queries see
    only real keys, and each padding query still sees a key (no empty softmax row)."""
    pos_1xT = jnp.array([[-2, -1, 0, 1, 2]])
    visible_TxS = np.asarray(padding_mask(pos_1xT)[0, 0] & np.tril(np.ones((5, 5), bool)))
    np.testing.assert_array_equal(visible_TxS[2:, :2], False)  # real query, padding key
    np.testing.assert_array_equal(visible_TxS[2:, 2:], np.tril(np.ones((3, 3), bool)))
    assert visible_TxS.any(axis=1).all()
