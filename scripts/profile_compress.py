"""Where the wall time of one `ucpjax compress` goes: per stage, per kind of work.

    .venv/bin/ucpjax train --config experiments/lenet300_mnist.py --out runs/dense_lenet300
    .venv/bin/python scripts/profile_compress.py --config experiments/lenet300_mnist.py \
        --name lenet300 init_from=runs/dense_lenet300

Runs the experiment's whole pipeline in this process with timers around the
functions that do each kind of work (training steps, evaluations, BatchNorm
re-estimation, checkpoint writes, k-means, packing, export, the TFLite checks)
and JAX's own compile-time events. Times are exclusive: a compile inside a
training loop counts as compilation, not training, and an evaluation inside a
stage counts as evaluation. Start from an `init_from` folder to leave the dense
training out, as the side-by-side benchmark does. JAX's compilation cache
starts empty (a first run); ``--cache DIR`` keeps it, so a second run with the
same DIR measures a rerun, ``--no-cache`` turns it off.

Writes results/profile_compress_<name>.{json,md} and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import pathlib
import sys
import tempfile
import time

import jax

from ucpjax import (
    checkpoints,
    cluster,
    compile_cache,
    experiment,
    export,
    measure,
    packing,
    pipeline,
    train,
)
from ucpjax.devices import use_cpu_cores
from ucpjax.model import Model
from ucpjax.run_folder import RunFolder

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMAND = " ".join([".venv/bin/python", *sys.argv])
# (module, function, kind): the work each wrapped function stands for.
TIMED = (
    (train, "fit", "training steps"),
    (train, "accuracy", "evaluation (JAX)"),
    (train, "predict", "evaluation (JAX)"),
    (Model, "settled", "BatchNorm re-estimation"),
    (checkpoints, "save", "checkpoints"),
    (RunFolder, "write_json", "checkpoints"),
    (RunFolder, "write_bytes", "checkpoints"),
    (cluster, "share_leaf", "k-means"),
    (packing, "encode", "packing"),
    (packing, "decode", "packing"),
    (measure, "macs", "MAC count"),
    (export, "to_tflite", "export (jax2tf + converter)"),
    (export, "evaluate", "TFLite evaluation"),
    (export, "simulated_int8", "export checks"),
    (export, "weights_check", "export checks"),
    (export, "latency_us", "TFLite latency"),
)
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class Clock:
    """Exclusive seconds per (stage, kind): a nested timer pauses the one outside."""

    def __init__(self):
        self.seconds: dict[tuple[str, str], float] = {}
        self.stage = "setup (data, model)"
        self._stack: list[list] = []  # [stage, start, child seconds]
        self._compiles: list[tuple[float, float]] = []  # recent compile intervals

    def add(self, kind: str, seconds: float, stage: str | None = None) -> None:
        key = (stage or self.stage, kind)
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    @contextlib.contextmanager
    def timing(self, kind: str):
        frame = [self.stage, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            total = time.perf_counter() - frame[1]
            self.add(kind, total - frame[2], frame[0])
            if self._stack:
                self._stack[-1][2] += total

    @contextlib.contextmanager
    def stage_of(self, stage: str):
        """Time not covered by a finer timer inside counts as this stage's "other"."""
        outer, self.stage = self.stage, stage
        try:
            with self.timing("other"):
                yield
        finally:
            self.stage = outer

    def compiled(self, event: str, seconds: float, **_) -> None:
        """A JAX compile event: moved out of whatever timer is running.

        Events nest (tracing an outer jit traces the inner ones, each reported at
        its end), so only the part of ``[end - seconds, end]`` that no earlier
        event covered is counted.
        """
        if event not in COMPILE_EVENTS:
            return
        end = time.perf_counter()
        begin, new = end - seconds, seconds
        for b, e in self._compiles:
            new -= max(0.0, min(e, end) - max(b, begin))
        # Earlier intervals inside this one are covered by it from now on.
        self._compiles = [(b, e) for b, e in self._compiles if e > begin and b < begin]
        self._compiles.append((begin, end))
        self.add("compilation", max(new, 0.0))
        if self._stack:
            self._stack[-1][2] += max(new, 0.0)


def instrument(clock: Clock) -> None:
    for owner, name, kind in TIMED:
        inner = getattr(owner, name)

        def timed(*args, _inner=inner, _kind=kind, **kwargs):
            with clock.timing(_kind):
                return _inner(*args, **kwargs)
        setattr(owner, name, functools.wraps(inner)(timed))
    stage, finish, write_report = pipeline._stage, pipeline._finish, pipeline._write_report

    def staged(position, name, *args, **kwargs):
        with clock.stage_of(f"{position} {name}"):
            return stage(position, name, *args, **kwargs)

    def finished(*args, **kwargs):
        with clock.stage_of("finish (pack, export, checks)"):
            return finish(*args, **kwargs)

    def reported(*args, **kwargs):
        with clock.stage_of("report and plots"):
            return write_report(*args, **kwargs)
    pipeline._stage, pipeline._finish, pipeline._write_report = staged, finished, reported
    jax.monitoring.register_event_duration_secs_listener(clock.compiled)


def markdown(result: dict) -> str:
    kinds = sorted({k for row in result["stages"].values() for k in row},
                   key=lambda k: -sum(row.get(k, 0) for row in result["stages"].values()))
    lines = [f"# Where `ucpjax compress` spends its time: {result['name']}", "",
             f"{result['machine']}. Command: `{result['command']}`. Wall "
             f"{result['wall_seconds']:.1f} s, compilation cache "
             f"{result['compilation_cache']}; seconds per stage and kind of work, exclusive "
             "(a compile inside training counts as compilation); \"other\" is what no "
             "timer covers (Python glue, data slicing, report writing).", "",
             "| stage | " + " | ".join(kinds) + " | total |", "|---|" + "---|" * (len(kinds) + 1)]
    for stage, row in result["stages"].items():
        lines.append(f"| {stage} | " + " | ".join(f"{row.get(k, 0):.1f}" for k in kinds)
                     + f" | {sum(row.values()):.1f} |")
    totals = {k: sum(row.get(k, 0) for row in result["stages"].values()) for k in kinds}
    lines.append("| **all** | " + " | ".join(f"**{v:.1f}**" for v in totals.values())
                 + f" | **{sum(totals.values()):.1f}** |")
    return "\n".join(lines) + "\n"


def main() -> None:
    use_cpu_cores()  # as the command line does, before JAX starts
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--name", required=True, help="names the results files")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--no-cache", action="store_true",
                        help="without the compilation cache (the default is an empty one)")
    parser.add_argument("--cache", type=pathlib.Path,
                        help="compilation cache folder to use and keep (warm on a rerun)")
    parser.add_argument("--results", type=pathlib.Path, default=ROOT / "results")
    parser.add_argument("overrides", nargs="*", help="key=value, as for `ucpjax compress`")
    args = parser.parse_args()
    exp = experiment.apply_overrides(experiment.load(args.config, smoke=args.smoke),
                                     args.overrides)
    clock = Clock()
    instrument(clock)
    with tempfile.TemporaryDirectory() as tmp:
        cache = None if args.no_cache else args.cache or pathlib.Path(tmp) / "xla"
        warm = cache is not None and cache.is_dir() and any(cache.iterdir())
        if cache is not None:  # by default cold: an empty cache, as on a first run
            compile_cache.enable(cache)
        start = time.perf_counter()
        experiment.run(exp, pathlib.Path(tmp) / "run", log=lambda s: None)
        wall = time.perf_counter() - start
    clock.add("other", wall - sum(clock.seconds.values()), "setup (data, model)")
    stages: dict[str, dict] = {}
    for (stage, kind), seconds in sorted(clock.seconds.items(), key=lambda kv: kv[0][0]):
        stages.setdefault(stage, {})[kind] = seconds
    result = {"name": args.name, "command": COMMAND,
              "compilation_cache": ("off" if cache is None else
                                    "warm (an earlier run's)" if warm else "empty at start"),
              "machine": experiment.machine(),
              "wall_seconds": wall, "stages": stages}
    md = markdown(result)
    folder = RunFolder(args.results)
    folder.write_json(f"profile_compress_{args.name}.json", result)
    folder.write_bytes(f"profile_compress_{args.name}.md", md.encode())
    print(md)


if __name__ == "__main__":
    main()
