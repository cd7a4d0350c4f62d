"""TrainConfig: how a model is trained, every choice of the run as one named field.

The data (a corpus, or a ``mix:`` of corpora, one domain each), the batch, the budget, the
optimizer, the schedule, the precision and the bookkeeping. Like ``ModelConfig`` (in
``palmlite.config``, which this module builds on) it validates itself on construction,
before any JAX code runs or any data is read. ``parse_overrides`` applies the CLI's
``model.FIELD=VALUE`` / ``train.FIELD=VALUE`` assignments to both configs, and
``run_intervals`` scales warm-up, evaluation and logging to a run's length.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from palmlite.config import (MAX_SEED, ModelConfig, MoEConfig, RetroConfig, _check_type, _replace,
                             _require)


MIX_PREFIX = "mix:"  # TrainConfig.corpus: a mixture of corpora, one domain each
# Named mixtures (a name is easier to pass around than a spec full of '=' and ','):
# notebook 11's code + prose + arithmetic, the arithmetic large enough not to repeat.
MIXTURES = {"code-prose-arithmetic":
            "mix:pystdlib=0.5,pydocs=0.25,(arithmetic:n=100000,lines=8)=0.25"}


def mixture_spec(corpus: str) -> str | None:
    """The "mix:..." spec of a corpus name (itself, or a named mixture's); None if it is
    not a mixture."""
    return MIXTURES.get(corpus, corpus if corpus.startswith(MIX_PREFIX) else None)


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """``"mix:NAME=WEIGHT,..."`` -> [(name, weight)] with the weights normalised to sum to 1.
    Commas inside parentheses belong to a component's name; the weight follows its last '='."""
    items, depth, current = [], 0, ""
    for ch in spec.removeprefix(MIX_PREFIX) + ",":
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    bad = lambda why: ValueError(f"TrainConfig.corpus={spec!r} is invalid: {why}; expected "
                                 "'mix:NAME=WEIGHT,NAME=WEIGHT,...' with positive weights")
    parsed = []
    for item in items:
        name, _, weight = item.strip().rpartition("=")
        name = name[1:-1] if name.startswith("(") and name.endswith(")") else name
        try:
            w = float(weight)
        except ValueError:
            raise bad(f"{item.strip()!r} has no numeric weight") from None
        if not name or not math.isfinite(w) or w <= 0:
            raise bad(f"{item.strip()!r} needs a name and a finite weight > 0")
        if name.startswith(MIX_PREFIX):
            raise bad(f"a mixture cannot contain a mixture ({name!r})")
        parsed.append((name, w))
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise bad(f"a domain is named twice in {names}")
    total = sum(w for _, w in parsed)
    return [(n, w / total) for n, w in parsed]


OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("warmup_cosine", "rsqrt", "constant")
PRECISIONS = ("float32", "bf16", "pure_bf16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: data, batch, budget, optimizer, schedule, precision, bookkeeping."""

    corpus: str = "pystdlib"  # a corpus name or path (palmlite.data.load_corpus)
    tokenizer: str = "bpe:8192"  # "bytes" | "bpe:SIZE[:nosplit]" | "unigram:SIZE[:nosplit]" | a .model path
    val_fraction: float = 0.05  # share of documents held out for validation
    split_seed: int = 0  # which documents are held out: one validation set for every training seed
    batch_size: int = 16  # sequences per step
    seq_len: int = 128  # tokens per sequence
    steps: int | None = 200  # training steps (or set `tokens` and steps=None)
    tokens: int | None = None  # token budget: steps = ceil(tokens / (batch_size * seq_len))
    # Stop after this step, as an interruption would (checkpointed there); the schedule still
    # spans the whole run, so a resume continues it exactly. None: train to the end.
    stop_after: int | None = None
    optimizer: str = "adamw"  # "adamw" | "adafactor" (PaLM §5) | "sgd"
    schedule: str = "warmup_cosine"  # Gopher: 1e-7 -> peak, cosine to 10% | "rsqrt" (PaLM) | "constant"
    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 50  # Gopher: 1,500; PaLM's constant phase: 10,000
    weight_decay: float = 0.1  # AdamW decoupled decay; adafactor: multiplies lr² (PaLM: 1)
    beta1: float = 0.9
    beta2: float = 0.95  # AdamW only; adafactor uses β2 = 1 - step^-0.8
    grad_clip: float = 1.0  # global-norm clipping (PaLM, Gopher); 0 disables
    z_loss: float = 1e-4  # PaLM §5: coefficient of log²Z
    precision: str = "float32"  # "float32" | "bf16" (bf16 compute, f32 params) | "pure_bf16"
    mesh: str | None = None  # e.g. "data=-1", "data=2,tensor=4" (palmlite.sharding); None: 1 device
    seed: int = 0  # parameter init and data order (not the validation split: split_seed)
    log_every: int = 10  # steps between metrics lines (and the only host syncs)
    steps_per_call: int = 10  # optimizer steps per compiled call (one lax.scan; single steps near a sync)
    eval_every: int = 100  # steps between validation losses (0: only at the end)
    eval_batches: int = 8  # validation batches per evaluation
    checkpoint_every: int = 100  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    quiet: bool = False  # throttled progress output (papermill sweeps)
    # RETRO (a model with ``retro``): the database is the training split's chunks.
    retrieval: str = "bm25"  # keys: "bm25" (over token ids) | "model:RUN_DIR" (a frozen run's mean hidden state)
    retrieval_index: str = "flat"  # nearest-neighbour index: "flat" (exact) | "ivfpq:NLIST:M" (faiss)
    retrieval_db_fraction: float = 1.0  # share of the training documents in the database
    # RETRO-fit (§4.2): start from this run's parameters, frozen; train only CCA and encoder.
    retrofit: str | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        req = lambda ok, name, allowed: _require(ok, name, getattr(self, name), allowed, "TrainConfig")
        for f in dataclasses.fields(self):
            _check_type(f, getattr(self, f.name), "TrainConfig")
        for name in ("batch_size", "seq_len", "log_every", "eval_batches", "keep_checkpoints",
                     "steps_per_call"):
            req(getattr(self, name) > 0, name, "a positive integer")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            req(getattr(self, name) >= 0, name, "an integer >= 0")
        for name in ("seed", "split_seed"):
            req(0 <= getattr(self, name) <= MAX_SEED, name, f"an integer from 0 to {MAX_SEED}")
        req((self.steps is None) != (self.tokens is None), "steps",
            f"exactly one of steps and tokens to be set (tokens={self.tokens!r})")
        for name in ("steps", "tokens"):
            req(getattr(self, name) is None or getattr(self, name) > 0, name, "a positive integer or None")
        req(self.stop_after is None or 0 < self.stop_after <= self.total_steps, "stop_after",
            f"None or a step from 1 to the run's {self.total_steps} steps")
        req(self.lr > 0, "lr", "a positive number")
        for name in ("weight_decay", "grad_clip", "z_loss"):
            req(getattr(self, name) >= 0, name, "a number >= 0")
        for name in ("beta1", "beta2"):
            req(0 <= getattr(self, name) < 1, name, "a number in [0, 1)")
        req(0 < self.val_fraction < 1, "val_fraction", "a number in (0, 1)")
        req(0 < self.retrieval_db_fraction <= 1, "retrieval_db_fraction", "a number in (0, 1]")
        if self.is_mixture:
            parse_mixture(mixture_spec(self.corpus))  # raises, naming the field, before any data
        req(self.retrofit is None or self.retrofit != "", "retrofit", "None or a run directory")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                              ("precision", PRECISIONS)):
            req(getattr(self, name) in allowed, name, f"one of {allowed}")
        from palmlite.data import tokenizer_options  # lazy: the config needs no data code
        try:
            tokenizer_options(self.tokenizer)
        except ValueError as e:
            raise ValueError(f"TrainConfig.{e}") from None
        if self.mesh is not None:  # the syntax now; the device count when training starts
            from palmlite.sharding import parse_mesh_spec
            try:
                parse_mesh_spec(self.mesh)
            except ValueError as e:
                raise ValueError(f"TrainConfig.{e}") from None

    @property
    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return -(-self.tokens // (self.batch_size * self.seq_len))

    @property
    def dtypes(self) -> dict[str, str]:
        """The model's compute and parameter dtypes for this precision."""
        return {"float32": dict(dtype="float32", param_dtype="float32"),
                "bf16": dict(dtype="bfloat16", param_dtype="float32"),
                "pure_bf16": dict(dtype="bfloat16", param_dtype="bfloat16")}[self.precision]

    def model_dtypes(self, model: ModelConfig) -> dict[str, str]:
        """``dtypes``, checked against ``model``: the precision is the one knob for training.

        The model's dtype fields may stay at their defaults (float32, which the precision
        then overrides) or agree with the precision; else ``ValueError`` names both fields.
        """
        _require_precision(_chosen_dtypes(model), self)
        return self.dtypes

    def check_moe_groups(self, model: ModelConfig) -> None:
        """A batch of batch_size · seq_len tokens must split into whole MoE routing groups."""
        group, tokens = model.moe and model.moe.group_size, self.batch_size * self.seq_len
        if group and tokens > group and tokens % group:
            raise ValueError(f"MoEConfig.group_size={group} is invalid with TrainConfig."
                             f"batch_size={self.batch_size} x seq_len={self.seq_len} = {tokens} "
                             "tokens per batch: expected a divisor of it (or at least it)")

    def check_retro(self, model: ModelConfig) -> None:
        """A sequence must split into whole RETRO chunks; RETRO-fit needs a RETRO model."""
        if model.retro is None:
            if self.retrofit is not None:
                raise ValueError(f"TrainConfig.retrofit={self.retrofit!r} is invalid with "
                                 "ModelConfig.retro=None: expected a model with retro set")
            return
        m = model.retro.chunk_size
        if self.seq_len % m:
            raise ValueError(f"TrainConfig.seq_len={self.seq_len} is invalid with RetroConfig."
                             f"chunk_size={m}: expected a multiple of it")

    @property
    def is_mixture(self) -> bool:
        """Whether ``corpus`` is a mixture (batches then carry each row's domain id)."""
        return mixture_spec(self.corpus) is not None

    def check_domains(self, model: ModelConfig) -> None:
        """A router that reads the domain needs a mixture of as many domains as it knows."""
        moe = model.moe
        n = len(parse_mixture(mixture_spec(self.corpus))) if self.is_mixture else None
        if moe is not None and moe.routing != "token" and moe.n_domains != n:
            want = f"its number of domains, {n}" if n else \
                "a 'mix:' corpus (its batches carry each row's domain)"
            raise ValueError(f"MoEConfig.n_domains={moe.n_domains} (routing={moe.routing!r}) is "
                             f"invalid with TrainConfig.corpus={self.corpus!r}: expected {want}")
        if n is not None and model.retro is not None:
            raise ValueError(f"TrainConfig.corpus={self.corpus!r} is invalid with ModelConfig."
                             "retro: expected a single corpus (RETRO's database is one corpus)")

    def replace(self, **changes: Any) -> "TrainConfig":
        return _replace(self, changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls().replace(**d)


def parse_overrides(assignments: list[str], model: ModelConfig, train: TrainConfig):
    """Apply CLI overrides such as ``model.block=serial`` or ``train.lr=3e-4``, typed by field.

    ``model.moe.FIELD=VALUE`` sets one MoEConfig field (starting from the defaults if the
    model is dense); ``model.moe=null`` makes it dense; ``model.retro.FIELD=VALUE`` and
    ``model.retro=null`` likewise for RETRO. Values are parsed as JSON where
    possible (numbers, true/false, null), else kept as text; the result is validated like
    any config. Unknown keys list the valid ones.
    """
    changes: dict[str, dict[str, Any]] = {"model": {}, "train": {}, "model.moe": {},
                                          "model.retro": {}}
    valid = [f"model.{f.name}" for f in dataclasses.fields(model)] + \
        [f"model.moe.{f.name}" for f in dataclasses.fields(MoEConfig)] + \
        [f"model.retro.{f.name}" for f in dataclasses.fields(RetroConfig)] + \
        [f"train.{f.name}" for f in dataclasses.fields(train)]
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or key not in valid:
            raise ValueError(f"unknown override {assignment!r}: expected KEY=VALUE with KEY one "
                             f"of {valid}")
        section, name = key.rsplit(".", 1)
        changes[section][name] = _parse_value(raw)
    for name, cls in (("moe", MoEConfig), ("retro", RetroConfig)):
        if changes[f"model.{name}"]:
            current = getattr(model, name) or cls()
            changes["model"][name] = current.replace(**changes[f"model.{name}"])
    train = train.replace(**changes["train"])
    # The precision decides the model's dtypes (as in train()), so that a toggle that
    # depends on them, e.g. attention_impl=cudnn with bf16, is validated against them.
    model = model.replace(**{**train.model_dtypes(model), **changes["model"]})
    # An explicit model.dtype= / model.param_dtype= must agree with it, even if float32:
    # train() would silently replace it.
    _require_precision({k: v for k, v in changes["model"].items() if k in train.dtypes}, train)
    return model, train


def _chosen_dtypes(model: ModelConfig) -> dict[str, Any]:
    """The model's dtype fields that are not at their defaults (float32)."""
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name in ("dtype", "param_dtype") and getattr(model, f.name) != f.default}


def _require_precision(dtypes: dict[str, Any], train: TrainConfig) -> None:
    """Raise unless each model dtype field in ``dtypes`` is what ``train.precision`` sets."""
    wrong = [f"ModelConfig.{k}={v!r}" for k, v in dtypes.items() if v != train.dtypes[k]]
    if wrong:
        implied = ", ".join(f"{k}={v!r}" for k, v in train.dtypes.items())
        raise ValueError(f"{' and '.join(wrong)} disagree{'s' * (len(wrong) == 1)} with "
                         f"TrainConfig.precision={train.precision!r} (which sets {implied}): "
                         "set train.precision instead")


_STEPS_PER_CALL = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "steps_per_call")


def run_intervals(total_steps: int) -> dict[str, int]:
    """Warm-up, evaluation and logging intervals that scale with a run of ``total_steps``.

    ``TrainConfig(steps=n, **run_intervals(n))``; the last step is always evaluated and logged.
    """
    _require(isinstance(total_steps, int) and not isinstance(total_steps, bool)
             and total_steps > 0, "total_steps", total_steps, "a positive integer",
             "run_intervals")
    ceil = lambda n: -(-total_steps // n)  # total_steps / n rounded up: at least 1
    block = _STEPS_PER_CALL
    # Syncs at whole compiled blocks (TrainConfig.steps_per_call) once a run has a few of them.
    align = lambda n: -(-n // block) * block if total_steps >= 4 * block else n
    return dict(warmup_steps=ceil(10),  # warm up over the first 10% of the steps
                eval_every=align(ceil(6)),  # at most 6 validation losses, the last at the end
                log_every=align(ceil(15)))  # at most 15 metrics lines


def _parse_value(raw: str) -> Any:
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(value, list) and value and all(type(v) is int for v in value):
        return tuple(value)  # e.g. model.retro.cca_layers=[2,4]
    return value if not isinstance(value, (list, dict)) else raw
