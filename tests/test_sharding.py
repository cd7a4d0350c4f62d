"""palmlite.sharding: mesh specs, rules, and sharded training on 8 fake CPU devices.

The pytest process keeps its one CPU device (tests/conftest.py). The multi-device checks run
once, in a subprocess started with ``--xla_force_host_platform_device_count=8`` that executes
this file as a script (``_measure``) and prints what it measured as JSON; the tests below
assert on those numbers. Rules and spec errors need no devices and are checked in-process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import AbstractMesh

import palmlite as pl
from palmlite import sharding
from palmlite.train import init_state

# One block with attention, a routed MoE and a dense (shared) MLP: every kind of parameter,
# compiled quickly. Every logical axis divides by 4 except kv_heads=2 (replicated on tensor=4).
MODEL = pl.ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                       max_seq_len=32, vocab_size=64,
                       moe=pl.MoEConfig(n_experts=4, top_k=2, every=1, shared_expert=True))
TRAIN = pl.TrainConfig(tokenizer="bytes", batch_size=8, seq_len=16)
Z_LOSS = 1e-4
# spec -> devices used: pure tensor and expert parallelism on 4 of the 8 devices.
MESHES = {"data=8": 8, "fsdp=8": 8, "tensor=4": 4, "expert=4": 4, "data=2,fsdp=2,tensor=2": 8,
          "pod=2,data=2,tensor=2": 8, "fsdp=2,expert=4": 8}
PICKED = ("params.embed_VxD", "params.blocks.0.attn.q.kernel", "params.blocks.0.attn.k.kernel",
          "params.blocks.0.mlp.shared.down.kernel", "params.blocks.0.mlp.up_ExDxF",
          "params.blocks.0.mlp.router_DxE", "opt.1.0.mu.blocks.0.attn.q.kernel")
# What the rules say for PICKED on each mesh (None: replicated).
EXPECTED_SPECS = {
    "data=8": [[None, None], [None, None, None], [None, None, None], [None, None],
               [None, None, None], [None, None], [None, None, None]],
    "fsdp=8": [[None, "fsdp"], ["fsdp", None, None], ["fsdp", None, None], [None, "fsdp"],
               [None, "fsdp", None], ["fsdp", None], ["fsdp", None, None]],
    "tensor=4": [["tensor", None], [None, "tensor", None], [None, None, None],  # 2 K/V heads
                 ["tensor", None], [None, None, "tensor"], [None, None], [None, "tensor", None]],
    "expert=4": [[None, None], [None, None, None], [None, None, None], [None, None],
                 ["expert", None, None], [None, "expert"], [None, None, None]],
    "data=2,fsdp=2,tensor=2": [["tensor", "fsdp"], ["fsdp", "tensor", None],
                               ["fsdp", "tensor", None], ["tensor", "fsdp"],
                               [None, "fsdp", "tensor"], ["fsdp", None], ["fsdp", "tensor", None]],
    # PaLM's two pods: the pod axis, like data, only splits the batch
    "pod=2,data=2,tensor=2": [["tensor", None], [None, "tensor", None], [None, "tensor", None],
                              ["tensor", None], [None, None, "tensor"], [None, None],
                              [None, "tensor", None]],
    # GShard: experts over expert, and each expert's weights and tokens over fsdp
    "fsdp=2,expert=4": [[None, "fsdp"], ["fsdp", None, None], ["fsdp", None, None],
                        [None, "fsdp"], ["expert", "fsdp", None], ["fsdp", "expert"],
                        ["fsdp", None, None]],
}
EXPECTED_BATCH = {"data=8": ["data", None], "fsdp=8": ["fsdp", None], "tensor=4": [None, None],
                  "expert=4": ["expert", None], "data=2,fsdp=2,tensor=2": [["data", "fsdp"], None],
                  "pod=2,data=2,tensor=2": [["pod", "data"], None],
                  "fsdp=2,expert=4": [["fsdp", "expert"], None]}


def _spec_lists(rows: list[dict]) -> dict[str, list]:
    """PICKED arrays' PartitionSpecs as JSON-like lists, from ``sharding.describe`` rows."""
    return {r["name"]: _as_list(r["spec"]) for r in rows if r["name"] in PICKED}


def _as_list(spec) -> list:
    return [list(a) if isinstance(a, tuple) else a for a in spec]


def _abstract(tree, shardings):
    """ShapeDtypeStructs carrying the shardings: a restore target, or rules to inspect."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


# ---- in-process: syntax, rules (on abstract meshes: no devices needed) ---------------------
def test_mesh_specs_parse_and_fill():
    assert sharding.parse_mesh_spec("data=2, fsdp=2,tensor=2") == dict(data=2, fsdp=2, tensor=2)
    assert sharding.parse_mesh_spec(None) == {"data": -1}
    mesh = sharding.make_mesh("data=-1")  # the one device of this process
    assert dict(mesh.shape) == dict(pod=1, data=1, fsdp=1, tensor=1, expert=1)
    assert sharding.mesh_str(mesh) == "pod=1,data=1,fsdp=1,tensor=1,expert=1"


@pytest.mark.parametrize("spec, message", [
    ("data=2,model=4", r"unknown axis \['model'\]; the axes are \('pod', 'data', 'fsdp'"),
    ("data", "AXIS=SIZE"),
    ("data=two", "integer"),
    ("data=0", "positive integer or -1"),
    ({"tensor": 2.0}, "positive integer or -1"),
    ("data=-1,fsdp=-1", "only one axis may be -1"),
    ("data=2,data=2", "named twice"),
    ("data=2", "needs 2 devices but 1 are available"),
    ("data=-1,tensor=2", "a multiple of 2 devices but 1 are available"),
])
def test_bad_mesh_specs_raise_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(spec)


class _Device:  # what pod_granules reads of a device
    def __init__(self, id, process_index, slice_index=None):
        self.id, self.process_index, self.slice_index = id, process_index, slice_index


def test_pods_are_slices_where_devices_have_them_and_processes_otherwise():
    hosts = [_Device(i, process_index=i // 2) for i in range(8)]  # 4 processes x 2
    assert [[d.id for d in g] for g in sharding.pod_granules(hosts)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    slices = [_Device(i, process_index=i // 2, slice_index=i // 4) for i in range(8)]  # 2 slices
    assert [[d.id for d in g] for g in sharding.pod_granules(slices)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match=r"pod=2 needs the devices of 2 slices .* come from 4; "
                                         r"use pod=4"):
        sharding.make_mesh("pod=2,data=4", hosts)


def test_train_config_checks_the_mesh_syntax_before_anything_runs():
    with pytest.raises(ValueError, match=r"TrainConfig.mesh='dp=2' is invalid: unknown axis"):
        pl.TrainConfig(mesh="dp=2")
    assert pl.TrainConfig(mesh="data=8").mesh == "data=8"  # device count: checked in train()


@pytest.mark.parametrize("spec", MESHES)
def test_rules_give_each_strategy_its_layout(spec):
    sizes = sharding.parse_mesh_spec(spec)
    mesh = AbstractMesh(tuple(sizes.get(a, 1) for a in sharding.AXES), sharding.AXES)
    _, _, _, abstract = init_state(MODEL, TRAIN, abstract=True)
    rows = sharding.describe(_abstract(abstract, sharding.state_shardings(abstract, mesh)))
    assert _spec_lists(rows) == dict(zip(PICKED, EXPECTED_SPECS[spec]))
    assert _as_list(sharding.batch_sharding(mesh, (8, 17)).spec) == EXPECTED_BATCH[spec]


def test_rules_can_be_overridden_and_are_validated():
    mesh = AbstractMesh((1, 1, 4, 1, 1), sharding.AXES)
    spec = lambda names, shape, rules: sharding.partition_spec(names, shape, mesh,
                                                               sharding.make_rules(rules))
    assert spec(("embed", "mlp"), (32, 64), None) == sharding.P("fsdp", None)
    assert spec(("embed", "mlp"), (32, 64), {"embed": None}) == sharding.P(None, None)  # no FSDP
    # vocab rows over fsdp too: a mesh axis splits one dimension only, the first one asking
    assert spec(("vocab", "embed"), (64, 32), {"vocab": "fsdp"}) == sharding.P("fsdp", None)
    # ... unless it does not divide it: 259 rows stay whole and embed gets the axis
    assert spec(("vocab", "embed"), (259, 32), {"vocab": "fsdp"}) == sharding.P(None, "fsdp")
    with pytest.raises(ValueError, match="sharding rule 'embed'"):
        sharding.make_rules({"embed": "model"})
    with pytest.raises(ValueError, match="batch_size=6 is not divisible"):
        sharding.batch_sharding(mesh, (6, 17))


# ---- 8 CPU devices, in a subprocess ---------------------------------------------------------
@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               PALMLITE_CACHE=str(tmp / "cache"))
    proc = subprocess.run([sys.executable, __file__, str(tmp)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.splitlines()[-1]), stderr=proc.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("spec", MESHES)
def test_sharded_loss_and_gradients_equal_one_device(measured, spec):
    m = measured["meshes"][spec]
    assert m["devices"] == MESHES[spec]
    assert m["loss_rel"] <= 1e-5
    assert m["grad_rel"] <= 1e-5  # per parameter: max |difference| / max |gradient|


@pytest.mark.slow
@pytest.mark.parametrize("spec", MESHES)
def test_arrays_really_are_sharded_as_the_rules_say(measured, spec):
    m = measured["meshes"][spec]
    assert m["specs"] == dict(zip(PICKED, EXPECTED_SPECS[spec]))
    assert m["batch_spec"] == EXPECTED_BATCH[spec]


@pytest.mark.slow
def test_no_mesh_makes_xla_replicate_a_tensor_to_reshard_it(measured):
    """XLA's last resort when it cannot move an array from one layout to another is to
    gather it whole on every device ("involuntary full rematerialization"): the embedding
    gradient on a d_model-split table, and expert buffers whose rows were split over the
    expert axis, did so until the model gave their layouts (sharding.constrain)."""
    bad = [line[:700] for line in measured["stderr"].splitlines()
           if "Involuntary full rematerialization" in line]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_each_pod_holds_half_the_batch_and_a_whole_copy_of_the_weights(measured):
    """pod=2,data=2,tensor=2: rows split 4 ways over (pod, data); the 4 query heads split
    over tensor only, so device (1, d, t) holds exactly what device (0, d, t) holds."""
    rows = measured["pod_slices"]
    assert [(r["pod"], r["data"], r["tensor"]) for r in rows] == \
        [(p, d, t) for p in range(2) for d in range(2) for t in range(2)]
    assert [r["batch"] for r in rows] == [f"{2 * i}:{2 * i + 2},:" for i in range(4) for _ in "tt"]
    assert [r["q"] for r in rows] == [":,0:2,:", ":,2:4,:"] * 4


@pytest.mark.slow
def test_checkpoint_saved_on_one_mesh_restores_onto_another(measured):
    c = measured["checkpoint"]
    assert c["specs"] == dict(zip(PICKED, EXPECTED_SPECS["data=2,fsdp=2,tensor=2"]))  # new layout
    assert c["equal"]  # every array restored exactly
    assert c["loss_rel"] <= 1e-5


@pytest.mark.slow
def test_cli_trains_on_a_mesh_and_resumes_on_another(measured):
    """`palmlite train --mesh ...`: 4 steps on a 2x2x2 mesh (initialised in its shards),
    resumed to 8 on fsdp=8, follows the one-device run's losses."""
    c = measured["cli"]
    assert c["status"] == [0, 0, 0]
    assert c["mesh_steps"] == c["one_device_steps"] == [4, 8]
    assert c["losses"] == pytest.approx(c["one_device_losses"], rel=1e-4)


@pytest.mark.slow
def test_retro_trains_on_a_mesh_like_on_one_device(measured):
    """A RETRO run's batches (tokens and neighbours) split over a 2x2x2 mesh: the same
    losses as one device."""
    r = measured["retro"]
    assert r["status"] == [0, 0]
    assert r["losses"] == pytest.approx(r["one_device_losses"], rel=1e-4)


def _measure(tmp: Path) -> dict:
    """Run with 8 devices: every number the tests above check, as one dict."""
    import numpy as np
    from palmlite import cli
    from palmlite.checkpoint import Checkpointer
    from palmlite.train import loss_and_grads

    # A random state from numpy: XLA takes long to compile random initialisers on a CPU, and
    # the checks here need values, not palmlite's init (the command line below uses that).
    graphdef, _, _, abstract = init_state(MODEL, TRAIN, abstract=True)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)
    batch = rng.integers(0, MODEL.vocab_size, (8, 17), dtype=np.int32)
    (ref_loss, _), ref_grads = jax.jit(loss_and_grads, static_argnums=(0, 3))(
        graphdef, state["params"], batch, Z_LOSS)  # the one-device step
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-30))
    out, on_mesh = {"meshes": {}}, {}
    for spec, n in MESHES.items():
        mesh = sharding.make_mesh(spec, jax.devices()[:n])
        shardings = sharding.state_shardings(state, mesh)
        batch_sh = sharding.batch_sharding(mesh, batch.shape)
        fn = jax.jit(sharding.tracing_on(mesh, loss_and_grads), static_argnums=(0, 3),
                     in_shardings=(shardings["params"], batch_sh))
        sharded = jax.device_put(state, shardings)
        placed = sharding.place_batch(lambda rows: batch[rows], batch.shape, batch_sh)
        (loss, _), grads = fn(graphdef, sharded["params"], placed, Z_LOSS)
        out["meshes"][spec] = dict(
            devices=mesh.size, loss_rel=rel(loss, ref_loss),
            grad_rel=max(map(rel, jax.tree.leaves(grads), jax.tree.leaves(ref_grads))),
            specs=_spec_lists(sharding.describe(sharded)), batch_spec=_as_list(batch_sh.spec))
        on_mesh[spec] = fn, shardings, batch_sh, sharded
        if spec.startswith("pod="):
            q = next(x for path, x in jax.tree_util.tree_flatten_with_path(sharded)[0]
                     if "attn" in str(path) and "'q'" in str(path) and "params" in str(path))
            out["pod_slices"] = sharding.device_slices(mesh, dict(batch=placed, q=q))

    # Saved on fsdp=8, restored onto the 2x2x2 mesh, evaluated there.
    ckpt = Checkpointer(tmp / "ckpt", keep=1)
    ckpt.save(1, on_mesh["fsdp=8"][3], dict(step=1))
    fn, shardings, batch_sh, _ = on_mesh["data=2,fsdp=2,tensor=2"]
    _, restored, _ = ckpt.restore_latest(_abstract(state, shardings))
    ckpt.close()
    placed = sharding.place_batch(lambda rows: batch[rows], batch.shape, batch_sh)
    (loss, _), _ = fn(graphdef, restored["params"], placed, Z_LOSS)
    out["checkpoint"] = dict(
        specs=_spec_lists(sharding.describe(restored)), loss_rel=rel(loss, ref_loss),
        equal=all(map(np.array_equal, jax.tree.leaves(restored), jax.tree.leaves(state))))

    # The command line: 4 steps on one mesh, resumed to 8 on another; 8 steps on one device.
    docs = tmp / "docs"
    docs.mkdir()
    for i in range(8):
        (docs / f"{i}.txt").write_text("the cat sat on the mat. " * (20 + i))
    argv = lambda run, steps: [
        "train", "--preset", "tiny", "--corpus", str(docs), "--tokenizer", "bytes", "--steps",
        str(steps), "--out", str(tmp / run), "--quiet", "--set", "model.n_layers=1",
        *[f"--set=train.{k}" for k in ("batch_size=8", "seq_len=16", "log_every=4", "eval_every=0",
                                       "eval_batches=1", "schedule=constant", "warmup_steps=0")]]
    status = [cli.main(argv("mesh", 4) + ["--mesh", "data=2,fsdp=2,tensor=2"]),
              cli.main(argv("mesh", 8) + ["--mesh", "fsdp=8", "--resume"]),
              cli.main(argv("one", 8))]
    rows = {run: [json.loads(line) for line in (tmp / run / "metrics.jsonl").open()]
            for run in ("mesh", "one")}
    out["cli"] = dict(status=status, mesh_steps=[r["step"] for r in rows["mesh"]],
                      one_device_steps=[r["step"] for r in rows["one"]],
                      losses=[r["loss"] for r in rows["mesh"]],
                      one_device_losses=[r["loss"] for r in rows["one"]])
    # RETRO: batches carry their neighbours, split over the mesh along the rows too.
    retro = lambda run: argv(run, 4)[:2] + ["tiny-retro"] + argv(run, 4)[3:] + [
        "--set", "model.retro.chunk_size=8", "--set", "model.retro.encoder_d_model=16"]
    status = [cli.main(retro("retro-mesh") + ["--mesh", "data=2,fsdp=2,tensor=2"]),
              cli.main(retro("retro-one"))]
    losses = {run: [json.loads(line)["loss"] for line in (tmp / run / "metrics.jsonl").open()]
              for run in ("retro-mesh", "retro-one")}
    out["retro"] = dict(status=status, losses=losses["retro-mesh"],
                        one_device_losses=losses["retro-one"])
    return out


if __name__ == "__main__":
    result = _measure(Path(sys.argv[1]))
    print(json.dumps(result))
