"""Every bad input to the CLI is refused up front: a non-zero exit, one line on stderr
naming the culprit, no traceback, no work started, and none of the user's files touched.

Each case writes its own files (a tiny experiment file, an image folder of 8x8 PNGs,
a folder of the user's own files), snapshots the files a careless run could change,
and runs the real CLI (``ucpjax.cli.main``) in a process of its own, forked from a
server that has imported ucpjax and JAX once (an import per case was most of this
file's time). The processes run side by side, and one that starts training (a
progress bar on stderr, anything on stdout) is stopped at once: that input was not
refused up front.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKERS = 4
# A refusal needs an import of JAX and at most a load of cached MNIST; under
# load that is tens of seconds, so this only bounds a run that hangs.
BACKSTOP_S = 300

BASE = '''from ucpjax import experiment
from ucpjax.experiment import Experiment


def get_config(smoke=False):
    config = Experiment(model="lenet300", data="mnist")
    return experiment.smoke(config) if smoke else config
'''

STUDY = '''from ucpjax import experiment
from ucpjax.experiment import Experiment


def get_variants(smoke=False):
    base = experiment.smoke(Experiment(model="lenet300", data="mnist"))
    return {"dense_only": base, "pruned": base}
'''


@dataclasses.dataclass(frozen=True)
class Setup:
    """What one case runs, what its one line must name, which files must not change."""

    argv: list
    culprits: list
    watch: list = dataclasses.field(default_factory=list)


# --- the user's files ---------------------------------------------------------

def _experiment(d: pathlib.Path, body: str = BASE, name: str = "exp.py") -> pathlib.Path:
    path = d / name
    path.write_text(body)
    return path


def _users_folder(d: pathlib.Path) -> pathlib.Path:
    """A folder holding the user's own model and notes, not a ucpjax run."""
    mine = d / "mine"
    mine.mkdir()
    (mine / "model.tflite").write_bytes(b"TFL3 the user's own model")
    (mine / "report.md").write_text("# my notes\n")
    return mine


def _images(d: pathlib.Path, splits=("train", "test"), labels=("cat", "dog"), n=2):
    """``d/imgs/<split>/<label>/<i>.png``: 8x8 RGB PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = d / "imgs"
    for split in splits:
        for label in labels:
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (8, 8, 3), np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def _checkpoint_folder(d: pathlib.Path, model: str, truncate: bool = False,
                       val_size: int = 5000):
    """A `ucpjax train`-like folder: ``checkpoint/`` of ``model`` and ``metrics.json``."""
    from ucpjax import checkpoints, models

    folder = d / f"trained_{model}"
    variables = models.init(models.create(model), (28, 28, 1), 0)
    checkpoints.save(folder / "checkpoint", variables)
    (folder / "metrics.json").write_text(json.dumps(
        {"model": model, "data": "mnist", "seed": 0, "val_size": val_size}))
    if truncate:
        for path in (folder / "checkpoint").rglob("*"):
            if path.is_file() and path.stat().st_size > 0:
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return folder


_LIVE = []  # processes a case starts (a lock holder); ended after the session


def _live_process() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)"])
    _LIVE.append(proc)
    return proc.pid


# --- the cases ------------------------------------------------------------------

def _compress(d, *extra, config=None):
    return ["compress", "--config", str(config or _experiment(d)), "--out", str(d / "run"),
            "--smoke", *map(str, extra)]


def _override(override, *culprits):
    """A compress run of the base experiment with one bad ``field=value``."""
    return lambda d: Setup(_compress(d, override), list(culprits), [d / "exp.py", d / "run"])


def _config_file(body, *culprits, name="exp.py"):
    """A compress run of an experiment file holding ``body``."""
    def setup(d):
        path = _experiment(d, body, name)
        return Setup(_compress(d, config=path), [str(path), *culprits], [path, d / "run"])
    return setup


def _config_value(body, *culprits):
    """Like ``_config_file``, but the line need not name the file, only the value."""
    return lambda d: dataclasses.replace(_config_file(body)(d), culprits=list(culprits))


def _get_config(returns):
    return f"def get_config(smoke=False):\n    return {returns}\n"


def _experiment_of(**fields):
    args = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    return ("from ucpjax import experiment\nfrom ucpjax.experiment import Experiment\n\n\n"
            "def get_config(smoke=False):\n"
            f"    return experiment.smoke(Experiment({args}))\n")


def _train(*extra, data="mnist", out="run"):
    def setup(d):
        source = str(_images(d)) if data == "images" else data
        argv = ["train", "--model", "lenet300", "--data", source, "--out", str(d / out),
                "--epochs", "0.01", *map(str, extra)]
        return Setup(argv, [], [d / out])
    return setup


def _with_culprits(setup, *culprits):
    return lambda d: dataclasses.replace(setup(d), culprits=list(culprits))


def _bad_images(damage):
    """`train --data` an image folder damaged by ``damage(root) -> culprit``."""
    def setup(d):
        root = _images(d)
        culprit = damage(root)
        argv = ["train", "--model", "lenet300", "--data", str(root), "--out", str(d / "run")]
        return Setup(argv, [culprit], [root, d / "run"])
    return setup


def _empty_label(root):
    (root / "train" / "bird").mkdir()
    (root / "train" / "bird" / "README.txt").write_text("birds go here")
    return str(root / "train" / "bird")


def _corrupt_image(root):
    (root / "test" / "dog" / "1.png").write_bytes(b"\x89PNG but truncated")
    return str(root / "test" / "dog" / "1.png")


def _no_train_split(root):
    import shutil

    shutil.rmtree(root / "train")
    return "train"


def _out_is_a_file(command):
    def setup(d):
        notes = d / "notes.txt"
        notes.write_text("the user's notes")
        argv = {"compress": _compress(d), "study": _study(d, "--out", notes),
                "train": ["train", "--model", "lenet300", "--data", "mnist",
                          "--epochs", "0.01"],
                "sensitivity": _sensitivity(d)}[command]
        if command != "study":
            argv = [*_without_out(argv), "--out", str(notes)]
        return Setup(argv, [str(notes)], [notes, d / "exp.py"])
    return setup


def _out_is_users_folder(command, *extra):
    def setup(d):
        mine = _users_folder(d)
        argv = {"compress": _compress(d, *extra),
                "train": ["train", "--model", "lenet300", "--data", "mnist", "--epochs", "0.01"],
                "sensitivity": _sensitivity(d)}[command]
        return Setup([*_without_out(argv), "--out", str(mine)], [str(mine)], [mine])
    return setup


def _without_out(argv):
    if "--out" not in argv:
        return argv
    i = argv.index("--out")
    return [*argv[:i], *argv[i + 2:]]


def _run_of_another_config(d):
    run = d / "run"
    (run / "stages").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"recipe": {"seed": 7}, "setup": {}}))
    (run / "report.json").write_text(json.dumps({"rows": []}))
    return Setup(_compress(d), [str(run), "different config"], [run, d / "exp.py"])


def _locked_by_live_process(d):
    run = d / "run"
    (run / "stages").mkdir(parents=True)
    pid = _live_process()
    (run / ".lock").write_text(str(pid))
    return Setup(_compress(d, "--resume"), [str(run), f"in use by process {pid}"],
                 [run, d / "exp.py"])


def _unfinished_run_without_resume(d):
    run = d / "run"
    (run / "stages").mkdir(parents=True)
    return Setup(_compress(d), [str(run), "--resume"], [run / "stages", d / "exp.py"])


def _out_in_proc(d):
    out = pathlib.Path("/proc/ucpjax-run-that-cannot-be-made")
    argv = _compress(d)
    argv[argv.index("--out") + 1] = str(out)
    return Setup(argv, ["--out", str(out)], [d / "exp.py"])


def _init_from(make, *culprits):
    def setup(d):
        source = make(d)
        return Setup(_compress(d, f"init_from={source}"), [*culprits],
                     [pathlib.Path(source), d / "exp.py", d / "run"])
    return setup


def _study(d, *extra, body=STUDY):
    path = _experiment(d, body)
    args = {"--out": str(d / "study"), **dict(zip(extra[::2], map(str, extra[1::2])))}
    return ["study", "--config", str(path), "--smoke", *[x for kv in args.items() for x in kv]]


def _study_case(*extra, body=STUDY, culprits=()):
    return lambda d: Setup(_study(d, *extra, body=body), [str(d / "exp.py"), *culprits]
                           if body != STUDY else list(culprits), [d / "exp.py", d / "study"])


def _sensitivity(d, *extra):
    return ["sensitivity", "--config", str(_experiment(d)), "--out", str(d / "sens"),
            "--smoke", *map(str, extra)]


def _sensitivity_case(*extra, culprits=()):
    return lambda d: Setup(_sensitivity(d, *extra), list(culprits), [d / "exp.py", d / "sens"])


def _stage_of_another_setup(d):
    run = d / "run"
    (run / "stages" / "01_prune").mkdir(parents=True)
    (run / "stages" / "01_prune.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"recipe": {}, "setup": {"model": "x"}}))
    stage = run / "stages" / "01_prune"
    return Setup(_sensitivity(d, "--after", stage), [str(stage), "another setup"],
                 [d / "exp.py", d / "sens", run])


def _argv(*argv, culprits=()):
    return lambda d: Setup([*map(str, argv)], list(culprits), [])


CASES = {
    # argparse: the command line itself
    "unknown command": _argv("squash", culprits=["squash"]),
    "compress unknown flag": lambda d: Setup(_compress(d, "--fast"), ["--fast"], [d / "run"]),
    "compress without --out": lambda d: Setup(["compress", "--config", str(_experiment(d))],
                                              ["--out"], [d / "exp.py"]),
    "train --epochs not a number": _with_culprits(_train("--epochs", "ten"), "--epochs", "ten"),
    "train --optimizer unknown": _with_culprits(_train("--optimizer", "rmsprop"),
                                                "--optimizer", "rmsprop"),
    "sensitivity --max-drop not a number": _sensitivity_case("--max-drop", "lots",
                                                             culprits=["--max-drop", "lots"]),
    "sensitivity --after not a stage": lambda d: Setup(
        _sensitivity(d, "--after", d / "nope"), [str(d / "nope"), "not a finished stage"],
        [d / "exp.py", d / "sens"]),
    "sensitivity --after a run of another setup": _stage_of_another_setup,
    # --config: the experiment file
    "--config missing": lambda d: Setup(_compress(d, config=d / "nope.py"),
                                        ["--config", str(d / "nope.py")], [d / "run"]),
    "--config a directory": lambda d: Setup(_compress(d, config=d), ["--config", str(d)],
                                            [d / "run"]),
    "--config a .json": _config_file('{"model": "lenet300"}', "--config", name="exp.json"),
    "--config unterminated string": _config_file('x = "oops\n', "syntax error on line 1"),
    "--config import raises": _config_file("1 / 0\n", "ZeroDivisionError"),
    "--config empty file": _config_file("", "defines neither get_config"),
    "--config a study file": _config_file(STUDY, "is a study", "ucpjax study"),
    "get_config returns None": _config_file(_get_config("None"), "returned NoneType"),
    "get_config returns an int": _config_file(_get_config("3"), "returned int"),
    "get_config raises": _config_file(
        "def get_config(smoke=False):\n    raise RuntimeError('no GPU here')\n",
        "get_config(smoke=True) failed", "RuntimeError: no GPU here"),
    # (these name the field or value; the file is the only place it could come from)
    "experiment with negative subset": _config_value(_experiment_of(subset=-1), "subset=-1"),
    "experiment with unknown model": _config_value(_experiment_of(model="lenet301"),
                                                   "lenet301"),
    "experiment with unknown dataset": _config_value(_experiment_of(data="mnsit"), "mnsit"),
    # field=value overrides
    "override without =": _override("prune.target_sparsity", "prune.target_sparsity",
                                    "field=value"),
    "override unknown top-level field": _override("modle=lenet5", "modle"),
    "override unknown nested field": _override("dense.epoch=3", "dense.epoch"),
    "override string for a float": _override("prune.target_sparsity=high",
                                              "prune.target_sparsity", "high"),
    "override nan": _override("dense.learning_rate=nan", "dense.learning_rate", "nan"),
    "override epochs=1e999": _override("prune.train.epochs=1e999", "prune.train.epochs=inf"),
    "override negative epochs": _override("distill.train.epochs=-1", "distill.train.epochs"),
    "override zero batch size": _override("dense.batch_size=0", "dense.batch_size=0"),
    "override fractional batch size": _override("dense.batch_size=64.5", "dense.batch_size"),
    "override batch larger than data": _override("prune.train.batch_size=5000",
                                                 "prune.train.batch_size=5000"),
    "override negative val_size": _override("val_size=-1", "val_size=-1"),
    "override val_size beyond data": _override("val_size=60000", "val_size=60000"),
    "override alpha out of range": _override("distill.alpha=1.5", "distill.alpha=1.5"),
    "override channel share out of range": _override("prune.channel_sparsity=1",
                                                     "prune.channel_sparsity=1"),
    "override stages in bare words, a typo": _override("stages=[prune,quantise]", "quantise"),
    "override stage name typo": _override("stages=('prune','quantise')", "quantise"),
    "override unknown optimizer": _override("dense.optimizer=rmsprop", "dense.optimizer",
                                            "rmsprop"),
    "override int for a bool": _override("export.enabled=1", "export.enabled"),
    # init_from: a `ucpjax train` folder to start from
    "init_from missing folder": _init_from(lambda d: d / "no_such_run", "init_from",
                                           "no_such_run"),
    "init_from truncated checkpoint": _init_from(
        lambda d: _checkpoint_folder(d, "lenet300", truncate=True), "init_from",
        "does not load"),
    "init_from another model's checkpoint": _init_from(
        lambda d: _checkpoint_folder(d, "lenet5"), "init_from", "lenet300"),
    "init_from held out another validation split": _init_from(
        lambda d: _checkpoint_folder(d, "lenet300", val_size=1000), "val_size=5000",
        "val_size=1000"),
    # --out: the run folder
    "compress --out an existing file": _out_is_a_file("compress"),
    "compress --out the user's folder": _out_is_users_folder("compress"),
    "compress --out a run of another config": _run_of_another_config,
    "compress --out locked by a live process": _locked_by_live_process,
    "compress --out an unfinished run without --resume": _unfinished_run_without_resume,
    "compress --out that cannot be made": _out_in_proc,
    "sensitivity --out the user's folder": _out_is_users_folder("sensitivity"),
    "sensitivity --out an existing file": _out_is_a_file("sensitivity"),
    "train --out an existing file": _out_is_a_file("train"),
    "train --out the user's folder": _out_is_users_folder("train"),
    "study --out an existing file": _out_is_a_file("study"),
    # study
    "study --only typo": _study_case("--only", "prunned", culprits=["--only prunned"]),
    "study get_variants returns {}": _study_case(
        body="def get_variants(smoke=False):\n    return {}\n", culprits=["get_variants"]),
    "study variant not an Experiment": _study_case(
        body="def get_variants(smoke=False):\n    return {'a': 3}\n",
        culprits=["variant 'a'", "returned int"]),
    # train: model, data and budget
    "train unknown model": lambda d: Setup(
        ["train", "--model", "lenet301", "--data", "mnist", "--out", str(d / "run")],
        ["lenet301"], [d / "run"]),
    "train unknown dataset": _with_culprits(_train(data="mnsit"), "mnsit"),
    "train --data empty label folder": _bad_images(_empty_label),
    "train --data corrupt image": _bad_images(_corrupt_image),
    "train --data without a train split": _bad_images(_no_train_split),
    "train --data smaller than val_size": _with_culprits(_train(data="images"), "val_size"),
    "train --epochs nan": _with_culprits(_train("--epochs", "nan"), "epochs=nan"),
    "train --val-size -1": _with_culprits(_train("--val-size", "-1"), "val_size=-1"),
    "train --batch-size 0": _with_culprits(_train("--batch-size", "0"), "batch_size=0"),
    "train --batch-size larger than data": _with_culprits(
        _train("--batch-size", "100000"), "batch_size=100000"),
    # sensitivity
    "sensitivity --max-drop negative": _sensitivity_case("--max-drop", "-1",
                                                         culprits=["--max-drop", "-1"]),
    "sensitivity --max-drop nan": _sensitivity_case("--max-drop", "nan",
                                                    culprits=["--max-drop", "nan"]),
    "sensitivity bad override": _sensitivity_case("prune.min_per_channel=-1",
                                                  culprits=["prune.min_per_channel=-1"]),
}

# Inputs that the CLI does not yet refuse as it should (name: what it does instead);
# each is a strict xfail, so fixing one turns it into a failure until it is removed here.
XFAIL: dict[str, str] = {}


# --- running them ---------------------------------------------------------------

def _snapshot(paths) -> dict:
    """Bytes and mtimes of every file under ``paths`` (None for a path that is absent)."""
    state = {}
    for path in map(pathlib.Path, paths):
        if not path.exists():
            state[str(path)] = None
        elif path.is_file():
            state[str(path)] = (path.read_bytes(), path.stat().st_mtime_ns)
        else:
            state[str(path)] = "dir"
            for sub in sorted(path.rglob("*")):
                state[str(sub)] = ((sub.read_bytes(), sub.stat().st_mtime_ns)
                                   if sub.is_file() else "dir")
    return state


def _changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in {*before, *after} if before.get(k, "absent") != after.get(k, "absent"))


@dataclasses.dataclass
class Outcome:
    setup: Setup
    returncode: int | None
    stdout: str
    stderr: str
    started_work: str
    changed: list


# What the server imports once; the CLI imports the rest itself, as it would.
PRELOAD = ["ucpjax.cli", "ucpjax.experiment", "ucpjax.pipeline", "ucpjax.study",
           "ucpjax.search", "ucpjax.sensitivity", "ucpjax.train", "ucpjax.models",
           "ucpjax.run_folder"]


def _cli(argv: list, env: dict, out_path: str, err_path: str) -> None:
    """A forked process's body: ``ucpjax`` with ``argv``, its output to the files."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    for fd, path in ((1, out_path), (2, err_path)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
    sys.stdout.reconfigure(line_buffering=True)
    from ucpjax import cli

    sys.exit(cli.main(argv))


@contextlib.contextmanager
def _cli_server(env: dict):
    """A forkserver context whose server imported PRELOAD under ``env`` (data.CACHE_DIR
    is read at import)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        warm = context.Process(target=os.getpid)  # starts the server with this environment
        warm.start()
        warm.join()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield context


# Process.start() polls every live child, so an unguarded start in one thread can race
# another thread's poll of the same forkserver child: one reads its exit code, the
# other the pipe's end, and multiprocessing then reports 255. One lock for both.
_PROCESS_LOCK = threading.Lock()


def _exitcode(proc) -> int | None:
    with _PROCESS_LOCK:
        return proc.exitcode


def _run(context, setup: Setup, env: dict, scratch: pathlib.Path) -> Outcome:
    """Runs the CLI; stops it as soon as it prints progress (it started working)."""
    before = _snapshot(setup.watch)
    out_path, err_path = scratch / "stdout", scratch / "stderr"
    out_path.touch()
    err_path.touch()
    proc = context.Process(target=_cli, args=(setup.argv, env, str(out_path), str(err_path)))
    with _PROCESS_LOCK:
        proc.start()
    deadline, started = time.monotonic() + BACKSTOP_S, ""
    while _exitcode(proc) is None:
        # A tqdm bar or a progress line: the input was accepted and work began.
        if out_path.stat().st_size or "|" in err_path.read_text(errors="replace"):
            started = "it started working"
        elif time.monotonic() > deadline:
            started = f"still running after {BACKSTOP_S} s"
        if started:
            proc.kill()
            break
        time.sleep(0.2)
    with _PROCESS_LOCK:
        proc.join()
    return Outcome(setup, _exitcode(proc), out_path.read_text(errors="replace"),
                   err_path.read_text(errors="replace"), started,
                   _changed(before, _snapshot(setup.watch)))


@pytest.fixture(scope="session")
def outcomes(request, tmp_path_factory):
    """Every selected case, run side by side once per session."""
    wanted = [item.callspec.params["case"] for item in request.session.items
              if getattr(item, "originalname", "") == "test_bad_cli_input_is_refused_in_one_line"]
    base = tmp_path_factory.mktemp("cli_bad_inputs")
    cache = base / "cache"  # image folders are cached here, not in the user's cache
    cache.mkdir()
    real_cache = pathlib.Path(os.environ.get(
        "UCPJAX_CACHE", pathlib.Path.home() / ".cache" / "ucpjax"))
    if (real_cache / "mnist.npz").exists():
        (cache / "mnist.npz").symlink_to(real_cache / "mnist.npz")
    env = {k: v for k, v in os.environ.items() if k != "UCPJAX_DEBUG"}
    env.update(UCPJAX_CACHE=str(cache), PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    setups = {}
    for i, name in enumerate(wanted):
        d = base / f"case{i:02d}"
        d.mkdir()
        (d / "scratch").mkdir()
        setups[name] = (CASES[name](d), d / "scratch")
    try:
        with _cli_server(env) as context, concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            futures = {name: pool.submit(_run, context, setup, env, scratch)
                       for name, (setup, scratch) in setups.items()}
            yield {name: future.result() for name, future in futures.items()}
    finally:
        for proc in _LIVE:
            proc.kill()
            proc.wait()


def _params():
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=XFAIL[name]))
            if name in XFAIL else name for name in CASES]


@pytest.mark.parametrize("case", _params())
def test_bad_cli_input_is_refused_in_one_line(case, outcomes):
    o = outcomes[case]
    shown = f"exit {o.returncode}\nstdout: {o.stdout[-600:]!r}\nstderr: {o.stderr[-600:]!r}"
    assert not o.started_work, f"not refused up front: {o.started_work}\n{shown}"
    assert o.returncode == 2, shown
    assert "Traceback" not in o.stderr, shown
    lines = o.stderr.strip().splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr\n{shown}"
    for culprit in o.setup.culprits:
        assert culprit in lines[0], f"{culprit!r} not named\n{shown}"
    assert not o.changed, f"files changed: {o.changed}\n{shown}"
