import jax
import jax.numpy as jnp
import numpy as np
import pytest

from palmlite import cross_entropy_and_z_loss


def test_cross_entropy_and_z_loss_match_their_definitions():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11)) * 3
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    ce, z = cross_entropy_and_z_loss(logits, targets)
    logp = np.asarray(jax.nn.log_softmax(logits))
    expected_ce = -np.mean(np.take_along_axis(logp, np.asarray(targets)[..., None], -1))
    log_z = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
    np.testing.assert_allclose(ce, expected_ce, rtol=1e-5)
    np.testing.assert_allclose(z, np.mean(log_z**2), rtol=1e-5)


def test_mask_excludes_tokens():
    logits = jax.random.normal(jax.random.key(0), (1, 4, 7))
    targets = jnp.array([[1, 2, 3, 4]])
    mask = jnp.array([[1, 1, 0, 0]])
    ce_masked, _ = cross_entropy_and_z_loss(logits, targets, mask)
    ce_first_two, _ = cross_entropy_and_z_loss(logits[:, :2], targets[:, :2])
    np.testing.assert_allclose(ce_masked, ce_first_two, rtol=1e-6)


def test_z_loss_is_zero_when_the_normaliser_is_one():
    """PaLM §5: log Z = 0 exactly when the logits are already log-probabilities."""
    logits = jax.nn.log_softmax(jax.random.normal(jax.random.key(2), (3, 6, 9)))
    _, z = cross_entropy_and_z_loss(logits, jnp.zeros((3, 6), jnp.int32))
    assert float(z) < 1e-10


def test_an_out_of_range_target_is_an_error_eagerly_and_nan_under_jit():
    """Issue 13, item 12: documented contract: eager calls check targets, jit does not."""
    logits = jnp.zeros((1, 2, 8))
    with pytest.raises(ValueError, match="target id out of range: values from 1 to 8"):
        cross_entropy_and_z_loss(logits, jnp.array([[1, 8]]))
    ce, _ = jax.jit(cross_entropy_and_z_loss)(logits, jnp.array([[1, 8]]))
    assert jnp.isnan(ce)
