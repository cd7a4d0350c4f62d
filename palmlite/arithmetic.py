"""Synthetic arithmetic: the test bed for PaLM's digit-splitting claim (PaLM §2, §6.3).

``problems(n, seed=...)`` draws problems such as ``4821+97=4918``; a model is asked the
``prompt`` ("4821+97=") and scored by exact match of its completion against ``answer``.
``held_out`` draws test problems that a training corpus does not contain.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Iterable

import numpy as np

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str  # "4821+97="
    answer: str  # "4918"

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def problems(n: int = 20_000, *, seed: int = 0, operators: str = "+-",
             min_digits: int = 1, max_digits: int = 4) -> list[Problem]:
    """``n`` problems, each operand with a uniformly drawn number of digits."""
    if n < 1:
        raise ValueError(f"arithmetic n={n!r} is invalid: expected a positive count")
    unknown = sorted(set(operators) - set(OPERATORS))
    if unknown or not operators:
        raise ValueError(f"arithmetic operators={operators!r} is invalid: expected a "
                         f"non-empty string of {''.join(OPERATORS)!r}")
    if not 1 <= min_digits <= max_digits <= 18:
        raise ValueError(f"arithmetic digits ({min_digits}, {max_digits}) are invalid: "
                         "expected 1 <= min_digits <= max_digits <= 18")
    rng = np.random.default_rng(seed)

    def operand() -> int:
        digits = int(rng.integers(min_digits, max_digits + 1))
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return int(rng.integers(low, 10**digits))

    out = []
    for _ in range(n):
        a, op, b = operand(), operators[int(rng.integers(len(operators)))], operand()
        out.append(Problem(f"{a}{op}{b}=", str(OPERATORS[op](a, b))))
    return out


def held_out(n: int, exclude: Iterable[str] = (), *, seed: int = 0, **options) -> list[Problem]:
    """``n`` distinct problems whose ``text`` is not in ``exclude`` (say, every line of the
    training corpus), so that a score measures more than memory. ``options`` as in
    ``problems``; the draw is ``problems(..., seed=seed)`` filtered, so it is seeded too."""
    exclude, texts, out = set(exclude), set(), []
    for p in problems(100 * n, seed=seed, **options):
        if p.text not in exclude and p.text not in texts:
            texts.add(p.text)
            out.append(p)
            if len(out) == n:
                return out
    raise ValueError(f"held-out n={n} is too many: {100 * n} draws gave {len(out)} distinct "
                     "problems outside the excluded ones (allow more digits or ask for fewer)")


def exact_match(predictions: list[str], answers: list[str]) -> float:
    """Fraction of predictions equal to their answer (surrounding whitespace ignored)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("exact_match needs at least one answer")
    return sum(p.strip() == a.strip() for p, a in zip(predictions, answers)) / len(answers)
