"""Run directories: what ``palmlite.train`` writes into ``out`` and reads back to resume.

A run directory holds ``config.json`` (the model and training configs as trained, the data
fingerprints, device and versions), ``metrics.jsonl`` (one line per logged step),
``checkpoints/`` (orbax, one folder per saved step), ``tokenizer.model`` (a trained
vocabulary) and ``.lock`` (held by the one trainer writing it). Every file read here is
checked, so a torn or foreign file gets an error naming it rather than a traceback.
"""

from __future__ import annotations

import contextlib
import json
import platform
import warnings
from pathlib import Path

import jax

from palmlite import __version__
from palmlite.config import ModelConfig
from palmlite.files import atomic_write_text
from palmlite.sharding import mesh_processes
from palmlite.train_config import TrainConfig

# Fields that may differ when resuming (they do not change what is computed).
RESUMABLE_CHANGES = {"steps", "tokens", "stop_after", "log_every", "eval_every",
                     "checkpoint_every", "keep_checkpoints", "quiet", "mesh", "steps_per_call"}
CONFIG_KEYS = ("model", "train", "data")  # what read_config needs in config.json


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold ``<run>/.lock`` while training (the OS releases it if the process dies)."""
    from filelock import FileLock, Timeout
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{str(run_dir)!r} is a file, not a run directory: choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(f"{str(run_dir)!r} is in use by another trainer (it holds "
                         f"{str(run_dir / '.lock')!r}); wait for it, or train into another "
                         "directory") from None
    try:
        yield
    finally:
        lock.release()


def read_config(run_dir: Path) -> dict:
    """The run's ``config.json``, checked to be one that ``train`` wrote."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no run at {str(run_dir)!r}: {str(path)!r} is missing")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}): the run's config is damaged") \
            from None
    missing = [k for k in CONFIG_KEYS if not isinstance(info, dict) or k not in info]
    if missing:
        raise ValueError(f"{str(path)!r} is not a palmlite run's config: it lacks {missing}")
    return info


def read_metrics(path: Path, upto: int) -> list[dict]:
    """Existing metric lines up to step ``upto``; later ones (from a killed run) are dropped,
    and so is a torn last line (a kill during its write), with a warning."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise ValueError(f"{str(path)!r} line {i + 1} is not valid JSON ({e})") from None
            warnings.warn(f"{str(path)!r}: dropped a torn last line ({line[:40]!r}...)",
                          stacklevel=2)
    kept = [r for r in rows if r["step"] <= upto]
    if jax.process_index() == 0:  # one writer per run, as for every line after these
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def prepare_run_dir(run_dir: Path, cfg: ModelConfig, tc: TrainConfig, resume: bool):
    """A fresh run: refuse a directory holding checkpoints. A resumed one: the saved model
    config, and ``tc`` once its changes from the saved one are checked to be resumable."""
    has_checkpoints = (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir())
    if not resume:
        if has_checkpoints:
            raise ValueError(f"{str(run_dir)!r} already holds a run: resume it (--resume / "
                             "resume=True) or choose another output directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        return cfg, tc
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"cannot resume: {str(run_dir / 'config.json')!r} does not exist")
    saved = read_config(run_dir)
    saved_tc = TrainConfig.from_dict(saved["train"])
    changed = {k for k, v in tc.to_dict().items() if v != getattr(saved_tc, k)}
    if changed - RESUMABLE_CHANGES:
        raise ValueError(f"cannot resume {str(run_dir)!r} with changed settings "
                         f"{sorted(changed - RESUMABLE_CHANGES)}; only {sorted(RESUMABLE_CHANGES)} "
                         "may change")
    return ModelConfig.from_dict(saved["model"]), tc


def same_data_as_saved(run_dir: Path | None, kind: str, now) -> None:
    """A resumed run must see the corpus and tokenizer it was trained on: new token ids
    under old embeddings would train on silently (``now``: a Corpus or a tokenizer)."""
    if run_dir is None:
        return
    saved = read_config(run_dir)["data"][kind]
    current = now.to_dict()
    if saved["fingerprint"] != current["fingerprint"]:
        raise ValueError(
            f"cannot resume {str(run_dir)!r}: its {kind} was {saved['name']!r} (fingerprint "
            f"{saved['fingerprint'][:12]}) and is now {current['name']!r} (fingerprint "
            f"{current['fingerprint'][:12]}); resume with the run's data, or start a new run")


def run_info(cfg, tc, tokenizer, corpus, train_ds, val_ds, mesh=None) -> dict:
    """What config.json records: the configs as trained, the data, the devices (and on a
    mesh, which process holds each of its positions), versions."""
    device = jax.devices()[0]
    return dict(model=cfg.to_dict(), train=tc.to_dict(),
                data=dict(corpus=corpus.to_dict(), tokenizer=tokenizer.to_dict(),
                          train=train_ds.to_dict(), validation=val_ds.to_dict()),
                device=dict(platform=device.platform, kind=device.device_kind,
                            count=jax.device_count(), processes=jax.process_count(),
                            mesh=None if mesh is None else mesh_processes(mesh)),
                versions=dict(palmlite=__version__, jax=jax.__version__, python=platform.python_version(),
                              **{m: _version(m) for m in ("flax", "optax", "orbax.checkpoint")}))


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(module.replace(".", "-"))
    except PackageNotFoundError:
        return None
