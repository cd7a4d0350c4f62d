"""Scale out on JAX's device mesh: one mesh, one table of rules, no hand-written communication.

Pathways' point (and PaLM §4's) is that one program runs from one chip to thousands. In JAX
that program is an ordinary jitted step whose inputs carry shardings; XLA's SPMD partitioner
inserts the all-gathers, reduce-scatters and all-to-alls. palmlite only decides *where each
array lives*:

- a **mesh** names the devices along five axes, always in this order:
  ``pod`` (data parallelism *between* pods or hosts, over the slower data-centre network:
  parameters replicated, batch split; PaLM §4's two TPU v4 pods. It is the outermost axis,
  so its collectives are the only ones that leave a pod: one gradient all-reduce a step),
  ``data`` (pure data parallelism: parameters replicated, batch split),
  ``fsdp`` (ZeRO-3 / fully sharded data parallelism: batch split *and* parameters split along
  their ``embed`` dimension, gathered just in time for each matmul),
  ``tensor`` (Megatron-style: heads and the MLP hidden dimension split, so each device holds
  a column slice of the first matmul and a row slice of the second),
  ``expert`` (GShard / GLaM: each device holds some experts; tokens travel to them);
- **rules** map each logical axis name a parameter carries (``palmlite.layers.make_param``)
  onto mesh axes. One table serves every strategy: a mesh axis of size 1 shards nothing, so
  ``data=8`` is pure data parallelism, ``fsdp=8`` is ZeRO-3, ``data=2,tensor=4`` is PaLM's
  2D layout (PaLM §4: data × model parallelism, no pipeline), and ``pod=2,data=2,tensor=4``
  is that layout on two pods (``make_mesh``: each pod's devices are one TPU slice, or one
  process's devices where there are no slices).

A dimension that its mesh axes do not divide (e.g. one K/V head of multi-query attention on
``tensor=4``, or a 259-token byte vocabulary on ``tensor=2``) is **replicated** instead of
failing; PaLM §4 replicates its single K/V head the same way. Optimizer moments mirror the
parameters (optax maps over the parameter tree, so they carry the same annotations) and get
the same sharding; anything else (step counters, Adafactor's factored row/column moments,
whose rank differs from their parameter's) is replicated.

Activations are XLA's to lay out, except where it cannot infer a good layout and would
gather a whole tensor on every device instead ("involuntary full rematerialization"): there
the model names the logical axes of the array (``constrain``: embedding tables gathered
before the lookup, expert buffers split over experts), resolved by the same rules on the
mesh the step is traced for (``tracing_on``) and ignored off a mesh.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("pod", "data", "fsdp", "tensor", "expert")

# logical axis name -> mesh axis, a tuple of mesh axes, or None (replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("pod", "data", "fsdp", "expert"),  # every data-like axis splits the batch (GShard)
    "length": None,  # no sequence parallelism
    "vocab": "tensor",  # embedding rows split like a column-parallel matmul
    "embed": "fsdp",  # ZeRO-3: every weight split along d_model
    "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",  # Megatron column/row splits
    "head_dim": None,
    "expert": "expert",  # GShard: experts spread over devices
}


# ---- meshes --------------------------------------------------------------------------------
def parse_mesh_spec(spec: str | dict[str, int] | None) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` or ``{"data": -1}`` -> {axis: size}; -1 fills the devices
    left over, None means ``data=-1``. Checks the syntax only (no devices needed), so that
    ``TrainConfig.mesh`` is validated before anything runs."""
    if spec is None:
        return {"data": -1}
    if isinstance(spec, str):
        pairs = [p.partition("=") for p in spec.split(",")]
        if any(not sep for _, sep, _ in pairs):
            raise _invalid(spec, "expected AXIS=SIZE pairs separated by commas")
        items = [(k.strip(), v.strip()) for k, _, v in pairs]
        if len({k for k, _ in items}) < len(items):
            raise _invalid(spec, "an axis is named twice")
        try:
            sizes = {k: int(v) for k, v in items}
        except ValueError:
            raise _invalid(spec, "every SIZE must be an integer") from None
    elif isinstance(spec, dict):
        sizes = dict(spec)
    else:
        raise _invalid(spec, "expected a str such as 'data=2,tensor=4' or a dict")
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise _invalid(spec, f"unknown axis {unknown}; the axes are {AXES}")
    for axis, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise _invalid(spec, f"{axis}={size!r}: a size is a positive integer or -1 (fill)")
    if list(sizes.values()).count(-1) > 1:
        raise _invalid(spec, "only one axis may be -1")
    return sizes


def _invalid(spec, why: str) -> ValueError:
    return ValueError(f"mesh={spec!r} is invalid: {why}")


def make_mesh(spec: str | dict[str, int] | None = None, devices=None) -> Mesh:
    """A mesh with axes (pod, data, fsdp, tensor, expert) over ``devices`` (default: all).

    Unnamed axes have size 1; the product of the sizes must equal the device count. Axes are
    ``Auto`` (XLA propagates shardings through the step), not JAX's newer ``Explicit`` ones.
    With ``pod`` > 1 each pod is one *granule* of the slow network (``pod_granules``), laid
    out by ``jax.experimental.mesh_utils.create_hybrid_device_mesh``; devices of one granule
    (one process on a laptop) make a simulated pod axis: the same program and collectives.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec)
    shape = [sizes.get(axis, 1) for axis in AXES]
    fixed = math.prod(s for s in shape if s != -1)
    if -1 in shape and len(devices) % fixed == 0:
        shape[shape.index(-1)] = len(devices) // fixed
    if math.prod(shape) != len(devices):
        raise _invalid(spec, f"it needs {'a multiple of ' if -1 in shape else ''}{fixed} "
                             f"devices but {len(devices)} are available (the product of the "
                             "sizes must equal the device count; -1 fills). On a CPU, "
                             "XLA_FLAGS=--xla_force_host_platform_device_count=8 set before "
                             "Python starts gives 8 devices")
    auto = (AxisType.Auto,) * len(AXES)
    pods, granules = shape[0], pod_granules(devices)
    if pods == 1 or len(granules) == 1:
        return jax.make_mesh(tuple(shape), AXES, axis_types=auto, devices=devices)
    if len(granules) != pods:
        raise _invalid(spec, f"pod={pods} needs the devices of {pods} slices (or, without "
                             f"slices, processes), one per pod, but they come from "
                             f"{len(granules)}; use pod={len(granules)}, or pod=1 (the other "
                             "axes then span every slice)")
    grid = mesh_utils.create_hybrid_device_mesh(
        [1, *shape[1:]], [pods] + [1] * (len(AXES) - 1), devices,
        process_is_granule=not _has_slices(devices))
    return Mesh(grid, AXES, axis_types=auto)


def pod_granules(devices) -> list[list]:
    """The devices grouped by what the slow network joins: TPU slices where devices carry a
    ``slice_index`` (multislice), else processes (hosts, or ``palmlite launch``'s processes)."""
    key = "slice_index" if _has_slices(devices) else "process_index"
    groups = collections.defaultdict(list)
    for device in devices:
        groups[getattr(device, key)].append(device)
    return [groups[k] for k in sorted(groups)]


def _has_slices(devices) -> bool:
    return all(getattr(d, "slice_index", None) is not None for d in devices)


def mesh_processes(mesh: Mesh) -> dict:
    """The mesh's axis sizes and which process holds each position (``config.json``)."""
    owner = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
    return dict(axes=dict(mesh.shape), process_index=owner.tolist())


def mesh_str(mesh: Mesh) -> str:
    """``data=2,fsdp=1,tensor=4,expert=1``: the mesh as a spec that recreates it."""
    return ",".join(f"{axis}={size}" for axis, size in mesh.shape.items())


# ---- rules ---------------------------------------------------------------------------------
def make_rules(overrides: dict[str, Any] | None = None) -> dict[str, tuple[str, ...]]:
    """DEFAULT_RULES updated by ``overrides`` (e.g. ``{"embed": None}`` turns FSDP off),
    normalised so that every value is a tuple of mesh axes (empty: replicated)."""
    rules = {}
    for name, axes in {**DEFAULT_RULES, **(overrides or {})}.items():
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        if not set(axes) <= set(AXES):
            raise ValueError(f"sharding rule {name!r} -> {axes!r} is invalid: expected None, "
                             f"a mesh axis or a tuple of mesh axes from {AXES}")
        rules[name] = axes
    return rules


def partition_spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                   rules: dict[str, tuple[str, ...]]) -> P:
    """The PartitionSpec of one array whose dimensions carry logical ``names``.

    Mesh axes of size 1 are left out (they shard nothing), a mesh axis splits at most one
    dimension, and a dimension its axes do not divide is replicated (module docstring).
    """
    used, spec = set(), []
    for name, size in zip(names, shape):
        axes = tuple(a for a in rules.get(name, ()) if mesh.shape[a] > 1 and a not in used)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return P(*spec)


def constrain(x: jax.Array, names: tuple[str | None, ...], rules: dict[str, Any] | None = None
              ) -> jax.Array:
    """``x`` laid out as its logical axis ``names`` say, on the mesh the step is traced for
    (``tracing_on``); unchanged outside one, so model code calls it unconditionally."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or set(mesh.axis_names) != set(AXES):
        return x
    return jax.lax.with_sharding_constraint(x, partition_spec(names, x.shape, mesh,
                                                              make_rules(rules)))


def tracing_on(mesh: Mesh | None, fn=None):
    """``fn`` traced with ``mesh`` as the current mesh, for ``constrain`` inside it; without
    ``fn``, a context in which whatever is traced sees ``mesh`` (nothing for None)."""
    if fn is None:
        return contextlib.nullcontext() if mesh is None else \
            jax.sharding.use_abstract_mesh(mesh.abstract_mesh)

    @functools.wraps(fn)
    def traced(*args):
        with tracing_on(mesh):
            return fn(*args)
    return traced


def state_shardings(tree: Any, mesh: Mesh, rules: dict[str, Any] | None = None) -> Any:
    """A NamedSharding for every array of ``tree`` (parameters, optimizer state, counters,
    concrete or abstract), from the logical axes its ``nnx.Variable`` carries."""
    rules = make_rules(rules)

    def one(x):
        if not isinstance(x, nnx.Variable):
            return NamedSharding(mesh, P())
        names = x.get_metadata().get("out_sharding") or ()
        rank_matches = len(names) == len(x.shape)  # not so for Adafactor's factored moments
        spec = partition_spec(names, x.shape, mesh, rules) if rank_matches else P()
        return x.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, shape: tuple[int, int], rules: dict[str, Any] | None = None
                   ) -> NamedSharding:
    """Token batches [B, T+1] split by the ``batch`` rule; B must divide evenly (a replicated
    batch would silently repeat the work on every device)."""
    rules = make_rules(rules)
    spec = partition_spec(("batch", "length"), shape, mesh, rules)
    wanted = math.prod(mesh.shape[a] for a in rules["batch"])
    if wanted > 1 and spec[0] is None:
        raise ValueError(f"batch_size={shape[0]} is not divisible by the mesh's batch axes "
                         f"{rules['batch']} ({wanted} devices in {mesh_str(mesh)})")
    return NamedSharding(mesh, spec)


# ---- data ----------------------------------------------------------------------------------
def place_batch(read_rows, shape: tuple[int, ...], sharding: NamedSharding,
                batch_axis: int = 0) -> jax.Array:
    """The global batch of ``shape`` as one array split over the mesh. ``read_rows(rows)``
    returns the batch's rows in the slice ``rows`` (along ``batch_axis``: 1 for a block of
    batches [K, B, T+1]). With several processes each one reads only the rows its own
    devices hold, each row once (devices that hold the same rows, e.g. along ``tensor``,
    share one read), and the global array is assembled from those local pieces
    (``jax.make_array_from_single_device_arrays``): no process ever holds the whole batch."""
    if jax.process_count() == 1:
        return jax.device_put(read_rows(slice(None)), sharding)
    rows_of = lambda index: slice(*index[batch_axis].indices(shape[batch_axis]))
    pieces = {}  # (start, stop) -> the rows read for them, once
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        rows = rows_of(index)
        key = (rows.start, rows.stop)
        if key not in pieces:
            pieces[key] = read_rows(rows)
        rest = tuple(s if i != batch_axis else slice(None) for i, s in enumerate(index))
        arrays.append(jax.device_put(pieces[key][rest], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


# ---- several hosts -------------------------------------------------------------------------
# What `palmlite launch` sets in each process it starts (or set them by hand, one process per
# machine, where no cluster manager does): process 0's host:port, the count, this one's id.
COORDINATOR, NUM_PROCESSES, PROCESS_ID = \
    "PALMLITE_COORDINATOR", "PALMLITE_NUM_PROCESSES", "PALMLITE_PROCESS_ID"


def initialize_distributed() -> bool:
    """``jax.distributed.initialize`` when this process is one of several; call it before
    anything else touches JAX (it must precede the backend). Returns whether it did.

    Explicit: ``PALMLITE_COORDINATOR``, ``PALMLITE_NUM_PROCESSES``, ``PALMLITE_PROCESS_ID``
    (``palmlite launch`` sets them: ``palmlite.launch``). Detected: SLURM with more than one
    task (``srun``), Open MPI (``mpirun``), an explicit ``JAX_COORDINATOR_ADDRESS``, or
    ``PALMLITE_DISTRIBUTED=1`` (a TPU pod slice, whose workers JAX finds through the TPU
    metadata server). For those, ``jax.distributed.initialize()`` with no arguments reads
    the process count, this process's id and the coordinator from the environment itself,
    so the one code path runs on a laptop, a SLURM cluster and a TPU pod.

    On the CPU the collectives between processes are gloo's over TCP (JAX's
    ``jax_cpu_collectives_implementation``; "gloo" is the default since JAX 0.5, set here
    for older ones, which had none and refused computations spanning processes).
    """
    if jax.distributed.is_initialized():
        return False
    explicit = _explicit_processes(os.environ)
    env = os.environ
    several = (int(env.get("SLURM_NTASKS", "1")) > 1
               or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
               or "JAX_COORDINATOR_ADDRESS" in env or env.get("PALMLITE_DISTRIBUTED") == "1")
    if explicit is None and not several:
        return False
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**(explicit or {}))
    return True


def _explicit_processes(env) -> dict | None:
    """initialize()'s arguments from the PALMLITE_* variables, checked; None if unset."""
    names = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)
    given = [n for n in names if env.get(n)]
    if not given:
        return None
    if len(given) < len(names):
        raise ValueError(f"{sorted(set(names) - set(given))} unset but {given} set: several "
                         f"processes need all of {names} (`palmlite launch` sets them)")
    try:
        n, i = int(env[NUM_PROCESSES]), int(env[PROCESS_ID])
    except ValueError:
        raise ValueError(f"{NUM_PROCESSES}={env[NUM_PROCESSES]!r} and {PROCESS_ID}="
                         f"{env[PROCESS_ID]!r} must be integers") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"{PROCESS_ID}={i} with {NUM_PROCESSES}={n}: expected "
                         f"{NUM_PROCESSES} >= 1 and 0 <= {PROCESS_ID} < {NUM_PROCESSES}")
    return dict(coordinator_address=env[COORDINATOR], num_processes=n, process_id=i)


# ---- inspection ----------------------------------------------------------------------------
def bytes_per_device(tree: Any) -> dict[Any, int]:
    """Bytes each local device holds for the arrays of ``tree``, summed over their shards."""
    held: dict[Any, int] = collections.Counter()
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return dict(held)


def device_slices(mesh: Mesh, arrays: dict[str, jax.Array]) -> list[dict]:
    """One row per device of ``mesh``, in mesh order: its coordinate on each mesh axis, its
    process, and for each named array the slices of it that device holds (``"0:4"`` along
    a split dimension, ``":"`` along a whole one)."""
    held = {name: x.sharding.devices_indices_map(x.shape) for name, x in arrays.items()}
    text = lambda index, shape: ",".join(
        ":" if (sl.start or 0) == 0 and (sl.stop is None or sl.stop == size) else
        f"{sl.start or 0}:{sl.stop}" for sl, size in zip(index, shape))
    rows = []
    for coord in np.ndindex(mesh.devices.shape):
        device = mesh.devices[coord]
        rows.append(dict(zip(mesh.axis_names, coord), device=device.id,
                         process=device.process_index,
                         **{name: text(held[name][device], arrays[name].shape)
                            for name in arrays}))
    return rows


def describe(tree: Any) -> list[dict]:
    """One row per array: path, global shape, PartitionSpec and the shape one device holds."""
    rows = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value")
        rows.append(dict(name=name, shape=x.shape, spec=x.sharding.spec,
                         per_device=x.sharding.shard_shape(x.shape)))
    return rows
