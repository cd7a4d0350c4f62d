import pytest

from palmlite import arithmetic


def test_problems_are_correct_and_seeded():
    probs = arithmetic.problems(300, seed=1, operators="+-*", min_digits=1, max_digits=3)
    for p in probs:
        a, op, b = _parse(p.prompt)
        assert p.answer == str({"+": a + b, "-": a - b, "*": a * b}[op])
        assert p.text == p.prompt + p.answer
    assert probs == arithmetic.problems(300, seed=1, operators="+-*", min_digits=1, max_digits=3)
    assert probs != arithmetic.problems(300, seed=2, operators="+-*", min_digits=1, max_digits=3)
    assert {_parse(p.prompt)[1] for p in probs} == {"+", "-", "*"}


def test_operand_lengths_respect_the_digit_range():
    for p in arithmetic.problems(200, seed=0, operators="+", min_digits=3, max_digits=4):
        a, _, b = _parse(p.prompt)
        assert 100 <= a < 10_000 and 100 <= b < 10_000


def _parse(prompt):
    body = prompt.rstrip("=")
    for i, ch in enumerate(body[1:], start=1):
        if ch in "+-*":
            return int(body[:i]), ch, int(body[i + 1:])
    raise AssertionError(prompt)


@pytest.mark.parametrize("kwargs,match", [(dict(n=0), "n="), (dict(operators="/"), "operators"),
                                          (dict(min_digits=3, max_digits=2), "digits")])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        arithmetic.problems(**kwargs)


def test_exact_match():
    assert arithmetic.exact_match(["12", " 7 ", "3"], ["12", "7", "4"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        arithmetic.exact_match(["1"], ["1", "2"])


def test_held_out_problems_are_distinct_seeded_and_unseen():
    seen = [p.text for p in arithmetic.problems(300, seed=0, operators="+", max_digits=2)]
    test = arithmetic.held_out(50, seen, seed=1, operators="+", max_digits=2)
    assert len({p.text for p in test}) == 50 and not {p.text for p in test} & set(seen)
    assert test == arithmetic.held_out(50, seen, seed=1, operators="+", max_digits=2)
    assert arithmetic.held_out(100, seed=1, operators="+", max_digits=1)[0].prompt[1] == "+"
    with pytest.raises(ValueError, match="n=101"):  # only 10 x 10 one-digit sums exist
        arithmetic.held_out(101, seed=1, operators="+", max_digits=1)
