import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from palmlite import ModelConfig, Transformer, kv_cache_bytes_per_token
from palmlite.attention import init_cache
from palmlite.config import BLOCKS, POSITIONS
from palmlite.generate import generate, generate_tokens, sample
from palmlite.tokenizer import ByteTokenizer

SMALL = dict(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
             max_seq_len=32)


def build(seed=0, **changes):
    return Transformer(ModelConfig(**{**SMALL, **changes}), rngs=nnx.Rngs(seed))


# Each position scheme once; every n_kv_heads (MQA, GQA, MHA) and block type at least twice.
SCHEMES = [(position, (1, 2, 4)[i % 3], BLOCKS[i % len(BLOCKS)])
           for i, position in enumerate(POSITIONS)]


@pytest.mark.parametrize("position,n_kv_heads,block", SCHEMES)
def test_cached_decoding_reproduces_the_full_forward(position, n_kv_heads, block):
    """Teacher forcing: a prompt, a chunk of two, then one token, into a cache of 10 slots."""
    model = build(position=position, n_kv_heads=n_kv_heads, block=block)
    x_BxT = jax.random.randint(jax.random.key(1), (2, 8), 0, SMALL["vocab_size"])

    @nnx.jit
    def full_and_incremental(model, x_BxT):
        cache, pieces = init_cache(model.cfg, 2, 10), []
        for start, stop in [(0, 5), (5, 7), (7, 8)]:
            logits_BxTxV, cache = model(x_BxT[:, start:stop], cache=cache)
            pieces.append(logits_BxTxV)
        return model(x_BxT), jnp.concatenate(pieces, axis=1), cache.length

    full, incremental, length = full_and_incremental(model, x_BxT)
    np.testing.assert_allclose(incremental, full, rtol=1e-5, atol=1e-5)
    assert int(length) == 8


def test_the_multi_query_cache_is_n_heads_times_smaller():
    """PaLM §2: K/V with one head instead of n_heads; real arrays, not just the formula."""
    sizes = {}
    for n_kv_heads in (1, 2, 4):
        cfg = ModelConfig(**{**SMALL, "n_kv_heads": n_kv_heads})
        cache = init_cache(cfg, batch=3, max_len=20)
        assert cache.k[0].shape == (3, 20, n_kv_heads, cfg.head_size)
        assert cache.nbytes == 3 * 20 * kv_cache_bytes_per_token(cfg)
        assert init_cache(cfg, 3, 20, "bfloat16").nbytes == cache.nbytes // 2
        sizes[n_kv_heads] = cache.nbytes
    assert sizes[4] == SMALL["n_heads"] * sizes[1] == 2 * sizes[2]


def test_top_k_and_nucleus_keep_the_right_ids_with_renormalised_odds():
    logits_1xV = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)

    draw = jax.jit(jax.vmap(sample, in_axes=(0, None, None, None, None)))

    def frequencies(temperature, top_k, top_p):
        ids = draw(keys, logits_1xV, jnp.float32(temperature), jnp.int32(top_k),
                   jnp.float32(top_p))[:, 0]
        return np.bincount(np.asarray(ids), minlength=4) / len(keys)

    # nucleus 0.7: {0, 1} hold 0.8 >= 0.7, {0} alone only 0.5 (Holtzman et al. 2020)
    np.testing.assert_allclose(frequencies(1.0, 0, 0.7), [0.625, 0.375, 0, 0], atol=0.03)
    np.testing.assert_allclose(frequencies(1.0, 3, 1.0), [0.526, 0.316, 0.158, 0], atol=0.03)
    np.testing.assert_allclose(frequencies(1.0, 0, 1.0), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    assert frequencies(0.0, 0, 1.0)[0] == 1.0  # temperature 0: argmax
    assert frequencies(0.05, 0, 1.0)[0] > 0.99  # low temperature: nearly greedy


@pytest.fixture(scope="module")
def greedy():
    """A 1-layer MQA model, two full-length prompts, and its greedy continuation."""
    model = build(n_layers=1, n_kv_heads=1)
    prompt_BxT = jax.random.randint(jax.random.key(2), (2, 8), 0, SMALL["vocab_size"])
    out = generate_tokens(model, prompt_BxT, max_new_tokens=8, temperature=0.0,
                          return_logits=True)
    return model, prompt_BxT, out


def run(model, prompt_BxT, **options):
    """generate_tokens with the fixture's shapes, so every call reuses one compiled loop."""
    return generate_tokens(model, prompt_BxT, max_new_tokens=8, return_logits=True, **options)


def test_greedy_is_the_argmax_of_the_logits(greedy):
    _, _, out = greedy
    np.testing.assert_array_equal(out.tokens_BxN, jnp.argmax(out.logits_BxNxV, -1))
    np.testing.assert_array_equal(out.lengths_B, [8, 8])


def test_greedy_with_and_without_the_cache_agree(greedy):
    model, prompt_BxT, out = greedy
    recomputed = run(model, prompt_BxT, temperature=0.0, use_cache=False)
    np.testing.assert_array_equal(recomputed.tokens_BxN, out.tokens_BxN)
    np.testing.assert_allclose(recomputed.logits_BxNxV, out.logits_BxNxV, rtol=1e-5, atol=1e-5)


def test_top_k_1_and_a_tiny_nucleus_are_greedy(greedy):
    model, prompt_BxT, out = greedy
    for options in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=3, top_p=1e-6)):
        sampled = run(model, prompt_BxT, temperature=1.5, seed=7, **options)
        np.testing.assert_array_equal(sampled.tokens_BxN, out.tokens_BxN, err_msg=str(options))


def test_seeded_sampling_is_deterministic(greedy):
    model, prompt_BxT, _ = greedy
    a, b = (run(model, prompt_BxT, temperature=1.0, seed=3) for _ in range(2))
    np.testing.assert_array_equal(a.tokens_BxN, b.tokens_BxN)
    assert not np.array_equal(run(model, prompt_BxT, temperature=1.0, seed=4).tokens_BxN,
                              a.tokens_BxN)
    top_k = run(model, prompt_BxT, temperature=1.0, seed=3, top_k=5)
    ranks = (top_k.logits_BxNxV > jnp.take_along_axis(top_k.logits_BxNxV,
                                                      top_k.tokens_BxN[..., None], -1)).sum(-1)
    assert int(ranks.max()) < 5  # every draw is among the 5 most likely ids


def test_a_stop_token_ends_its_row(greedy):
    model, prompt_BxT, out = greedy
    stop = int(out.tokens_BxN[0, 2])
    stopped = run(model, prompt_BxT, temperature=0.0, stop_ids=[stop], pad_id=0)
    first = [int(np.argmax(np.asarray(row) == stop)) if stop in row else 8
             for row in out.tokens_BxN.tolist()]
    assert first[0] <= 2
    for row, n, tokens in zip(range(2), first, stopped.tokens_BxN.tolist()):
        assert int(stopped.lengths_B[row]) == min(n + 1, 8)
        assert tokens[:n + 1] == out.tokens_BxN[row, :n + 1].tolist()
        assert set(tokens[n + 1:]) <= {0}  # padding after the stop


def test_left_padded_rows_decode_as_they_would_alone(greedy):
    """A batch of prompts of lengths 8 and 3: each row equals its own unpadded forward."""
    model, prompt_BxT, _ = greedy
    lengths = [8, 3]
    out = run(model, prompt_BxT, temperature=0.0, prompt_lengths_B=lengths, pad_id=0)
    forward = nnx.jit(lambda m, x: m(x))
    for b, n in enumerate(lengths):
        alone = jnp.concatenate([prompt_BxT[b, 8 - n:], out.tokens_BxN[b]])[None]
        logits_1xTxV = forward(model, alone)[:, n - 1:-1]
        np.testing.assert_allclose(out.logits_BxNxV[b:b + 1], logits_1xTxV, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out.tokens_BxN[b], jnp.argmax(logits_1xTxV[0], -1))
    recomputed = run(model, prompt_BxT, temperature=0.0, prompt_lengths_B=lengths,
                     use_cache=False)
    np.testing.assert_array_equal(recomputed.tokens_BxN, out.tokens_BxN)


def test_generate_text_batched_equals_one_at_a_time_and_stops_at_strings():
    model, tok = build(n_layers=1, n_kv_heads=1), ByteTokenizer()
    prompts = ["ab", "a longer prompt"]
    batched = generate(model, tok, prompts, max_new_tokens=8, temperature=0.0)
    assert isinstance(batched, list) and all(isinstance(t, str) for t in batched)
    for prompt, text in zip(prompts, batched):
        assert generate(model, tok, prompt, max_new_tokens=8, temperature=0.0) == text
    text = batched[1]
    stop = text[3:5]
    cut = generate(model, tok, prompts[1], max_new_tokens=8, temperature=0.0, stop=stop)
    assert cut == text[:text.index(stop)]


def test_invalid_requests_raise_before_running():
    model = build(n_layers=1)
    prompt = jnp.zeros((1, 8), jnp.int32)
    for bad in (dict(max_new_tokens=30), dict(temperature=-1.0), dict(top_k=0),
                dict(top_p=1.5), dict(prompt_lengths_B=[0])):
        with pytest.raises(ValueError):
            generate_tokens(model, prompt, **bad)


# ---- timing (behaviour only: the numbers themselves belong in benchmarks/) ----------------
class FakeClock:
    """perf_counter stand-in: a decode of n new tokens costs prefill + n * step seconds,
    and its first call of each length also 'compiles' for 100 s."""

    def __init__(self, prefill=0.5, step=0.01):
        self.now, self.prefill, self.step, self.compiled = 0.0, prefill, step, set()

    def generate_tokens(self, model, prompt_BxT, *, max_new_tokens, **options):
        self.now += self.prefill + max_new_tokens * self.step
        if max_new_tokens not in self.compiled:
            self.compiled.add(max_new_tokens)
            self.now += 100.0
        return jnp.zeros(())

    def perf_counter(self):
        return self.now


def test_decode_tokens_per_second_cancels_the_prompt_and_skips_the_compile(monkeypatch):
    from palmlite import generate as gen
    clock = FakeClock(prefill=0.5, step=0.01)
    monkeypatch.setattr(gen, "generate_tokens", clock.generate_tokens)
    monkeypatch.setattr(gen, "perf_counter", clock.perf_counter)
    prompt_BxT = jnp.zeros((4, 16), jnp.int32)
    # 4 rows / 0.01 s per step: the 0.5 s prefill and the 100 s compiles drop out.
    assert gen.decode_tokens_per_second(None, prompt_BxT, 33, repeats=3) == pytest.approx(400.0)
    assert gen.median_seconds(lambda: clock.generate_tokens(None, None, max_new_tokens=7),
                              repeats=2) == pytest.approx(0.57)
    with pytest.raises(ValueError, match="n_new=1"):
        gen.decode_tokens_per_second(None, prompt_BxT, 1)
    with pytest.raises(ValueError, match="repeats=0"):
        gen.median_seconds(lambda: None, repeats=0)


def test_kv_head_variants_are_distinct_and_end_at_multi_query():
    from palmlite.generate import kv_head_variants
    assert kv_head_variants(48) == {"MHA": 48, "GQA": 24, "MQA": 1}
    assert kv_head_variants(4) == {"MHA": 4, "GQA": 2, "MQA": 1}
    assert kv_head_variants(25) == {"MHA": 25, "GQA": 5, "MQA": 1}  # GPT-2 1.5B
    assert kv_head_variants(2) == {"MHA": 2, "MQA": 1}
    assert kv_head_variants(1) == {"MHA": 1}


def test_measure_decoding_times_every_variant_and_sizes_its_cache(monkeypatch):
    from palmlite import generate as gen
    calls = []

    def fake_speed(model, prompt_BxT, n_new, *, use_cache, repeats):
        calls.append((model.cfg.n_kv_heads, prompt_BxT.shape, n_new, use_cache, repeats))
        return 1000.0 if use_cache else 10.0

    monkeypatch.setattr(gen, "decode_tokens_per_second", fake_speed)
    base = ModelConfig(**{**SMALL, "n_kv_heads": 1})
    rows = gen.measure_decoding(base, [8, 16], batch=2, new=6, new_uncached=3, repeats=4)
    assert [(r["attention"], r["n_kv_heads"], r["context"]) for r in rows] == [
        ("MHA", 4, 8), ("GQA", 2, 8), ("MQA", 1, 8), ("MHA", 4, 16), ("GQA", 2, 16), ("MQA", 1, 16)]
    for r in rows:
        cfg = base.replace(n_kv_heads=r["n_kv_heads"])
        assert r["cache_bytes"] == (r["context"] + 6) * kv_cache_bytes_per_token(cfg)
        assert (r["cached_tokens_per_s"], r["uncached_tokens_per_s"], r["batch"]) == (1000, 10, 2)
    assert calls[:2] == [(4, (2, 8), 6, True, 4), (4, (2, 8), 3, False, 2)]
    assert rows[0]["cache_bytes"] == SMALL["n_heads"] * rows[2]["cache_bytes"]
