import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from palmlite import ModelConfig, Transformer, cross_entropy_and_z_loss, presets
from palmlite.config import ABSOLUTE_POSITIONS, ACTIVATIONS, BLOCKS, NORMS, POSITIONS, REMATS

SMALL = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
             max_seq_len=16)
LOGICAL_AXES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", None}


def build(seed=0, **changes):
    return Transformer(ModelConfig(**{**SMALL, **changes}), rngs=nnx.Rngs(seed))


def tokens(seed=0, shape=(2, 12), vocab=SMALL["vocab_size"]):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("position", POSITIONS)
def test_causality(position, block):
    """Changing token t never changes the logits before t (and does change them at t)."""
    model = build(position=position, block=block)
    x = tokens()
    base = model(x)
    for t in (0, 5, 11):
        changed = x.at[:, t].set((x[:, t] + 1) % SMALL["vocab_size"])
        out = model(changed)
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t], base[:, t])


TOGGLES = ([("norm", v) for v in NORMS] + [("activation", v) for v in ACTIVATIONS]
           + [("block", v) for v in BLOCKS] + [("position", v) for v in POSITIONS]
           + [("tie_embeddings", v) for v in (True, False)] + [("use_bias", v) for v in (True, False)]
           + [("n_kv_heads", v) for v in (1, 2, 4)] + [("dtype", "bfloat16"),
                                                     ("param_dtype", "bfloat16")])


@pytest.mark.parametrize("field,value", TOGGLES, ids=[f"{f}={v}" for f, v in TOGGLES])
def test_every_toggle_runs_forward_and_backward_with_finite_results(field, value):
    model = build(**{field: value})
    x = tokens()

    def loss_fn(m):
        ce, z = cross_entropy_and_z_loss(m(x[:, :-1]), x[:, 1:])
        return ce + 1e-4 * z

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    assert model(x).dtype == jnp.float32 and model(x).shape == (2, 12, SMALL["vocab_size"])
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.abs(g.astype(jnp.float32)).sum()) > 0 for g in leaves) == len(leaves)


def test_compute_and_parameter_dtypes():
    model = build(dtype="bfloat16", param_dtype="float32")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert model(tokens()).dtype == jnp.float32  # logits always float32
    model = build(param_dtype="bfloat16")
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_loss_at_init_is_close_to_log_vocab():
    for tie in (True, False):
        model = build(vocab_size=512, tie_embeddings=tie)
        x = tokens(shape=(4, 16), vocab=512)
        ce, _ = cross_entropy_and_z_loss(model(x[:, :-1]), x[:, 1:])
        assert abs(float(ce) - math.log(512)) < 0.15, (tie, float(ce))


def test_determinism_for_a_fixed_seed():
    x = tokens()
    np.testing.assert_array_equal(build(seed=3)(x), build(seed=3)(x))
    assert not np.allclose(build(seed=3)(x), build(seed=4)(x))


def test_every_parameter_carries_logical_axis_names():
    model = build(position="relative", use_bias=True, norm="layernorm", tie_embeddings=False)
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = param.get_metadata()["out_sharding"]
        assert len(axes) == param[...].ndim, path
        assert set(axes) <= LOGICAL_AXES, path
    kernel = model.blocks[0].attn.k.kernel
    assert kernel.get_metadata()["out_sharding"] == ("embed", "kv_heads", "head_dim")


def _copy_with_repeated_kv(gqa: Transformer, mha: Transformer) -> None:
    """Give ``mha`` gqa's weights, each shared K/V head repeated for its group of queries."""
    state = nnx.state(gqa, nnx.Param)
    group = mha.cfg.n_heads // gqa.cfg.n_kv_heads
    for i in range(gqa.cfg.n_layers):
        for name in ("k", "v"):
            kernel = state["blocks"][i]["attn"][name]["kernel"]
            kernel.set_value(jnp.repeat(kernel[...], group, axis=1))
    nnx.update(mha, state)


@pytest.mark.parametrize("n_kv_heads", [1, 2])
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_grouped_and_multi_query_equal_mha_with_tied_kv_heads(n_kv_heads, position):
    """MQA/GQA is MHA whose K/V weights are shared across each group of query heads."""
    gqa = build(n_kv_heads=n_kv_heads, position=position)
    mha = build(seed=1, n_kv_heads=SMALL["n_heads"], position=position)
    _copy_with_repeated_kv(gqa, mha)
    x = tokens()
    np.testing.assert_allclose(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", [p for p in POSITIONS if p not in ABSOLUTE_POSITIONS])
def test_relative_schemes_are_invariant_to_a_shift_of_all_positions(position):
    """RoPE, relative bias and ALiBi see only offsets: shifting every position changes nothing."""
    model = build(position=position, max_seq_len=64)
    x = tokens()
    pos = jnp.broadcast_to(jnp.arange(12), x.shape)
    np.testing.assert_allclose(model(x, pos + 37), model(x, pos), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("position", POSITIONS)
def test_left_padding_leaves_the_real_tokens_logits_unchanged(position):
    """Without a cache too, a negative position is padding that no real query attends to:
    each left-padded row gives its real tokens the logits of the row alone, and the padding
    queries, which see no real key, stay finite."""
    model = build(position=position)
    x_BxT = tokens(shape=(3, 8))  # random padding tokens: attending to them would show
    pad_B = jnp.array([0, 3, 7])  # row 0 unpadded, row 2 a single real token
    positions_BxT = jnp.arange(8)[None, :] - pad_B[:, None]  # -pad .. -1, then 0, 1, ...
    padded_BxTxV = model(x_BxT, positions_BxT)
    assert bool(jnp.all(jnp.isfinite(padded_BxTxV)))
    for b, pad in enumerate(pad_B.tolist()):
        alone_1xTxV = model(x_BxT[b:b + 1, pad:])
        np.testing.assert_allclose(padded_BxTxV[b, pad:], alone_1xTxV[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ABSOLUTE_POSITIONS)
def test_absolute_schemes_depend_on_absolute_position(position):
    model = build(position=position, max_seq_len=64)
    x = tokens()
    pos = jnp.broadcast_to(jnp.arange(12), x.shape)
    assert not np.allclose(model(x, pos + 37), model(x, pos), atol=1e-3)


def test_parallel_and_serial_blocks_differ_with_the_same_weights():
    parallel = build(block="parallel")
    serial = build(block="serial")
    nnx.update(serial, nnx.state(parallel, nnx.Param))  # serial's extra mlp_norm stays at 1
    x = tokens()
    assert not np.allclose(parallel(x), serial(x), atol=1e-4)


def test_jit_compiles_once_per_shape():
    model = build()
    traces = []

    @nnx.jit
    def forward(m, x):
        traces.append(1)
        return m(x)

    for seed in range(3):
        forward(model, tokens(seed))
    assert len(traces) == 1


@pytest.mark.parametrize("remat", [r for r in REMATS if r != "none"])
def test_rematerialisation_changes_memory_not_gradients(remat):
    """jax.checkpoint recomputes the block in the backward: same loss, same gradients."""
    def loss_and_grads(model):
        def loss_fn(m):
            x = tokens(3)
            return cross_entropy_and_z_loss(m(x[:, :-1]), x[:, 1:])[0]
        return nnx.value_and_grad(loss_fn)(model)
    (l0, g0), (l1, g1) = loss_and_grads(build()), loss_and_grads(build(remat=remat))
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("position,n_kv_heads", [(p, 2) for p in POSITIONS] + [("rope", 1)])
def test_blocked_attention_equals_jax_attention(position, n_kv_heads):
    """attention_impl="blocked" (query blocks of 5 over T = 12: the last block is short)
    computes JAX's causal attention: same logits and gradients, with left padding too."""
    def loss_and_grads(model):
        x_BxT = tokens(3, shape=(3, 12))
        pos_BxT = jnp.arange(12)[None, :] - jnp.array([0, 4, 9])[:, None]
        def loss_fn(m):
            return cross_entropy_and_z_loss(m(x_BxT[:, :-1], pos_BxT[:, :-1]), x_BxT[:, 1:])[0]
        return nnx.value_and_grad(loss_fn)(model)
    common = dict(position=position, n_kv_heads=n_kv_heads)
    (l0, g0) = loss_and_grads(build(attention_impl="xla", **common))
    (l1, g1) = loss_and_grads(build(attention_impl="blocked", attention_block=5, **common))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)


@pytest.mark.parametrize("call,match", [
    (lambda m: m(jnp.full((1, 4), 64)), "token id out of range: values from 64 to 64, expected 0 .. 63"),
    (lambda m: m(jnp.array([[0, -1]])), "token id out of range"),
    (lambda m: m(jnp.zeros((1, 17), jnp.int32)), "longer than max_seq_len=16"),
    (lambda m: m(jnp.zeros((1, 4), jnp.int32), jnp.array([[0, 1, 2, 16]])), "position out of range"),
])
def test_eager_calls_refuse_ids_a_gather_would_clamp(call, match):
    """Issue 13, item 12: under jit an embedding lookup clamps an id >= its table's length
    (a silently wrong answer); an eager call checks, where it costs one reduction."""
    cfg = presets.get("tiny", vocab_size=64, position="learned", max_seq_len=16, n_layers=1)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        call(model)
    assert model(jnp.zeros((1, 4), jnp.int32), jnp.array([[-1, 0, 1, 15]])).shape == (1, 4, 64)
