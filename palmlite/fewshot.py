"""Few-shot evaluation as in GPT-3, GLaM and PaLM: k solved examples, then the query.

A model is scored in one of two ways (GPT-3 §2, followed by GLaM §5 and PaLM §6.1):
- rank classification: of a few options, the one with the highest log-likelihood given
  the context is the model's answer (multiple choice, cloze);
- generation: greedy decoding until a newline, scored by exact match (arithmetic).

Every task returns a plain dict ``{"task", "k", "n", "accuracy"}``, one table row.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from palmlite import arithmetic
from palmlite.generate import encode_prompt, generate

TEMPLATE = "{input}{answer}\n"  # "4821+97=" + "4918" + newline
LENGTH_BUCKET = 32  # scored sequences round up to a multiple of this: fewer compiled shapes


# ---- prompts ------------------------------------------------------------------------------
def kshot_prompt(examples: Sequence[tuple[str, str]], query: str, k: int, seed: int = 0,
                 template: str = TEMPLATE) -> str:
    """k solved (input, answer) examples, then ``query`` rendered up to where its answer goes.

    The shots are drawn without replacement from examples whose input is not the query,
    by a generator seeded with (seed, query): deterministic, yet different per query, as
    GPT-3 §2 draws them afresh for every test example.
    """
    if template.count("{answer}") != 1:
        raise ValueError(f"template={template!r} is invalid: expected one '{{answer}}'")
    head, tail = template.split("{answer}")
    pool = [(x, a) for x, a in examples if x != query]
    if not 0 <= k <= len(pool):
        raise ValueError(f"k={k} is invalid: expected 0..{len(pool)} (examples other than "
                         "the query)")
    rng = np.random.default_rng([seed, zlib.crc32(query.encode())])
    shots = [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
    return "".join(head.format(input=x) + a + tail for x, a in shots) + head.format(input=query)


# ---- rank classification ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Choice:
    context: str
    options: tuple[str, ...]
    answer: int  # index of the correct option


@nnx.jit
def _summed_logprob(model, ids_BxL, scored_BxL):
    """Sum over the scored positions of log p(token | the tokens before it)."""
    logp_BxLxV = jax.nn.log_softmax(model(ids_BxL[:, :-1]), axis=-1)
    logp_BxL = jnp.take_along_axis(logp_BxLxV, ids_BxL[:, 1:, None], axis=-1)[..., 0]
    return (logp_BxL * scored_BxL[:, 1:]).sum(-1)


def score_options(model, tokenizer, context: str, options: Sequence[str]) -> list[float]:
    """log p(option | context) for each option: its tokens only, all options in one batch.

    Sums favour short options; the built-in tasks offer options of similar length.
    """
    context_ids = encode_prompt(tokenizer, context)
    rows = [context_ids + tokenizer.encode(o) for o in options]
    longest, limit = max(map(len, rows)), model.cfg.max_seq_len + 1  # inputs drop the last
    if longest > limit:
        raise ValueError(f"context + option is {longest} tokens; the model reads at most "
                         f"max_seq_len={model.cfg.max_seq_len} (use a smaller k)")
    L = min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, limit)
    # Padding goes on the right: causal attention keeps it out of every scored position.
    ids_BxL = np.full((len(rows), L), tokenizer.pad_id, np.int32)
    scored_BxL = np.zeros((len(rows), L), np.float32)
    for b, row in enumerate(rows):
        ids_BxL[b, :len(row)] = row
        scored_BxL[b, len(context_ids):len(row)] = 1.0
    return np.asarray(_summed_logprob(model, ids_BxL, scored_BxL)).tolist()


def predict_choice(model, tokenizer, item: Choice) -> int:
    """Index of the most likely option."""
    return int(np.argmax(score_options(model, tokenizer, item.context, item.options)))


def multiple_choice(model, tokenizer, items: Sequence[Choice], *, task: str = "multiple_choice",
                    k: int = 0) -> dict:
    correct = [predict_choice(model, tokenizer, item) == item.answer for item in items]
    return dict(task=task, k=k, n=len(items), accuracy=float(np.mean(correct)))


# ---- generation ---------------------------------------------------------------------------
def exact_match_task(model, tokenizer, problems: Sequence[arithmetic.Problem], k: int, *,
                     seed: int = 0, examples: Sequence[arithmetic.Problem] | None = None,
                     batch_size: int = 32, task: str = "arithmetic") -> dict:
    """Greedy answers after k shots (drawn from ``examples``, default the problems
    themselves), cut at the first newline and scored by exact match."""
    pool = [(p.prompt, p.answer) for p in (examples or problems)]
    prompts = [kshot_prompt(pool, p.prompt, k, seed) for p in problems]
    max_new = max(len(tokenizer.encode(p.answer)) for p in problems) + 1  # + the newline
    predictions = []
    for i in range(0, len(prompts), batch_size):
        predictions += generate(model, tokenizer, prompts[i:i + batch_size],
                                max_new_tokens=max_new, temperature=0.0, stop="\n")
    accuracy = arithmetic.exact_match(predictions, [p.answer for p in problems])
    return dict(task=task, k=k, n=len(problems), accuracy=accuracy)


# ---- built-in tasks -----------------------------------------------------------------------
def _shuffled(context: str, answer: str, distractors: Sequence[str], rng) -> Choice:
    options = [answer, *distractors]
    order = rng.permutation(len(options)).tolist()
    return Choice(context, tuple(options[i] for i in order), order.index(0))


def arithmetic_choices(problems: Sequence[arithmetic.Problem], k: int = 0, seed: int = 0,
                       whole: bool = False) -> list[Choice]:
    """Each problem against near misses: the answer off by +1, -1 and +10.

    ``whole=True`` puts the prompt into every option (the context is then empty), so the
    whole text is tokenized as one string and scored. Rankings then cannot depend on where a
    tokenizer that merges digits cuts between prompt and answer: without PaLM's digit
    splitting "=9" is one piece, so "57+38=" + "95" is a split the model never trained on.
    """
    pool = [(p.prompt, p.answer) for p in problems]
    rng = np.random.default_rng(seed)
    items = []
    for p in problems:
        near_misses = [str(int(p.answer) + d) for d in (1, -1, 10)]
        prompt = kshot_prompt(pool, p.prompt, k, seed)
        context, stem = ("", prompt) if whole else (prompt, "")
        items.append(_shuffled(context, stem + p.answer, [stem + m for m in near_misses], rng))
    return items


def arithmetic_tasks(model, tokenizer, *, n: int = 100, k: int = 3, seed: int = 0,
                     exclude: Sequence[str] = (), **problem_options) -> list[dict]:
    """Arithmetic twice on ``n`` distinct problems not in ``exclude`` (e.g. the training
    corpus's lines): generated answers (exact match) and near misses ranked by the
    likelihood of the whole text (``arithmetic_choices(whole=True)``)."""
    problems = arithmetic.held_out(n, exclude, seed=seed, **problem_options)
    return [exact_match_task(model, tokenizer, problems, k, seed=seed),
            multiple_choice(model, tokenizer, arithmetic_choices(problems, k, seed, whole=True),
                            task="arithmetic_choice", k=k)]


def cloze_items(documents: Sequence[str], n: int, *, k: int = 0, context_lines: int = 2,
                n_options: int = 4, max_line_chars: int = 80, seed: int = 0) -> list[Choice]:
    """Snippets of ``context_lines`` + 1 consecutive non-blank lines; the last line is the
    answer, to be told apart from the last lines of other snippets."""
    windows = []  # (document, first line) of every run of short, non-blank lines
    for d, doc in enumerate(documents):
        ok = [0 < len(line.strip()) and len(line) <= max_line_chars for line in doc.split("\n")]
        run = 0
        for i, good in enumerate(ok):
            run = run + 1 if good else 0
            if run > context_lines:
                windows.append((d, i - context_lines))
    if len(windows) < n:
        raise ValueError(f"only {len(windows)} snippets of {context_lines + 1} lines of at "
                         f"most {max_line_chars} characters; asked for n={n}")
    rng = np.random.default_rng(seed)
    snippets = []
    for w in rng.choice(len(windows), size=n, replace=False):
        d, first = windows[w]
        lines = documents[d].split("\n")[first:first + context_lines + 1]
        snippets.append(("\n".join(lines[:-1]) + "\n", lines[-1]))
    answers = sorted({a for _, a in snippets})
    if len(answers) < n_options:
        raise ValueError(f"{len(answers)} distinct final lines cannot fill {n_options} options")
    items = []
    for context, answer in snippets:
        others = [a for a in answers if a != answer]
        distractors = [others[i] for i in rng.choice(len(others), n_options - 1, replace=False)]
        prompt = kshot_prompt(snippets, context, k, seed, template="{input}{answer}\n\n")
        items.append(_shuffled(prompt, answer, distractors, rng))
    return items


def cloze_task(model, tokenizer, documents: Sequence[str], *, n: int = 100, k: int = 0,
               seed: int = 0, **options) -> dict:
    return multiple_choice(model, tokenizer, cloze_items(documents, n, k=k, seed=seed, **options),
                           task="cloze", k=k)
