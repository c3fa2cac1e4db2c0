"""A run folder: every file of one compression run, written atomically.

    config.json              the resolved recipe and run setup (marks a ucpjax run)
    stages/NN_<name>/        orbax checkpoint of the variables after that stage
    stages/NN_<name>.json    that stage's row and report; written last, so it marks
                             the stage finished
    stages/NN_<name>.progress/  resume points of the stage's training
                             (``checkpoints``): a killed stage goes on from its
                             last saved epoch; removed when the stage finishes
    model.tflite, model.ucpj the int8 TFLite model and the packed file
    report.json, report.md   per-stage rows and the "final" measurements
    weights.png, accuracy_vs_size.png
    .lock                    the process writing the folder

The "done" rule lives only here: ``load_stage`` trusts a stage whose report and
checkpoint both load, and anything else is redone. The pipeline and the study
runner (which copies finished stages between variants) both go through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator

import numpy as np

from ucpjax import checkpoints
from ucpjax.config import ConfigError


class RunFolder:
    """Atomic reads and writes of one run's files."""

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)

    # ------------------------------------------------------------ plain files

    def write_bytes(self, name: str, payload: bytes) -> pathlib.Path:
        """Writes ``name`` atomically: a killed write leaves the old file or none."""
        path = self.root / name
        checkpoints.write_atomically(path, payload)
        return path

    def write_json(self, name: str, obj) -> pathlib.Path:
        return self.write_bytes(name, json.dumps(obj, indent=2, default=_json_default).encode())

    def read_json(self, name: str):
        """The JSON in ``name``, or None when it does not exist.

        Raises:
          ConfigError: one line naming the file when it is not valid JSON.
        """
        path = self.root / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{path} is not valid JSON: delete it (a finished stage's "
                              "report is redone by --resume)") from None

    # ------------------------------------------------------------ ownership

    def claim(self, resolved_config: dict) -> None:
        """Makes the folder this run's: refuses someone else's files and other configs."""
        resolved = self.check_claim(resolved_config)
        self._make()
        try:
            self.write_json("config.json", resolved)
        except PermissionError:
            raise ConfigError(f"--out {self.root} is not writable: choose another folder") from None

    def check_claim(self, resolved_config: dict) -> dict:
        """What ``claim`` refuses, refused without writing; returns the config as JSON."""
        self._check_is_folder()
        ours = any((self.root / name).exists() for name in _RUN_MARKERS)
        if self.root.is_dir() and not ours and any(
                p.name != _LOCK for p in self.root.iterdir()):
            raise ConfigError(f"--out {self.root} holds files that are not a ucpjax run: "
                              "choose a new or empty folder")
        saved = self.read_json("config.json")
        resolved = json.loads(json.dumps(resolved_config, default=_json_default))
        compared = _without_new_nones(resolved, saved)
        if saved is not None and compared != saved:
            changed = sorted(k for k in {*compared, *saved} if saved.get(k) != compared.get(k))
            raise ConfigError(f"{self.root} holds a run with a different config (fields "
                              f"{changed} differ): use a new --out or the same config")
        return resolved

    def _check_is_folder(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--out {self.root} is a file: choose a folder")

    def _make(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--out {self.root} cannot be made ({err.strerror}): choose "
                              "another folder") from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Holds ``.lock`` while the run writes; a second writer is refused.

        A lock left by a process that no longer runs (a killed run) is stale and
        taken over.
        """
        path = self.root / _LOCK
        self._check_is_folder()
        self._make()
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                holder = _lock_holder(path)
                if holder is not None and _alive(holder):
                    raise ConfigError(f"{self.root} is in use by process {holder} "
                                      f"(lock {path}): wait for it or choose another --out")
                path.unlink(missing_ok=True)  # stale
        else:
            raise ConfigError(f"could not take the lock {path}: delete it if no run is active")
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------ stages

    def stage_name(self, position: int, name: str) -> str:
        return f"stages/{position:02d}_{name}"

    @contextlib.contextmanager
    def training_stage(self, position: int, name: str) -> Iterator[checkpoints.Clock]:
        """While stage ``position`` trains, its ``fit`` calls keep resume points.
        Yields the stage's clock (``checkpoints.kept_in``)."""
        with checkpoints.kept_in(
                self.root / f"{self.stage_name(position, name)}.progress") as clock:
            yield clock

    def save_stage(self, position: int, name: str, variables: dict, done: dict) -> None:
        """Checkpoints a finished stage; its ``.json`` (``done``) is written last,
        then its resume points go."""
        base = self.stage_name(position, name)
        checkpoints.save(self.root / base, variables)
        self.write_json(f"{base}.json", done)
        checkpoints.clear(self.root / f"{base}.progress")

    def load_stage(self, position: int, name: str, like: dict,
                   log: Callable[[str], None] = print) -> tuple[dict, dict] | None:
        """``(variables, done)`` of a finished stage, or None to (re)do it.

        A stage whose report or checkpoint does not load (a kill, a truncated
        or deleted file) is redone, with one line saying so.
        """
        base = self.stage_name(position, name)
        if not (self.root / f"{base}.json").exists():
            return None
        try:
            done = self.read_json(f"{base}.json")
            if not isinstance(done, dict) or not {"row", "report"} <= done.keys():
                raise ValueError("incomplete report")
            return checkpoints.restore(self.root / base, like), done
        except Exception as err:  # orbax raises many types for a damaged checkpoint
            log(f"[{position}] {name}: saved stage does not load ({type(err).__name__}); "
                "redoing it")
            (self.root / f"{base}.json").unlink(missing_ok=True)
            return None

    def copy_stage(self, source: RunFolder, position: int, name: str) -> bool:
        """Copies a finished stage of ``source`` here; False when ``source`` lacks it."""
        base = self.stage_name(position, name)
        if (self.root / f"{base}.json").exists():
            return True
        report = source.root / f"{base}.json"
        if not report.exists():
            return False
        scratch = self.root / f"{base}.copying"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(source.root / base, scratch)
        shutil.rmtree(self.root / base, ignore_errors=True)
        scratch.rename(self.root / base)
        self.write_bytes(f"{base}.json", report.read_bytes())
        return True


_LOCK = ".lock"
# Files that make a folder a ucpjax run (a pipeline run, a study, a `ucpjax train`).
_RUN_MARKERS = ("config.json", "stages", "study.json", "metrics.json")


def _without_new_nones(resolved, saved):
    """``resolved`` less the None-valued keys ``saved`` lacks: an optional setting added
    to ucpjax after a run was made (at its None default) leaves that run its own."""
    if not (isinstance(resolved, dict) and isinstance(saved, dict)):
        return resolved
    return {k: _without_new_nones(v, saved.get(k)) for k, v in resolved.items()
            if k in saved or v is not None}


def _lock_holder(path: pathlib.Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "__float__"):
        return float(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
