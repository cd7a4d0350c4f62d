"""How big is a difference between two settings, and can these runs see it?

Every comparison figure states the same three numbers: the measured difference of final
losses with its interval over seeds, the seed standard deviation, and whether that noise
is small enough to resolve the effect the papers report at small scale (issue 11: the
noise must be at most a third of it). Runs with the same seed see the same data order and
the same validation split, so where both settings have a seed the difference is taken
seed by seed (a paired comparison); otherwise the two means are compared (Welch).
"""

from __future__ import annotations

import dataclasses
import math
import statistics

LEVEL = 0.9  # two-sided interval level of every comparison figure
RESOLVE_FRACTION = 1 / 3  # adequate when seed noise <= this fraction of the expected effect

# Effects the literature reports at small scale, in nats/token (../shared/reference/
# small_scale_evidence.md): Switch-style MoE with 8+ experts vs dense at equal FLOPs,
# about -0.05 (Switch appendix, nanoMoE, tiny LLaMA-style models).
SWITCH_SMALL_SCALE_EFFECT = 0.05


@dataclasses.dataclass(frozen=True)
class Difference:
    """``a`` minus ``b``: mean difference, its interval at ``LEVEL`` and the seed noise."""

    diff: float
    low: float | None  # None: fewer than two seeds, no interval
    high: float | None
    seed_std: float | None  # std of one seed's difference (paired: of the d_s; else √(var a + var b))
    n: int
    paired: bool

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes zero."""
        return self.low is not None and (self.low > 0 or self.high < 0)

    def text(self, unit: str = "nats") -> str:
        if self.low is None:
            return f"{self.diff:+.3f} {unit} (one seed: noise unknown)"
        return (f"{self.diff:+.3f} {unit} [{self.low:+.3f}, {self.high:+.3f}] "
                f"({LEVEL:.0%}, {self.n} seeds{' paired' if self.paired else ''})")


def difference(a: dict[int, float], b: dict[int, float]) -> Difference:
    """``a`` − ``b`` from {seed: final loss} of each setting (paired on shared seeds)."""
    from scipy import stats
    shared = sorted(set(a) & set(b))
    if len(shared) >= 2:
        d = [a[s] - b[s] for s in shared]
        mean, sd = statistics.mean(d), statistics.stdev(d)
        half = stats.t.ppf(0.5 + LEVEL / 2, len(d) - 1) * sd / math.sqrt(len(d))
        return Difference(mean, mean - half, mean + half, sd, len(d), True)
    va, vb = list(a.values()), list(b.values())
    diff = statistics.mean(va) - statistics.mean(vb)
    if len(va) < 2 or len(vb) < 2:
        return Difference(diff, None, None, None, min(len(va), len(vb)), False)
    ci = stats.ttest_ind(va, vb, equal_var=False).confidence_interval(LEVEL)
    sd = math.sqrt(statistics.variance(va) + statistics.variance(vb))
    return Difference(diff, float(ci.low), float(ci.high), sd, min(len(va), len(vb)), False)


def difference_noise(diffs: list[Difference]) -> float | None:
    """The seed noise of the compared quantity: the root mean square of the differences'
    ``seed_std`` (None when none has two seeds). This, not the spread of the losses
    themselves, is what a comparison must beat: paired seeds cancel what they share."""
    stds = [d.seed_std for d in diffs if d.seed_std is not None]
    return math.sqrt(statistics.mean(s * s for s in stds)) if stds else None


def seed_std(groups: list[dict[int, float]]) -> float | None:
    """Pooled standard deviation over seeds within each setting (None: no setting has two)."""
    parts = [(len(g) - 1, statistics.variance(g.values())) for g in groups if len(g) >= 2]
    if not parts:
        return None
    return math.sqrt(sum(df * v for df, v in parts) / sum(df for df, _ in parts))


def resolution(std: float | None, effect: float, what: str) -> str:
    """One line: can noise of ``std`` resolve an effect of ``effect`` nats?"""
    if std is None:
        return f"seed noise unknown (one seed): cannot judge {what}"
    ok = std <= RESOLVE_FRACTION * effect
    return (f"seed noise of a difference {std:.3f} nats {'≤' if ok else '>'} "
            f"{RESOLVE_FRACTION:.2g} × {effect:.2f} "
            f"({what}): {'resolving' if ok else 'not resolving'}")
