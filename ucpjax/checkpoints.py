"""Orbax checkpoints: a pytree written whole, and resume points inside a training.

``save`` / ``restore`` write and read one pytree (a run's variables, a stage's
output). A resume point is what ``train.fit`` keeps while it trains inside
``kept_in(folder)``: at the end of an epoch, at most once a minute, its whole
state (step, params, non-trained state, optimizer state with pruning masks and
centroids) and its progress so far. A killed training run again in the same
folder restores the last one and goes on from that epoch. Batches, augmentation
and dropout keys derive from the seed, the epoch and the step, so the resumed
training computes what the uninterrupted one would have: the same bits.

    FOLDER/NN_<desc>/state_<epoch>/   orbax checkpoint of the training state
    FOLDER/NN_<desc>.json             epoch, progress and fingerprint; written last,
                                      then older states are removed

``NN`` counts the ``fit`` calls inside one ``kept_in``: a stage that trains twice
(pruning, then its fine-tuning) keeps two. A resume point whose fingerprint
(stage name, seed, step count, batch size) differs from the training asking for
it is ignored, so a changed setting trains from the start instead of restoring
another training's state.

``kept_in`` yields a ``Clock``: the seconds the run has cost, earlier processes'
included up to the resume point this one went on from (the time a killed process
spent after its last save was lost, and is counted again where it is redone).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import pathlib
import re
import shutil
import time
from collections.abc import Iterator

import jax

from ucpjax.config import ConfigError

# Written at the end of an epoch once this long has passed since the last write
# (or the start): a LeNet epoch takes a second, and a write a tenth of that.
# UCPJAX_RESUME_EVERY (seconds) overrides it; 0 writes at every epoch's end.
_EVERY_SECONDS = 60.0

_FOLDER: contextvars.ContextVar = contextvars.ContextVar("resume_folder", default=None)


def save(path: pathlib.Path, tree) -> None:
    """Writes ``tree`` with orbax; orbax renames a temporary folder when done."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(pathlib.Path(path).resolve(), tree, force=True)


def restore(path: pathlib.Path, like=None):
    """Reads a checkpoint written by ``save`` (shapes from ``like``)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(pathlib.Path(path).resolve(), like)


class Clock:
    """Seconds since it was made, plus those of the earlier processes of a resumed run."""

    def __init__(self):
        self.earlier, self.start = 0.0, time.perf_counter()

    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self.start

    def went_on_from(self, seconds: float) -> None:
        """A resume point saved ``seconds`` into the run was restored. A stage
        that trains twice restores both its trainings' points: the later one counts."""
        self.earlier = max(self.earlier, seconds)


@contextlib.contextmanager
def kept_in(folder: str | os.PathLike, every_seconds: float | None = None) -> Iterator[Clock]:
    """Every ``train.fit`` inside keeps a resume point in ``folder`` (module docstring),
    every ``every_seconds`` at most (None: ``UCPJAX_RESUME_EVERY`` or a minute).
    Yields the run's ``Clock``."""
    every = _every_seconds() if every_seconds is None else every_seconds
    clock = Clock()
    token = _FOLDER.set({"folder": pathlib.Path(folder), "every": every, "calls": 0,
                         "clock": clock})
    try:
        yield clock
    finally:
        _FOLDER.reset(token)


def clear(folder: str | os.PathLike) -> None:
    """Removes the resume points of a training that has finished."""
    shutil.rmtree(folder, ignore_errors=True)


class ResumePoint:
    """One ``fit`` call's resume point; see ``for_fit``."""

    def __init__(self, base: pathlib.Path, fingerprint: dict, every_seconds: float,
                 clock: Clock | None = None):
        self.base, self.fingerprint, self.every = base, fingerprint, every_seconds
        self.clock = Clock() if clock is None else clock
        self.last = time.monotonic()

    def load(self, like) -> tuple[object, dict] | None:
        """``(state, progress)`` saved last, or None when there is none for this
        training (none written, another fingerprint, or damaged files: the
        training then starts over, which loses time but nothing else)."""
        try:
            saved = json.loads(self.base.with_suffix(".json").read_text())
            if saved.get("fingerprint") != self.fingerprint:
                return None
            state, progress = restore(self.base / saved["state"], like), saved["progress"]
        except Exception:  # orbax raises many types for a damaged checkpoint
            return None
        self.clock.went_on_from(saved.get("seconds", 0.0))
        return state, progress

    def save_if_due(self, state, progress: dict) -> None:
        """Saves at an epoch's end when ``every_seconds`` have passed (the last epoch
        too: a stage that trains twice, killed in its second training, need not
        redo the first). Across hosts every epoch: each process joins orbax's
        write, so they must agree on when."""
        if jax.process_count() == 1 and time.monotonic() - self.last < self.every:
            return
        name = f"state_{progress['epoch']}"
        save(self.base / name, state)
        payload = json.dumps({"fingerprint": self.fingerprint, "state": name,
                              "progress": progress, "seconds": self.clock.seconds()})
        write_atomically(self.base.with_suffix(".json"), payload.encode())
        for old in self.base.glob("state_*"):  # after the JSON points past them
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        self.last = time.monotonic()


def for_fit(desc: str, fingerprint: dict) -> ResumePoint | None:
    """The resume point of the next ``fit`` call inside ``kept_in``; None outside."""
    kept = _FOLDER.get()
    if kept is None:
        return None
    kept["calls"] += 1
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", desc)
    return ResumePoint(kept["folder"] / f"{kept['calls']:02d}_{slug}",
                       {"desc": desc, **fingerprint}, kept["every"], kept["clock"])


def _every_seconds() -> float:
    text = os.environ.get("UCPJAX_RESUME_EVERY")
    if text is None:
        return _EVERY_SECONDS
    try:
        every = float(text)
    except ValueError:
        every = math.nan
    if not every >= 0:
        raise ConfigError(f"UCPJAX_RESUME_EVERY={text!r}: must be a number of seconds >= 0 "
                          "(0 keeps a resume point at every epoch's end)")
    return every


def write_atomically(path: pathlib.Path, payload: bytes) -> None:
    """Writes ``path`` so that a killed write leaves the old file or none (a
    temporary file, synced, then renamed over it); ``RunFolder`` writes this way too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
