"""Where a run lives and what it continues from (``alexnet train``'s bookkeeping around the
training itself, alexnet/train.py):

- the run directory, claimed and owned by rank 0 for the whole run (one process trains a run
  at a time: ``alexnet.runtime.owner``);
- resuming: only a run's own checkpoint (``alexnet.checkpoint.resume_target``), only with
  the settings that may change (``RESUMABLE_CHANGES``), only onto the data the run
  was trained on (its classes, image size and training images);
- a folder of images as data, prepared once into its cache (``alexnet.data.folders``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alexnet import checkpoint as ckpt_io
from alexnet import config as C
from alexnet.runtime import distributed as D
from alexnet.runtime.errors import UserError
from alexnet.runtime.owner import owned
from alexnet.runtime.runlog import claim_run_dir, start_fresh


def resume_checkpoint(resume: str | Path, cfg: C.TrainConfig) -> tuple[Path, dict[str, Any]]:
    path, ck = ckpt_io.load_training_checkpoint(resume)
    # Read back through from_dict: settings added since the run began take their defaults,
    # renamed ones their new names, so only real changes count.
    saved = C.from_dict(ck["config"], source=f"{path} (its config)").to_dict()
    diffs = differences(saved, cfg.to_dict())
    if diffs:
        raise UserError(
            f"{path}: cannot resume with a different config ({'; '.join(diffs)}); drop the "
            "changed settings, or start a new run"
        )
    check_resume_data(path, ck, cfg)
    return path, ck


def check_resume_data(path: Path, ck: dict[str, Any], cfg: C.TrainConfig) -> None:
    """A run resumes only onto the data it was trained on (data.root may move): other
    classes would relabel the model silently, other images would not continue the run."""
    from alexnet.data.store import identity, identity_differences, read_meta

    saved = ck.get("data") or {"classes": ck.get("classes")}
    now = identity(read_meta(cfg.data.root), cfg.data.train_split)
    diffs = identity_differences(saved, now)
    if diffs:
        raise UserError(
            f"{cfg.data.root}: not the data {path} was trained on ({'; '.join(diffs)}); resume "
            "with that data, or start a new run from these weights with --init"
        )


def prepared_data(cfg: C.TrainConfig, channels: int = 3) -> C.TrainConfig:
    """``data.root`` as a prepared dataset: a folder of images is prepared once into its
    cache (``alexnet.data.folders``), at ``data.image_size`` and ``channels`` (a fine-tuning
    source's), ``data.holdout`` of each class held out for validation where it has no
    ``val/`` folder; the config then names the cache (so a resumed run reads the same
    images). Every torchrun rank asks: the first prepares, the others wait for it."""
    from alexnet.data.folders import is_prepared, prepared

    root = cfg.data.root
    if root and not is_prepared(root) and Path(root).is_dir():
        d = cfg.data
        cache = prepared(root, size=d.image_size, holdout=d.holdout, seed=0, channels=channels)
        cfg.data.root = str(cache)
    return cfg


@contextlib.contextmanager
def owned_run(cfg: C.TrainConfig, env: D.DistEnv, resume_dir: Path | None) -> Iterator[Path]:
    """The run directory, owned by rank 0 for the whole block (runtime/owner.py): another
    process training or resuming the same run is refused in one line, on every rank."""
    with contextlib.ExitStack() as stack:
        run_dir, error = None, None
        if env.is_main:
            try:
                run_dir = resume_dir or claim_run_dir(cfg.run.out_dir, cfg.run.name, cfg.preset)
                hint = "one process trains a run at a time (--name gives a new run another name)"
                stack.enter_context(owned(run_dir, what="run", hint=hint))
                if resume_dir is None:
                    start_fresh(run_dir)
            except UserError as e:
                error = str(e)
        run_dir, error = D.broadcast_object((run_dir, error))
        if error:
            raise UserError(error)
        yield run_dir


def already_finished(cfg: C.TrainConfig, ck: dict | None, epoch: int) -> bool:
    """A resumed run with nothing left to do: its epochs are done, or its schedule ended it
    (a plateau stop) and no more epochs were asked for."""
    if ck is None or not ck.get("finished"):
        return False
    more_asked = cfg.schedule.epochs != ck["config"]["schedule"]["epochs"]
    return epoch >= cfg.schedule.epochs or (ck["finished"] == "schedule" and not more_asked)


# Settings that may change when a run is resumed; any other difference is an error.
RESUMABLE_CHANGES = {
    "preset",
    "data.root",
    "finetune.source",  # where the weights came from (a moved file); they are in the run now
    "data.num_workers",
    "schedule.epochs",
    "schedule.patience",
    "schedule.max_cuts",
    "run.name",
    "run.out_dir",
    "run.device",
    "run.precision",
    "run.channels_last",
    "run.deterministic",
    "run.compile",
    "run.log_every",
    "run.progress_interval_s",
    "run.save_every_steps",
    "run.max_steps",
    "run.export",
    "run.dist_timeout_s",
}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs and may not change on resume."""
    a, b = C.flatten(old), C.flatten(new)
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES
    ]
