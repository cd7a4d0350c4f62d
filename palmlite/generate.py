"""Sampling text from a Transformer: a jitted prefill, then a jitted decode loop.

    generate(model, tokenizer, "def fib(n):", max_new_tokens=64, temperature=0.8, top_p=0.95)

Prefill runs the prompt once and fills the KV cache; each decoding step then feeds a
single token, which attends over the cache instead of recomputing every earlier token.
The loop is one ``jax.lax.while_loop``, compiled once per shape, so no token re-traces.
``decode_tokens_per_second`` times it, with the cache or with full recomputation, and
``measure_decoding`` does so for multi-head, grouped and multi-query attention.

Prompts of different lengths are left-padded into one batch. Padding gets negative
positions, which the cache mask hides from every query, and each row counts positions
from its own first token, so a batched row decodes exactly as it would alone.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from time import perf_counter
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from palmlite.attention import init_cache
from palmlite.config import MAX_SEED, ModelConfig
from palmlite.model import Transformer

PROMPT_BUCKET = 16  # prompt lengths round up to a multiple of this: fewer compiled shapes


def sample(key: jax.Array, logits_BxV: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """One id per row: argmax if temperature is 0, else a draw from the tempered softmax
    restricted to the top_k most likely ids (Fan et al. 2018; 0 = all) and then to the
    smallest set of them holding mass top_p (nucleus, Holtzman et al. 2020; 1 = all).

    The settings are traced values, so changing them never recompiles the decode loop.
    """
    def draw(logits_BxV):
        logits_BxV = logits_BxV / temperature
        sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # most likely first
        rank_V = jnp.arange(logits_BxV.shape[-1])
        in_top_k_V = (rank_V < top_k) | (top_k == 0)
        p_BxV = jnp.where(in_top_k_V, jax.nn.softmax(sorted_BxV, axis=-1), 0.0)
        p_BxV = p_BxV / p_BxV.sum(-1, keepdims=True)
        mass_before_BxV = jnp.cumsum(p_BxV, axis=-1) - p_BxV  # of strictly likelier ids
        kept_BxV = in_top_k_V & (mass_before_BxV < top_p)
        cutoff_Bx1 = jnp.where(kept_BxV, sorted_BxV, jnp.inf).min(-1, keepdims=True)
        return jax.random.categorical(key, jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf,
                                                     logits_BxV)).astype(jnp.int32)

    def greedy(logits_BxV):
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, greedy, logits_BxV.astype(jnp.float32))


def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   seed: int = 0) -> None:
    """Sampling settings a decode can use, or a ValueError naming the one that is not."""
    if not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed={seed!r} is invalid: expected an integer from 0 to {MAX_SEED}")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} is invalid: expected >= 0")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k={top_k!r} is invalid: expected None or an int >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is invalid: expected None or 0 < top_p <= 1")


class Generation(NamedTuple):
    tokens_BxN: jax.Array  # the new ids; pad_id after a row stopped
    lengths_B: jax.Array  # new tokens per row, its stop token included
    logits_BxNxV: jax.Array | None  # the logits each new token was drawn from (if asked)


class Knobs(NamedTuple):
    """The decode loop's traced settings: new values reuse the compiled loop."""

    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array  # int32; 0 = off
    top_p: jax.Array  # float32; 1 = off
    is_stop_V: jax.Array  # bool per vocabulary id: emitting it ends the row
    pad_id: jax.Array  # int32, written after a row ended


@functools.partial(jax.jit, static_argnames="graphdef")
def _prefill(graphdef, state, prompt_BxT, positions_BxT, cache):
    """The cache after the prompt. Its logits are unused, so XLA never computes them."""
    return nnx.merge(graphdef, state)(prompt_BxT, positions_BxT, cache)[1]


@functools.partial(jax.jit, static_argnames=("graphdef", "n_new", "use_cache", "return_logits"))
def _decode(graphdef, state, memory, sequence_BxM, positions_BxM, key, knobs, *, n_new,
            use_cache, return_logits):
    """Feed the prompt's last token, then each sampled one, until n_new or every row stops.

    ``memory`` is the prefilled cache, or (use_cache=False) the sequence itself, which is
    recomputed in full at every step.
    """
    model = nnx.merge(graphdef, state)
    (B, M), last = sequence_BxM.shape, sequence_BxM.shape[1] - n_new - 1

    def advance(memory, token_B, slot):
        """The logits after ``token_B``, which sits at ``slot``."""
        if use_cache:
            pos_Bx1 = jax.lax.dynamic_slice_in_dim(positions_BxM, slot, 1, axis=1)
            logits_Bx1xV, memory = model(token_B[:, None], pos_Bx1, memory)
            return logits_Bx1xV[:, 0], memory
        memory = jax.lax.dynamic_update_slice_in_dim(memory, token_B[:, None], slot, axis=1)
        logits_BxMxV, _ = model(memory, positions_BxM, init_cache(model.cfg, B, M))
        return jax.lax.dynamic_index_in_dim(logits_BxMxV, slot, axis=1, keepdims=False), memory

    def body(carry):
        i, memory, token_B, done_B, lengths_B, tokens_BxN, saved_BxNxV = carry
        logits_BxV, memory = advance(memory, token_B, last + i)
        token_B = sample(jax.random.fold_in(key, i), logits_BxV, knobs.temperature,
                         knobs.top_k, knobs.top_p)
        token_B = jnp.where(done_B, knobs.pad_id, token_B)
        tokens_BxN = tokens_BxN.at[:, i].set(token_B)
        if return_logits:
            saved_BxNxV = saved_BxNxV.at[:, i].set(logits_BxV)
        lengths_B = lengths_B + ~done_B
        done_B = done_B | knobs.is_stop_V[token_B]
        return i + 1, memory, token_B, done_B, lengths_B, tokens_BxN, saved_BxNxV

    def not_finished(carry):
        i, _, _, done_B, *_ = carry
        return (i < n_new) & ~jnp.all(done_B)

    V = model.cfg.vocab_size
    saved_BxNxV = jnp.zeros((B, n_new, V), jnp.float32) if return_logits else None
    carry = (0, memory, sequence_BxM[:, last], jnp.zeros(B, bool), jnp.zeros(B, jnp.int32),
             jnp.full((B, n_new), knobs.pad_id), saved_BxNxV)
    _, _, _, _, lengths_B, tokens_BxN, saved_BxNxV = jax.lax.while_loop(not_finished, body, carry)
    return Generation(tokens_BxN, lengths_B, saved_BxNxV)


def generate_tokens(model, prompt_BxT, *, prompt_lengths_B=None, max_new_tokens: int = 32,
                    temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int = 0, stop_ids: Iterable[int] = (),
                    pad_id: int = 0, use_cache: bool = True,
                    return_logits: bool = False) -> Generation:
    """Continue each row of ``prompt_BxT`` by up to ``max_new_tokens`` ids.

    Rows are left-padded: row b's prompt is its last ``prompt_lengths_B[b]`` ids (all T
    by default). A row stops after emitting any of ``stop_ids``. ``use_cache=False``
    recomputes the whole sequence at every step, the baseline the cache is measured against.
    """
    prompt_BxT = jnp.asarray(prompt_BxT, jnp.int32)
    (B, T), cfg = prompt_BxT.shape, model.cfg
    lengths_B = np.full(B, T) if prompt_lengths_B is None else np.asarray(prompt_lengths_B)
    if not (1 <= lengths_B.min() and lengths_B.max() <= T):
        raise ValueError(f"prompt lengths must lie in 1..{T}, got {lengths_B.tolist()}")
    if max_new_tokens < 1 or T + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: expected >= 1 and a "
                         f"prompt of {T} plus new tokens within max_seq_len={cfg.max_seq_len}")
    check_sampling(temperature, top_k, top_p, seed)
    is_stop_V = np.zeros(cfg.vocab_size, bool)
    is_stop_V[list(stop_ids)] = True
    knobs = Knobs(jnp.float32(temperature), jnp.int32(top_k or 0), jnp.float32(top_p or 1.0),
                  jnp.asarray(is_stop_V), jnp.int32(pad_id))
    M = T + max_new_tokens
    # Each row counts positions from its first real token; padding is negative (never seen).
    positions_BxM = jnp.asarray(np.arange(M)[None, :] - (T - lengths_B)[:, None], jnp.int32)
    sequence_BxM = jnp.pad(prompt_BxT, ((0, 0), (0, max_new_tokens)), constant_values=pad_id)
    graphdef, state = nnx.split(model)
    memory = sequence_BxM
    if use_cache:  # all but the last prompt token: the loop's first step feeds that one
        memory = _prefill(graphdef, state, prompt_BxT[:, :-1], positions_BxM[:, :T - 1],
                          init_cache(cfg, B, M))
    return _decode(graphdef, state, memory, sequence_BxM, positions_BxM, jax.random.key(seed),
                   knobs, n_new=max_new_tokens, use_cache=use_cache,
                   return_logits=return_logits)


# ---- RETRO: retrieve every chunk_size tokens -------------------------------------------------
@functools.partial(jax.jit, static_argnames="graphdef")
def _retro_call(graphdef, state, tokens_BxT, positions_BxT, cache, new_neighbours):
    """Feed tokens with the neighbours of the chunks they complete (or None): logits of the
    last token, the updated caches."""
    logits_BxTxV, cache = nnx.merge(graphdef, state)(tokens_BxT, positions_BxT, cache,
                                                     new_neighbours)
    return logits_BxTxV[:, -1], cache


def retro_generate_tokens(model, prompt_BxT, retrieve: Callable[[np.ndarray], np.ndarray], *,
                          max_new_tokens: int = 32, temperature: float = 1.0,
                          top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                          stop_ids: Iterable[int] = (), pad_id: int = 0,
                          return_logits: bool = False) -> Generation:
    """``generate_tokens`` for a RETRO model (``cfg.retro``), with its KV cache and a
    ``RetroCache``: whenever a token completes a chunk of M = chunk_size tokens, the host
    calls ``retrieve(chunk_BxM) -> neighbours_BxJxR`` (embed, search: ``palmlite.retrieval``)
    and the model encodes them, so that token and the next M - 1 attend to them (RETRO §2.4).
    The same logits as the full forward with those neighbours (tests/test_retro.py). Rows
    are not padded (one prompt length); a host loop, one compiled call per token."""
    cfg, prompt_BxT = model.cfg, np.asarray(prompt_BxT, np.int32)
    (B, T), M = prompt_BxT.shape, cfg.retro.chunk_size
    if max_new_tokens < 1 or T + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: expected >= 1 and a "
                         f"prompt of {T} plus new tokens within max_seq_len={cfg.max_seq_len}")
    check_sampling(temperature, top_k, top_p, seed)
    from palmlite import retro
    sequence_BxL = np.concatenate([prompt_BxT, np.full((B, max_new_tokens), pad_id, np.int32)], 1)
    L = sequence_BxL.shape[1]
    cache = dataclasses.replace(init_cache(cfg, B, L), retro=retro.init_retro_cache(cfg, B, L))

    def neighbours(first: int, end: int):  # chunks first .. whose last token is before end
        chunks = range(first, end // M)
        if not chunks:
            return None
        nbr_BxcxJxR = np.stack([retrieve(sequence_BxL[:, u * M:(u + 1) * M]) for u in chunks], 1)
        return retro.NewNeighbours(jnp.int32(first), jnp.asarray(nbr_BxcxJxR, jnp.int32))

    graphdef, state = nnx.split(model)
    positions = lambda a, b: jnp.broadcast_to(jnp.arange(a, b, dtype=jnp.int32), (B, b - a))
    if T > 1:  # prefill: all but the last prompt token, and the chunks they complete
        _, cache = _retro_call(graphdef, state, jnp.asarray(prompt_BxT[:, :-1]),
                               positions(0, T - 1), cache, neighbours(0, T - 1))
    is_stop_V = np.zeros(cfg.vocab_size, bool)
    is_stop_V[list(stop_ids)] = True
    key, done_B, lengths_B, saved = jax.random.key(seed), np.zeros(B, bool), np.zeros(B, int), []
    for i in range(max_new_tokens):
        p = T - 1 + i  # the position of the token fed now
        logits_BxV, cache = _retro_call(graphdef, state, jnp.asarray(sequence_BxL[:, p:p + 1]),
                                        positions(p, p + 1), cache,
                                        neighbours((p + 1) // M - 1, p + 1) if (p + 1) % M == 0
                                        else None)
        saved += [logits_BxV] if return_logits else []
        token_B = np.asarray(sample(jax.random.fold_in(key, i), logits_BxV, jnp.float32(temperature),
                                    jnp.int32(top_k or 0), jnp.float32(top_p or 1.0)))
        sequence_BxL[:, p + 1] = np.where(done_B, pad_id, token_B)
        lengths_B += ~done_B
        done_B |= is_stop_V[sequence_BxL[:, p + 1]]
        if done_B.all():
            break
    new_BxN = jnp.asarray(sequence_BxL[:, T:])
    return Generation(new_BxN, jnp.asarray(lengths_B),
                      jnp.stack(saved, 1) if return_logits else None)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """EOS, then the text: data.py joins documents with EOS, so EOS is what a trained model
    has seen before every document's first token (BOS never occurs in training)."""
    return [tokenizer.eos_id, *tokenizer.encode(text)]


def generate(model, tokenizer, prompt: str | list[str], *, max_new_tokens: int = 64,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, stop: int | str | Iterable[int | str] | None = None,
             use_cache: bool = True, retrieve=None) -> str | list[str]:
    """The continuation of ``prompt`` (or of each prompt in a list), without the prompt.

    Generation stops at EOS, at any token id in ``stop`` and at any string in ``stop``
    (the text is cut before it). temperature=0 decodes greedily. A RETRO model needs
    ``retrieve`` (``retro_data.RetroData.retrieve``: chunk ids -> neighbours), or
    ``retrieve=False`` to generate with retrieval off; each prompt then decodes alone
    (``retro_generate_tokens``).
    """
    if model.cfg.retro is not None and retrieve is None:
        raise ValueError("a RETRO model (cfg.retro) generates with retrieval: pass retrieve= "
                         "(palmlite.retro_data.RetroData.retrieve), or retrieve=False for "
                         "retrieval off")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    stops = [stop] if isinstance(stop, (int, str)) else list(stop or ())
    stop_strings = [s for s in stops if isinstance(s, str)]
    # A stop string that is one token stops the loop early; the cut below is what counts.
    stop_ids = {tokenizer.eos_id, *(s for s in stops if isinstance(s, int))}
    stop_ids |= {ids[0] for ids in map(tokenizer.encode, stop_strings) if len(ids) == 1}
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    if retrieve:  # RETRO: one prompt at a time, retrieving every chunk_size tokens
        outs = [retro_generate_tokens(model, np.asarray([row_ids], np.int32), retrieve,
                                      max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids,
                                      pad_id=tokenizer.pad_id) for row_ids in ids]
        texts = [_decoded(tokenizer, o.tokens_BxN[0], o.lengths_B[0], stop_ids, stop_strings)
                 for o in outs]
        return texts[0] if isinstance(prompt, str) else texts
    longest = max(map(len, ids))
    T = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET,
            max(longest, model.cfg.max_seq_len - max_new_tokens))
    prompt_BxT = np.full((len(ids), T), tokenizer.pad_id, np.int32)
    for row, row_ids in zip(prompt_BxT, ids):
        row[T - len(row_ids):] = row_ids
    out = generate_tokens(model, prompt_BxT, prompt_lengths_B=[len(i) for i in ids],
                          max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, stop_ids=stop_ids, pad_id=tokenizer.pad_id,
                          use_cache=use_cache)
    texts = [_decoded(tokenizer, row, n, stop_ids, stop_strings)
             for row, n in zip(np.asarray(out.tokens_BxN), np.asarray(out.lengths_B))]
    return texts[0] if isinstance(prompt, str) else texts


def _decoded(tokenizer, row_N, n, stop_ids, stop_strings) -> str:
    """A row's first n new ids as text, without a final stop id, cut before a stop string."""
    row = np.asarray(row_N)[:int(n)].tolist()
    text = tokenizer.decode(row[:-1] if row and row[-1] in stop_ids else row)
    for s in stop_strings:
        text = text.split(s, 1)[0]
    return text


# ---- timing -------------------------------------------------------------------------------
def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one call that compiles and
    warms up. JAX dispatches asynchronously, so each call waits for its results."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r} is invalid: expected an integer >= 1")
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = perf_counter()
        jax.block_until_ready(fn())
        times.append(perf_counter() - start)
    return statistics.median(times)


def decode_tokens_per_second(model, prompt_BxT, n_new: int, *, use_cache: bool = True,
                             repeats: int = 5) -> float:
    """Greedy decoding throughput (new tokens/s over the batch), compile and prompt excluded.

    Decode time is t(prompt + n_new tokens) - t(prompt + 1 token): the prefill (or, without
    the cache, the first full forward) cancels, leaving n_new - 1 decoding steps. PaLM §2's
    case for multi-query attention is about exactly these steps: each one reads the whole
    KV cache, so ``use_cache=False`` (recompute everything) is the baseline.
    """
    if n_new < 2:
        raise ValueError(f"n_new={n_new!r} is invalid: expected >= 2 (the first new token's "
                         "time is subtracted)")

    def seconds(n: int) -> float:
        return median_seconds(lambda: generate_tokens(model, prompt_BxT, max_new_tokens=n,
                                                      temperature=0.0, use_cache=use_cache),
                              repeats)

    return prompt_BxT.shape[0] * (n_new - 1) / (seconds(n_new) - seconds(1))


def kv_head_variants(n_heads: int) -> dict[str, int]:
    """K/V head counts to compare: multi-head (n_heads), grouped (the largest proper divisor
    of n_heads above 1, if any) and multi-query (1, PaLM §2)."""
    variants = {"MHA": n_heads}
    if grouped := next((d for d in range(n_heads // 2, 1, -1) if n_heads % d == 0), None):
        variants["GQA"] = grouped
    if n_heads > 1:
        variants["MQA"] = 1
    return variants


def measure_decoding(base: ModelConfig, contexts: Iterable[int], *, batch: int = 8,
                     new: int = 64, new_uncached: int = 8, repeats: int = 5,
                     seed: int = 0) -> list[dict]:
    """One row per context length and K/V variant of ``base``: the cache bytes of one
    sequence (prompt + ``new`` tokens) and greedy decode tokens/s with the cache and with
    full recomputation (fewer tokens: each step is a whole forward).

    The models are untrained and the prompts random: speed does not depend on the weights.
    """
    rows = []
    for context in contexts:
        for name, n_kv_heads in kv_head_variants(base.n_heads).items():
            max_len = context + max(new, new_uncached)
            cfg = base.replace(n_kv_heads=n_kv_heads, max_seq_len=max_len)
            model = Transformer(cfg, rngs=nnx.Rngs(seed))
            prompt_BxT = jax.random.randint(jax.random.key(seed), (batch, context), 0,
                                            cfg.vocab_size, dtype=jnp.int32)
            rows.append(dict(
                attention=name, n_kv_heads=n_kv_heads, context=context, batch=batch,
                cache_bytes=init_cache(cfg, 1, context + new).nbytes,
                cached_tokens_per_s=decode_tokens_per_second(
                    model, prompt_BxT, new, use_cache=True, repeats=repeats),
                uncached_tokens_per_s=decode_tokens_per_second(
                    model, prompt_BxT, new_uncached, use_cache=False,
                    repeats=max(1, repeats // 2))))
    return rows
