"""Training-step speed under XLA's CPU library flags: do oneDNN, XNNPACK or YNNPACK help?

XLA's CPU backend can hand convolutions and matrix products to oneDNN
(``--xla_cpu_experimental_onednn_custom_call``), to XNNPACK subgraphs
(``--xla_cpu_experimental_xnn_graph_fusion_mode``) or to YNNPACK
(``--xla_cpu_experimental_ynn_fusion_type``); all are off by default in
jax 0.10. Flags are read once, when the backend starts, so each setting runs
``scripts/bench_train_step.py`` in its own process, one after another, and
this script sets their "ours" medians (the step ``ucpjax.train`` runs) side by
side against the default.

Command:
    .venv/bin/python scripts/bench_xla_flags.py --only lenet300,cifar_cnn,resnet8
Writes results/bench_xla_flags.json and results/bench_xla_flags.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from ucpjax.run_folder import RunFolder

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMAND = " ".join([".venv/bin/python", *sys.argv])

SETTINGS = {
    "default": "",  # the caller's XLA_FLAGS alone
    "oneDNN custom calls": "--xla_cpu_experimental_onednn_custom_call=true",
    "XNNPACK graph fusion": ("--xla_cpu_experimental_xnn_graph_fusion_mode="
                             "XNN_GRAPH_FUSION_MODE_GREEDY"),
    "YNNPACK dot + conv": ("--xla_cpu_experimental_ynn_fusion_type="
                           "individual_dot,individual_convolution"),
}


def step_medians(name: str, flags: str, only: str, repeats: int) -> dict[str, float]:
    """Median seconds of each model's step ("ours") with ``flags`` added to ``XLA_FLAGS``."""
    # The caller's own flags (e.g. a host device count) stay, in every setting alike.
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train_step.py"),
                               "--only", only, "--repeats", str(repeats), "--out", out],
                              env=env, stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            sys.exit(f"setting {name!r} failed (exit {done.returncode}; its error is above): "
                     f"this jaxlib may not know XLA_FLAGS={flags}; remove it from SETTINGS")
        rows = json.loads(pathlib.Path(out, "bench_train_step.json").read_text())["rows"]
    return {name: statistics.median(row["ours_s"]) for name, row in rows.items()}


def markdown(medians: dict[str, dict[str, float]], load: tuple) -> str:
    models = list(medians["default"])
    lines = ["| model | " + " | ".join(f"{s} ms" for s in medians) + " |",
             "|---|" + "---|" * len(medians)]
    for model in models:
        base = medians["default"][model]
        cells = [f"{m[model] * 1e3:.1f} ({base / m[model]:.2f}x)" for m in medians.values()]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    flags = "\n".join(f"- {name}: `XLA_FLAGS={flags}`" for name, flags in SETTINGS.items()
                      if flags)
    return "\n\n".join([
        "# Training step under XLA's CPU library flags",
        ("Median ms of the jitted loss and gradient ``ucpjax.train`` runs "
         "(`scripts/bench_train_step.py`'s \"ours\"), each setting in its own process; "
         "in brackets the speed-up over the default. "
         f"Load average after: {', '.join(f'{v:.1f}' for v in load)} on {os.cpu_count()} CPUs."),
        "\n".join(lines), flags, f"Command: `{COMMAND}`"]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="lenet300,cifar_cnn,resnet8")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "results")
    args = parser.parse_args()
    medians = {name: step_medians(name, flags, args.only, args.repeats)
               for name, flags in SETTINGS.items()}
    load = os.getloadavg()
    md = markdown(medians, load)
    folder = RunFolder(args.out)
    folder.write_json("bench_xla_flags.json", {"command": COMMAND, "settings": SETTINGS,
                                               "median_s": medians, "load_average": load})
    folder.write_bytes("bench_xla_flags.md", md.encode())
    print(md)


if __name__ == "__main__":
    main()
