import jax
import numpy as np
import optax
import pytest
from flax import nnx

from palmlite import ModelConfig, Transformer, cross_entropy_and_z_loss
from palmlite.arithmetic import Problem
from palmlite.fewshot import (Choice, arithmetic_choices, arithmetic_tasks, cloze_items,
                              cloze_task, exact_match_task, kshot_prompt, multiple_choice,
                              score_options)
from palmlite.generate import encode_prompt
from palmlite.tokenizer import ByteTokenizer

MEMORISED = ["2+2=4\n", "3+5=8\n", "7+1=8\n", "the cat sat on the mat\n",
             "roses are red\nviolets are blue\n", "one two three\nfour five six\n",
             "alpha beta\ngamma delta\n"]
EXAMPLES = [(f"{i}+{i}=", str(2 * i)) for i in range(10)]


@pytest.fixture(scope="module")
def memorised():
    """A tiny model that has learned MEMORISED by heart (150 adamw steps, a few seconds)."""
    tok = ByteTokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=1, n_heads=4,
                      n_kv_heads=1, d_ff=128, max_seq_len=64)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rows = [encode_prompt(tok, doc) + [tok.eos_id] for doc in MEMORISED]
    batch_BxT = np.full((len(rows), 40), tok.pad_id, np.int32)
    for row, ids in zip(batch_BxT, rows):
        row[:len(ids)] = ids
    mask_BxT = (batch_BxT[:, 1:] != tok.pad_id).astype(np.float32)
    graphdef, params = nnx.split(model)
    adamw = optax.adamw(1e-2)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(batch_BxT[:, :-1])
            return cross_entropy_and_z_loss(logits, batch_BxT[:, 1:], mask_BxT)[0]
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = adamw.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = adamw.init(params)
    for _ in range(150):
        params, opt_state, loss = step(params, opt_state)
    # Only each document's first character is left to guess: ln(7) over ~20 tokens each.
    assert float(loss) < 0.2
    nnx.update(model, params)
    return model, tok


def test_kshot_prompt_is_deterministic_and_never_shows_the_query():
    for query, _ in EXAMPLES:
        for k in (0, 3, 9):
            prompt = kshot_prompt(EXAMPLES, query, k, seed=1)
            assert prompt == kshot_prompt(EXAMPLES, query, k, seed=1)
            assert prompt.endswith(query) and prompt.count(query) == 1
            assert prompt.count("\n") == k
    prompts = {kshot_prompt(EXAMPLES, "1+1=", 3, seed=s) for s in range(5)}
    assert len(prompts) > 1  # the seed changes the shots
    assert kshot_prompt(EXAMPLES, "4+4=", 1, template="Q: {input}\nA: {answer}\n\n") \
        .endswith("\n\nQ: 4+4=\nA: ")
    with pytest.raises(ValueError, match="k=10"):
        kshot_prompt(EXAMPLES, "1+1=", 10)
    with pytest.raises(ValueError, match="template"):
        kshot_prompt(EXAMPLES, "1+1=", 1, template="{input}")


def test_the_scorer_prefers_the_memorised_continuation(memorised):
    model, tok = memorised
    scores = score_options(model, tok, "the cat sat on the", [" hat", " mat", " cat"])
    assert np.argmax(scores) == 1 and all(s < 0 for s in scores)
    items = [Choice("2+2=", ("5", "4", "14", "3"), 1), Choice("3+5=", ("8", "9", "7", "18"), 0)]
    assert multiple_choice(model, tok, items, task="sums") == dict(task="sums", k=0, n=2,
                                                                    accuracy=1.0)


def test_exact_match_generates_the_memorised_answers(memorised):
    model, tok = memorised
    problems = [Problem("2+2=", "4"), Problem("3+5=", "8"), Problem("7+1=", "8")]
    result = exact_match_task(model, tok, problems, k=0)
    assert result == dict(task="arithmetic", k=0, n=3, accuracy=1.0)


def test_cloze_items_blank_the_last_line_among_other_snippets_last_lines(memorised):
    items = cloze_items(MEMORISED, n=3, context_lines=1, n_options=3, seed=0)
    assert items == cloze_items(MEMORISED, n=3, context_lines=1, n_options=3, seed=0)
    finals = {"violets are blue", "four five six", "gamma delta"}
    for item in items:
        assert set(item.options) == finals
        assert item.context + item.options[item.answer] + "\n" in MEMORISED
    shots = cloze_items(MEMORISED, n=3, k=2, context_lines=1, n_options=3, seed=0)
    assert all(item.context.count("\n\n") == 2 for item in shots)
    model, tok = memorised
    result = cloze_task(model, tok, MEMORISED, n=3, context_lines=1, n_options=3)
    assert result == dict(task="cloze", k=0, n=3, accuracy=1.0)


def test_arithmetic_choices_offer_near_misses_and_tasks_return_rows(memorised):
    problems = [Problem("12+30=", "42"), Problem("9-15=", "-6")]
    for item, p in zip(arithmetic_choices(problems, k=1), problems):
        assert item.options[item.answer] == p.answer
        assert sorted(int(o) - int(p.answer) for o in item.options) == [-1, 0, 1, 10]
        assert item.context.endswith("\n" + p.prompt)
    model, tok = memorised
    rows = arithmetic_tasks(model, tok, n=4, k=1, max_digits=2)
    assert [(r["task"], r["k"], r["n"]) for r in rows] == [("arithmetic", 1, 4),
                                                           ("arithmetic_choice", 1, 4)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)


def test_whole_text_choices_put_the_prompt_in_every_option(memorised):
    problems = [Problem("2+2=", "4"), Problem("3+5=", "8")]
    pool = [(p.prompt, p.answer) for p in problems]
    for item, p in zip(arithmetic_choices(problems, k=1, whole=True), problems):
        prompt = kshot_prompt(pool, p.prompt, 1)
        assert item.context == "" and item.options[item.answer] == prompt + p.answer
        assert sorted(o.removeprefix(prompt) for o in item.options) == sorted(
            str(int(p.answer) + d) for d in (0, 1, -1, 10))
    model, tok = memorised
    zero_shot = arithmetic_choices(problems, whole=True)
    assert multiple_choice(model, tok, zero_shot)["accuracy"] == 1.0
    # Excluding every other one-digit sum leaves exactly the three the model has memorised.
    others = [f"{a}+{b}={a + b}" for a in range(10) for b in range(10)
              if f"{a}+{b}={a + b}" not in ("2+2=4", "3+5=8", "7+1=8")]
    rows = arithmetic_tasks(model, tok, n=3, k=0, max_digits=1, operators="+", exclude=others)
    assert [(r["n"], r["accuracy"]) for r in rows] == [(3, 1.0), (3, 1.0)]
