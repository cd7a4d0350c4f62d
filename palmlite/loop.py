"""The host side of training: feeds batches to the compiled step, logs metrics, evaluates,
checkpoints and stops on a non-finite step (``palmlite.train`` builds the step and the state).

The loop syncs with the device only at log steps: between them it dispatches calls of
``steps_per_call`` steps and keeps their metrics on the device.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from palmlite import runs, sharding
from palmlite.accounting import device_peak_flops, flops_per_token, hardware_flops_per_token
from palmlite.evaluate import evaluate, evaluate_domains
from palmlite.mixture import MixtureDataset
from palmlite.train_config import TrainConfig


class TrainingLoop:
    """The host side: feeds batches, logs, evaluates, checkpoints, guards against NaN."""

    def __init__(self, tc, cfg, graphdef, schedule, batches, val_ds, train_ds, run_dir, ckpt,
                 batch_sharding=None, val_windows=None):
        self.tc, self.cfg, self.graphdef, self.schedule = tc, cfg, graphdef, schedule
        self.batches, self.val_ds, self.train_ds = batches, val_ds, train_ds
        self.run_dir, self.ckpt = run_dir, ckpt
        self.metrics: list[dict] = []
        peak = device_peak_flops(jax.devices()[0].device_kind)
        # Without a mesh the step runs on one device, whatever the machine has.
        self.mesh = None if batch_sharding is None else jax.tree.leaves(batch_sharding)[0].mesh
        n_devices = 1 if self.mesh is None else self.mesh.size
        self.peak = None if peak is None else peak * n_devices
        self.flops_per_token = flops_per_token(cfg, tc.seq_len)
        self.hardware_flops = hardware_flops_per_token(cfg, tc.seq_len)  # + remat's recompute
        self.batch_sharding = batch_sharding
        self.val_windows = val_windows  # RETRO: validation windows with their neighbours
        # Where the time goes (seconds): compiling the step, training steps (batches
        # included), evaluation and checkpoints. Setup before the loop is the caller's.
        self.seconds = dict(compile=0.0, training=0.0, evaluation=0.0, checkpoint=0.0)
        self.tokens_read = 0  # of the training rows this process read (seq_len per row)

    def run(self, make_step, state, start: int):
        """Train from step ``start`` to the end in calls of ``steps_per_call`` steps, each
        call ending at the latest at the next log/eval/checkpoint step."""
        tc, total, k = self.tc, self.tc.total_steps, self.tc.steps_per_call
        if self.run_dir is not None:
            self.metrics = runs.read_metrics(self.run_dir / "metrics.jsonl", upto=start)
        shape = batch_shapes(tc, self.cfg, k)
        t0 = time.perf_counter()  # compiled ahead of time: tokens/s never includes compiling
        args = [jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.int32), shape,
                             is_leaf=_is_shape)] + \
            ([] if k == 1 else [jax.ShapeDtypeStruct((), jnp.int32)])  # + steps to train
        step_fn = make_step(k).lower(state, *args).compile()
        self.seconds["compile"] += time.perf_counter() - t0
        bar, self.step = _progress(total, start, tc.quiet), start
        try:
            return self._steps(step_fn, state, shape, bar)
        except KeyboardInterrupt:  # Ctrl-C: say where the run stands (the CLI adds how to resume)
            raise KeyboardInterrupt(self._interrupted()) from None
        finally:
            bar.close()

    def _interrupted(self) -> str:
        kept = self.ckpt.steps()[-1:] if self.ckpt else []
        return (f"interrupted near step {self.step}; " + (
            f"the newest checkpoint is step {kept[0]}, where a resume continues" if kept else
            "no checkpoint was saved yet" if self.ckpt else "no run directory: nothing to resume"))

    def _steps(self, step_fn, state, shape, bar):
        tc, k, step = self.tc, self.tc.steps_per_call, self.step
        total = _end(tc)  # the run's last step, or where stop_after interrupts it
        pending, t0 = [], time.perf_counter()
        while step < total:
            n = min(k, self._next_sync(step) - step)
            batch = self._place(lambda rows: self._read(step, n, k, rows), shape)
            state, m = step_fn(state, batch) if k == 1 else step_fn(state, batch, np.int32(n))
            pending.append((k, n, m))
            step = self.step = step + n
            if step == self._next_sync(step - 1):
                pending = _per_step(jax.device_get(pending))  # the only host sync
                self.seconds["training"] += time.perf_counter() - t0
                self._log(state, pending, step, time.perf_counter() - t0, bar,
                          step == total or _every(step, tc.eval_every))
                if step == total or _every(step, tc.checkpoint_every):
                    self._checkpoint(state, step)
                pending, t0 = [], time.perf_counter()  # evaluating and saving are not training
        return state

    def _next_sync(self, step: int) -> int:
        """The first step after ``step`` that logs, evaluates, checkpoints or ends the run."""
        tc = self.tc
        ahead = [-(-(step + 1) // n) * n for n in (tc.log_every, tc.eval_every, tc.checkpoint_every)
                 if n > 0]
        return min([_end(tc), *ahead])

    def _read(self, step: int, n: int, k: int, rows) -> np.ndarray:
        """Batch ``step`` ([B, T+1]), or with k > 1 a block of k: batches step..step+n-1,
        then zeros for the steps the call skips."""
        n_rows = len(range(*rows.indices(self.tc.batch_size)))
        self.tokens_read += n * n_rows * self.tc.seq_len
        if k == 1:
            return self.batches.get(step, rows)
        batches = [self.batches.get(s, rows) for s in range(step, step + n)]
        pad = lambda x: np.concatenate([x, np.zeros((k - n, *x.shape[1:]), x.dtype)])
        return jax.tree.map(lambda *xs: pad(np.stack(xs)), *batches)

    def _place(self, read_rows, shape):
        """A batch (or block of batches; a RETRO batch: a dict of tokens and neighbours) on
        the devices: whole, or split over the mesh along its batch rows, each host reading
        only its own rows (``read_rows(rows)``)."""
        if self.batch_sharding is None:
            return jax.tree.map(jnp.asarray, read_rows(slice(None)))
        if isinstance(shape, dict):  # each slice of rows read once, for all the arrays
            read = {}

            def part(rows, name):
                key = (rows.start, rows.stop, rows.step)
                if key not in read:
                    read[key] = read_rows(rows)
                return read[key][name]
            return {name: _place_array(lambda rows, n=name: part(rows, n), shape[name],
                                       self.batch_sharding[name]) for name in shape}
        return _place_array(read_rows, shape, self.batch_sharding)

    def _log(self, state, pending, done, elapsed, bar, evaluate_now: bool):
        got = pending  # already on the host: read after the interval's steps finished
        self._check_finite(state)
        tc = self.tc
        tokens_per_s = len(got) * tc.batch_size * tc.seq_len / elapsed
        loss = sum(float(m["loss"]) for m in got) / len(got)
        row = dict(step=done, tokens=done * tc.batch_size * tc.seq_len,
                   epoch=self.batches.epoch(done), loss=loss,
                   z_loss=sum(float(m["z_loss"]) for m in got) / len(got),
                   grad_norm=float(got[-1]["grad_norm"]), lr=float(self.schedule(done - 1)),
                   bits_per_byte=self.train_ds.bits_per_byte(loss), tokens_per_s=tokens_per_s,
                   mfu=None if self.peak is None else tokens_per_s * self.flops_per_token / self.peak,
                   hfu=None if self.peak is None else tokens_per_s * self.hardware_flops / self.peak,
                   tokens_read_per_process=self._tokens_read_per_process())
        if "expert_load" in got[-1]:  # a mixture of experts: interval means
            row.update({k: sum(float(m[k]) for m in got) / len(got)
                        for k in ("aux_loss", "router_z_loss", "dropped_fraction",
                                  "router_entropy")},
                       **{k: (sum(m[k] for m in got) / len(got)).tolist()
                          for k in ("expert_load", "expert_load_per_layer")})
        if evaluate_now:
            t0 = time.perf_counter()
            row.update(self._evaluate(state))
            self.seconds["evaluation"] += time.perf_counter() - t0
        self.metrics.append(row)
        if self.run_dir is not None and jax.process_index() == 0:  # one writer per run
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        bar.update(len(got))

    def _tokens_read_per_process(self) -> list[int]:
        """Training tokens each process has read since it started, by process index: with
        several, each reads only its own rows of every batch (``sharding.place_batch``),
        1/P of them on a data-parallel mesh. Every process sends its count to all (a small
        host collective, at log steps only) so that process 0 can write them."""
        if jax.process_count() == 1:
            return [self.tokens_read]
        from jax.experimental import multihost_utils
        counts = multihost_utils.process_allgather(np.int64(self.tokens_read))
        return [int(c) for c in np.asarray(counts).reshape(-1)]

    def _evaluate(self, state) -> dict:
        """Validation loss and bits per byte; RETRO: with retrieval, and without it."""
        tc, model = self.tc, nnx.merge(self.graphdef, state["params"])
        place = lambda b: self._place(lambda rows: jax.tree.map(lambda x: x[rows], b),
                                      jax.tree.map(np.shape, b))
        run = lambda windows, put: evaluate(model, self.val_ds, tc.seq_len, tc.batch_size,
                                            tc.eval_batches, put=put, windows=windows)
        with sharding.tracing_on(self.mesh):  # the model's layout hints, as in training
            return self._evaluate_on(model, place, run)

    def _evaluate_on(self, model, place, run) -> dict:
        tc = self.tc
        if isinstance(self.val_ds, MixtureDataset):
            return evaluate_domains(model, self.val_ds, tc.seq_len, tc.batch_size,
                                    tc.eval_batches, put=place)
        ev = run(self.val_windows, place)
        row = dict(val_loss=ev["loss"], val_bits_per_byte=ev["bits_per_byte"])
        if self.val_windows is not None:
            off = run(self.val_windows["tokens"], lambda b: self._place_tokens(b))
            row.update(val_loss_no_retrieval=off["loss"],
                       val_bits_per_byte_no_retrieval=off["bits_per_byte"])
        return row

    def _place_tokens(self, b):
        """Token windows alone onto the mesh (retrieval off in a RETRO run)."""
        if self.batch_sharding is None:
            return jnp.asarray(b)
        return _place_array(lambda rows: b[rows], b.shape, self.batch_sharding["tokens"])

    def _check_finite(self, state) -> None:
        bad = int(state["bad_step"])
        if bad >= 0:
            kept = self.ckpt.steps()[-1:] if self.ckpt else []
            raise FloatingPointError(
                f"non-finite loss or update at step {bad}: training stopped (no update was "
                f"applied from that step on). Last good checkpoint kept: "
                f"{f'step {kept[0]}' if kept else 'none'}.")

    def _checkpoint(self, state, done: int) -> None:
        if self.ckpt is None:
            return
        self._check_finite(state)  # never save a state that has seen a NaN
        t0 = time.perf_counter()
        self.ckpt.save(done, state, dict(step=done, tokens=done * self.tc.batch_size * self.tc.seq_len))
        self.seconds["checkpoint"] += time.perf_counter() - t0


def batch_shapes(tc: TrainConfig, cfg, k: int = 1):
    """The shape of one call's batch: [B, T+1] tokens, or for RETRO a dict of those and the
    neighbours [B, C, J, R], for a mixture of those and the domains [B]; with k > 1 a block
    of k of them (a leading axis)."""
    shape = (tc.batch_size, tc.seq_len + 1)
    if cfg.retro is not None:
        r = cfg.retro
        shape = dict(tokens=shape, neighbours=(tc.batch_size, tc.seq_len // r.chunk_size,
                                               r.n_neighbours, r.neighbour_len))
    if tc.is_mixture:  # each row's domain id (palmlite.mixture)
        shape = dict(tokens=shape, domains=(tc.batch_size,))
    return shape if k == 1 else jax.tree.map(lambda s: (k, *s), shape, is_leaf=_is_shape)


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def _place_array(read_rows, shape: tuple[int, ...], batch_sharding: NamedSharding) -> jax.Array:
    """One array of a batch (rank = the sharding's) or of a block of batches (one more axis
    in front, not split) onto the mesh."""
    if len(shape) == len(batch_sharding.spec):
        return sharding.place_batch(read_rows, shape, batch_sharding)
    block = NamedSharding(batch_sharding.mesh, P(None, *batch_sharding.spec))
    return sharding.place_batch(read_rows, shape, block, batch_axis=1)


def _per_step(calls: list[tuple[int, int, dict]]) -> list[dict]:
    """Host copies of (k, n, metrics) per call as one dict per optimizer step: a block's
    metrics are stacked [k], of which the first n are steps that were trained."""
    return [m if k == 1 else {name: value[i] for name, value in m.items()}
            for k, n, m in calls for i in range(n)]


def _end(tc: TrainConfig) -> int:
    """The step this call trains to: the run's end, or ``stop_after`` (evaluated and
    checkpointed there, as at the end)."""
    return tc.total_steps if tc.stop_after is None else tc.stop_after


def _every(done: int, interval: int) -> bool:
    return interval > 0 and done % interval == 0


def _progress(total: int, start: int, quiet: bool):
    """tqdm.auto: a widget in Jupyter, a bar in a terminal; quiet: an update every 30 s."""
    hidden = jax.process_index() > 0  # several processes: one bar, process 0's
    if quiet:
        from tqdm.std import tqdm
        return tqdm(total=total, initial=start, mininterval=30, maxinterval=60, ascii=True,
                    disable=hidden)
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, unit="step", disable=hidden)
