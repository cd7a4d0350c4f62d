"""Training: one jitted step, a loop with honest metrics, orbax checkpoints, exact resume.

    result = palmlite.train("small", TrainConfig(steps=300), out="runs/small")
    result.model, result.tokenizer, result.metrics   # the same as `palmlite train ...`

The step is a pure function of (state, batch), compiled once per config: forward, loss +
z-loss (PaLM §5), gradients, optax update. It never syncs with the host; the loop reads
metrics back only every ``log_every`` steps. A non-finite loss or update skips it (the
parameters stay as they were) and is reported, with its step, at the next sync.

``TrainConfig.mesh`` (e.g. ``"data=2,tensor=4"``) runs the same step on a device mesh
(``palmlite.sharding``): the state is created sharded, each batch is placed split over the
batch axes, and the step is jitted with those shardings. ``mesh=None`` is the one-device
path, untouched. The host-side loop (batches, logs, evaluation, checkpoints, the NaN
guard) is ``palmlite.loop``; what a run directory holds, and how it is read back,
``palmlite.runs``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from palmlite.accounting import count_params, flops_per_token
from palmlite.attention import check_platform
from palmlite.checkpoint import Checkpointer
from palmlite.config import ModelConfig
from palmlite.corpora import Mixture
from palmlite.data import TokenDataset, get_tokenizer, load_corpus
from palmlite.files import COMPILATION_CACHE_COUNTS, atomic_write_text
from palmlite.losses import cross_entropy_and_z_loss
from palmlite.loop import TrainingLoop
from palmlite.mixture import MixtureDataset
from palmlite.model import Transformer
from palmlite.moe import moe_stats
from palmlite.train_config import TrainConfig
from palmlite import retro, schedules
from palmlite import presets
from palmlite import runs
from palmlite import sharding

@dataclasses.dataclass
class TrainResult:
    model: Transformer
    tokenizer: Any
    metrics: list[dict]
    run_dir: Path | None
    model_config: ModelConfig
    train_config: TrainConfig
    info: dict  # what config.json records: configs, data fingerprints, device, versions
    seconds: dict = dataclasses.field(default_factory=dict)  # setup, compile, training, ...
    compilation_cache: dict = dataclasses.field(default_factory=dict)  # this run's requests, hits

    def history(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, skipping lines that do not have it."""
        rows = [m for m in self.metrics if m.get(key) is not None]
        return [m["step"] for m in rows], [m[key] for m in rows]

    def summary(self) -> dict:
        """One flat record of the run for a study's results file: final metrics, sizes,
        the metric history, and the provenance (device, corpus, tokenizer, configs, seed)."""
        final = self.metrics[-1]
        data = self.info["data"]
        return dict(
            loss=final["loss"], val_loss=final.get("val_loss"),
            val_bits_per_byte=final.get("val_bits_per_byte"), tokens=final["tokens"],
            steps=final["step"], epochs=final["epoch"], tokens_per_s=final["tokens_per_s"],
            params=count_params(self.model_config),
            flops_per_token=flops_per_token(self.model_config, self.train_config.seq_len),
            seed=self.train_config.seed, history=self.metrics, device=self.info["device"],
            seconds_training=self.seconds.get("training"),
            seconds={k: round(v, 3) for k, v in self.seconds.items()},
            compilation_cache=self.compilation_cache,
            corpus={k: data["corpus"][k] for k in ("name", "fingerprint")},
            tokenizer={k: data["tokenizer"][k] for k in ("name", "fingerprint")},
            model=self.info["model"], train=self.info["train"], versions=self.info["versions"],
            **{k: final[k] for k in ("val_loss_by_domain", "val_bits_per_byte_by_domain")
               if k in final})  # a mixture's domains (palmlite.mixture)


def compute_loss(model, batch, z_loss_coef):
    """Cross-entropy + z_loss_coef · log²Z on next-token targets, plus a mixture of experts'
    load-balancing (Switch §2.2) and router z (ST-MoE) losses; returns (loss, metrics).
    ``batch``: tokens [B, T+1], or for RETRO a dict of them and their ``neighbours``."""
    batch_BxT1, inputs = split_batch(batch)
    logits_BxTxV, _, per_layer = model.forward(batch_BxT1[:, :-1], **inputs)
    ce, z = cross_entropy_and_z_loss(logits_BxTxV, batch_BxT1[:, 1:])
    loss, metrics = ce + z_loss_coef * z, dict(loss=ce, z_loss=z)
    if per_layer:
        moe, stats = model.cfg.moe, moe_stats(per_layer)
        loss += moe.aux_loss_coef * stats["aux_loss"] + moe.router_z_loss_coef * stats["router_z_loss"]
        metrics.update(stats)
    return loss, metrics


def split_batch(batch) -> tuple[jax.Array, dict]:
    """(tokens [B, T+1], what else the model reads) of a batch: a plain [B, T+1] array, or
    a dict of tokens and RETRO's ``neighbours`` [B, C, J, R] or a mixture's ``domains`` [B]
    (``Transformer.forward``'s keyword arguments)."""
    if not isinstance(batch, dict):
        return batch, {}
    return batch["tokens"], {k: v for k, v in batch.items() if k != "tokens"}


def init_state(cfg: ModelConfig, tc: TrainConfig, abstract: bool = False, mesh=None):
    """(graphdef, schedule, optimizer, state): the state is a pytree of params, optimizer
    state, step and the first non-finite step (-1: none). ``abstract``: shapes only.
    ``mesh``: the state is created directly in its shards (no device ever holds it whole)."""
    model = lambda key: Transformer(cfg, rngs=nnx.Rngs(key))
    seed = jax.random.key(tc.seed)  # what nnx.Rngs(tc.seed) would make
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: model(seed)))
    schedule, tx = schedules.from_config(tc)
    if tc.retrofit is not None:  # RETRO §4.2: the base model stays frozen
        tx = schedules.frozen_except(tx, retro.retro_trainable)

    def make(key):  # the key an argument, not a constant: one program for every seed
        params = nnx.state(model(key))
        return dict(params=params, opt=tx.init(params), step=jnp.array(0, jnp.int32),
                    bad_step=jnp.array(-1, jnp.int32))

    if abstract:
        return graphdef, schedule, tx, jax.eval_shape(make, seed)
    if mesh is None:  # one compiled init (cached on disk), not one dispatch per parameter
        return graphdef, schedule, tx, jax.jit(make)(seed)
    shardings = sharding.state_shardings(jax.eval_shape(make, seed), mesh)
    return graphdef, schedule, tx, jax.jit(make, out_shardings=shardings)(seed)


def loss_and_grads(graphdef, params, batch_BxT1, z_loss_coef: float):
    """((loss, metrics), grads): compute_loss and its gradient w.r.t. the parameters."""
    loss_fn = lambda p: compute_loss(nnx.merge(graphdef, p), batch_BxT1, z_loss_coef)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def make_train_step(graphdef, tx, z_loss_coef: float, state_sharding=None, batch_sharding=None,
                    steps_per_call: int = 1):
    """The jitted step: state -> state, metrics. The state is donated (updated in place).

    With ``steps_per_call`` = K > 1 one call takes a block of K batches [K, B, T+1] and the
    number n <= K of them to train on, and runs the steps in a ``lax.scan``: the host
    dispatches once per block, which is most of a tiny model's step time on a CPU. Steps
    past n leave the state as it was (a block that ends at a log step or the end of the run
    needs no second compiled function). The metrics come back stacked, [K] each.

    With shardings (``palmlite.sharding``) the state keeps its layout from step to step and
    the metrics come back replicated, so every process can read them.
    """

    def step_fn(state, batch_BxT1, active=True):
        (loss, metrics), grads = loss_and_grads(graphdef, state["params"], batch_BxT1, z_loss_coef)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), state["params"], updates)
        # NaN/Inf guard: a step whose loss, or whose updated parameters or optimizer state,
        # is not finite (a finite loss can still blow the parameters up: a huge learning
        # rate) keeps the old state; the first bad step is remembered.
        finite = jnp.isfinite(loss) & _all_finite(params) & _all_finite(opt)
        apply = finite & active
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)
        new_state = dict(params=keep(params, state["params"]), opt=keep(opt, state["opt"]),
                         step=state["step"] + active,
                         bad_step=jnp.where((state["bad_step"] < 0) & ~finite & active,
                                            state["step"], state["bad_step"]))
        return new_state, dict(metrics, grad_norm=optax.tree.norm(grads))

    def block_fn(state, block_KxBxT1, n_steps):
        active_K = jnp.arange(jax.tree.leaves(block_KxBxT1)[0].shape[0]) < n_steps
        return jax.lax.scan(lambda st, xs: step_fn(st, *xs), state, (block_KxBxT1, active_K))

    fn = step_fn if steps_per_call == 1 else block_fn
    if state_sharding is None:
        return jax.jit(fn, donate_argnums=0)
    mesh = jax.tree.leaves(batch_sharding)[0].mesh
    fn = sharding.tracing_on(mesh, fn)  # for the model's layout hints (sharding.constrain)
    replicated = NamedSharding(mesh, P())
    if steps_per_call == 1:
        return jax.jit(fn, donate_argnums=0, in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, replicated))
    # The block axis is not split: each step's batch is, as before.
    block_sharding = jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s.spec)), batch_sharding)
    return jax.jit(fn, donate_argnums=0, in_shardings=(state_sharding, block_sharding, replicated),
                   out_shardings=(state_sharding, replicated))


def train(model: ModelConfig | str = "small", config: TrainConfig | None = None, *,
          out: str | Path | None = None, resume: bool = False, **overrides) -> TrainResult:
    """Train ``model`` (a config or preset name) as ``config`` says; see the module docstring.

    ``out`` is the run directory (config.json, metrics.jsonl, checkpoints/); ``resume``
    continues the run found there bit-identically. Keyword overrides go to ``config``.
    One trainer at a time per run directory: a second one gets a ``ValueError``.
    """
    t_start = time.perf_counter()
    cfg = presets.get(model) if isinstance(model, str) else model
    tc = (config or TrainConfig()).replace(**overrides)
    dtypes = tc.model_dtypes(cfg)  # the precision sets the model's dtypes; a disagreement raises
    check_platform(cfg)  # a toggle this machine cannot run (cuDNN attention off an NVIDIA GPU)
    tc.check_moe_groups(cfg)
    tc.check_retro(cfg)
    tc.check_domains(cfg)
    mesh = None if tc.mesh is None else sharding.make_mesh(tc.mesh)  # checks the device count
    if mesh is None and jax.process_count() > 1:
        raise ValueError(f"TrainConfig.mesh=None trains on one device, but this is one of "
                         f"{jax.process_count()} processes: give a mesh over all "
                         f"{jax.device_count()} devices, e.g. mesh='data=-1' (--mesh data=-1)")
    batch_sharding = None if mesh is None else \
        sharding.batch_sharding(mesh, (tc.batch_size, tc.seq_len + 1))  # and the batch size
    if batch_sharding is not None and cfg.retro is not None:  # neighbours split like their rows
        batch_sharding = dict(tokens=batch_sharding, neighbours=NamedSharding(
            mesh, P(batch_sharding.spec[0], None, None, None)))
    if batch_sharding is not None and tc.is_mixture:  # so are the rows' domain ids
        batch_sharding = dict(tokens=batch_sharding,
                              domains=NamedSharding(mesh, P(batch_sharding.spec[0])))
    setup = dict(dtypes=dtypes, mesh=mesh, batch_sharding=batch_sharding, t_start=t_start)
    if out is None:  # everything above is checked before a run directory is touched
        return _train(cfg, tc, None, resume, **setup)
    # Several processes train one run: process 0 holds the lock for all of them.
    lock = runs.run_lock(Path(out)) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        return _train(cfg, tc, Path(out), resume, **setup)



def _train(cfg: ModelConfig, tc: TrainConfig, run_dir: Path | None, resume: bool, *, dtypes,
           mesh, batch_sharding, t_start: float) -> TrainResult:
    cache_before = dict(COMPILATION_CACHE_COUNTS)
    if run_dir is not None:
        cfg, tc = runs.prepare_run_dir(run_dir, cfg, tc, resume)

    saved = run_dir if resume else None  # a resumed run must see the same data
    corpus, tokenizer, train_ds, val_ds = datasets(
        tc, check=lambda what, obj: runs.same_data_as_saved(saved, what, obj))
    cfg, replaced = _fit_model_to_data(cfg, tokenizer, tc, dtypes)
    batches = train_ds.batches(tc.batch_size, tc.seq_len, seed=tc.seed)
    val_windows, retrieved = None, None
    if cfg.retro is not None:  # RETRO: every chunk's neighbours, searched once and cached
        from palmlite import retro_data  # faiss and bm25s load only for RETRO
        retrieved = retro_data.for_training(cfg.retro, tc, train_ds, val_ds)
        batches = retrieved.batches(batches)
        val_windows = retrieved.windows(val_ds, tc.seq_len, tc.eval_batches * tc.batch_size)

    graphdef, schedule, tx, state = init_state(cfg, tc, mesh=mesh)
    if tc.retrofit is not None and not resume:
        state = _start_from_base(state, graphdef, cfg, tc, tokenizer, mesh)

    ckpt = Checkpointer(run_dir / "checkpoints", tc.keep_checkpoints) if run_dir else None
    start = 0
    if ckpt is not None and resume:
        # onto this run's mesh, whatever it was saved on; damaged steps are moved aside
        restored = ckpt.restore_latest(state, move_damaged=True)
        if restored is not None:
            start, state, _ = restored
    info = dict(runs.run_info(cfg, tc, tokenizer, corpus, train_ds, val_ds, mesh), replaced=replaced)
    if retrieved is not None:
        info["retrieval"] = retrieved.to_dict()
    if run_dir is not None and jax.process_index() == 0:
        if tokenizer.path is not None:  # keep the vocabulary with the run
            shutil.copyfile(tokenizer.path, run_dir / "tokenizer.model")
        atomic_write_text(run_dir / "config.json", json.dumps(info, indent=1))
    loop = TrainingLoop(tc, cfg, graphdef, schedule, batches, val_ds, train_ds, run_dir, ckpt,
                        batch_sharding, val_windows)
    state_sharding = None if mesh is None else sharding.state_shardings(state, mesh)
    make_step = lambda k: make_train_step(graphdef, tx, tc.z_loss, state_sharding, batch_sharding,
                                          steps_per_call=k)
    seconds = dict(setup=time.perf_counter() - t_start)  # data, tokenizer, init, restore
    try:
        state = loop.run(make_step, state, start)
    finally:  # also after Ctrl-C or the NaN guard: orbax's threads end cleanly
        if ckpt is not None:
            ckpt.close()
    cache = {k: v - cache_before[k] for k, v in COMPILATION_CACHE_COUNTS.items()}
    return TrainResult(nnx.merge(graphdef, state["params"]), tokenizer, loop.metrics, run_dir,
                       cfg, tc, info, {**seconds, **loop.seconds}, cache)


def datasets(tc: TrainConfig, check=lambda what, obj: None):
    """(corpus, tokenizer, train split, validation split) as ``tc`` names them: the data
    ``train`` uses (a notebook that needs the same splits calls this). ``check(what, obj)``
    sees the corpus and the tokenizer before they are used."""
    corpus = load_corpus(tc.corpus)
    check("corpus", corpus)
    tokenizer = get_tokenizer(tc.tokenizer, corpus)  # a mixture's: trained on all its domains
    check("tokenizer", tokenizer)
    split = dict(val_fraction=tc.val_fraction, seed=tc.split_seed)
    dataset = MixtureDataset if isinstance(corpus, Mixture) else TokenDataset
    return (corpus, tokenizer, dataset(corpus, tokenizer, split="train", **split),
            dataset(corpus, tokenizer, split="validation", **split))


def _start_from_base(state, graphdef, cfg: ModelConfig, tc: TrainConfig, tokenizer, mesh):
    """RETRO-fit (§4.2): the state's decoder parameters from the run ``tc.retrofit`` and CCA
    outputs at zero (``retro.retrofit``); the base run must have this decoder and tokenizer."""
    base, base_tokenizer, _ = load_run(tc.retrofit)
    want = cfg.replace(retro=None)
    if base.cfg.replace(dtype=want.dtype, param_dtype=want.param_dtype) != want:
        diff = {f: (getattr(base.cfg, f), getattr(want, f)) for f in want.to_dict()
                if getattr(base.cfg, f) != getattr(want, f)}
        raise ValueError(f"TrainConfig.retrofit={tc.retrofit!r}: the base run's model differs "
                         f"from this model without retro in {diff} (base, this)")
    if base_tokenizer.fingerprint != tokenizer.fingerprint:
        raise ValueError(f"TrainConfig.retrofit={tc.retrofit!r}: the base run's tokenizer "
                         f"{base_tokenizer.name} is not this run's {tokenizer.name}")
    model = nnx.merge(graphdef, state["params"])
    nnx.update(model, jax.tree.map(lambda p: p.astype(cfg.param_dtype), nnx.state(base, nnx.Param)))
    retro.zero_cca_outputs(model)
    params = nnx.state(model)
    if mesh is not None:
        params = jax.device_put(params, sharding.state_shardings(params, mesh))
    return dict(state, params=params)


def _all_finite(tree) -> jax.Array:
    """Whether every floating-point leaf of ``tree`` is finite everywhere (one bool)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves \
        else jnp.bool_(True)


def _fit_model_to_data(cfg: ModelConfig, tokenizer, tc: TrainConfig,
                       dtypes: dict) -> tuple[ModelConfig, dict]:
    """The model as trained: the tokenizer's vocabulary, a context of at least seq_len and
    the precision's dtypes (``TrainConfig.model_dtypes``). A changed vocabulary or context
    is said in one line and kept in config.json (``replaced``: field -> [given, used])."""
    fitted = cfg.replace(vocab_size=tokenizer.vocab_size,
                         max_seq_len=max(cfg.max_seq_len, tc.seq_len), **dtypes)
    replaced = {f: [getattr(cfg, f), getattr(fitted, f)]
                for f in ("vocab_size", "max_seq_len") if getattr(cfg, f) != getattr(fitted, f)}
    if replaced and jax.process_index() == 0:
        print("model: " + ", ".join(f"{f} {a} -> {b}" for f, (a, b) in replaced.items())
              + f" (to fit the tokenizer {tokenizer.name} and seq_len {tc.seq_len})")
    return fitted, replaced


def load_run(run_dir: str | Path) -> tuple[Transformer, Any, dict]:
    """(model with the newest checkpoint's parameters, tokenizer, config.json) of a run."""
    run_dir = Path(run_dir)
    info = runs.read_config(run_dir)
    cfg, tc = ModelConfig.from_dict(info["model"]), TrainConfig.from_dict(info["train"])
    from palmlite import tokenizer as tokenizers
    tok = tokenizers.ByteTokenizer() if tc.tokenizer == "bytes" else \
        tokenizers.load(run_dir / "tokenizer.model")
    graphdef, _, _, state = init_state(cfg, tc, abstract=True)
    ckpt = Checkpointer(run_dir / "checkpoints", tc.keep_checkpoints)
    restored = ckpt.restore_latest(state)
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no readable checkpoint in {str(run_dir / 'checkpoints')!r}")
    return nnx.merge(graphdef, restored[1]["params"]), tok, info
