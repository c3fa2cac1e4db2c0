"""Dense baselines of every registered model, as the compression pipeline starts from them.

    .venv/bin/python scripts/train_baselines.py                     # MNIST models
    .venv/bin/python scripts/train_baselines.py --only cifar_cnn    # about an hour
    .venv/bin/python scripts/train_baselines.py --only resnet8,mobilenet_cifar

Writes results/baselines/<model>.json, then results/baselines.md from all of
them (test error, epochs, wall time on this machine); checkpoints go to
runs/baselines/<model>. One file per model, so runs of different models can
go on at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# model -> (data, `ucpjax train` flags). Deep Compression's references:
# LeNet-300-100 1.64% error, LeNet-5 0.80%.
RECIPES = {
    "lenet300": ("mnist", ["--epochs", "30", "--learning-rate", "1e-3", "--augment", "shift"]),
    "lenet5": ("mnist", ["--epochs", "15", "--learning-rate", "1e-3", "--augment", "shift"]),
    "pcqat_mnist": ("mnist", ["--epochs", "10", "--learning-rate", "1e-3"]),
    "fashion_cnn": ("fashion_mnist", ["--epochs", "15", "--learning-rate", "1e-3"]),
    # Batch 48: with 40, the most images/s of 32-256 on this CPU (RESULTS.md, baselines).
    "cifar_cnn": ("cifar10", ["--epochs", "24", "--batch-size", "48", "--optimizer", "sgd",
                              "--learning-rate", "0.05", "--weight-decay", "5e-4",
                              "--augment", "crop_flip"]),
    # Same as experiments/resnet8_cifar10.py and mobilenet_cifar10.py (keep in sync).
    "resnet8": ("cifar10", ["--epochs", "30", "--batch-size", "64", "--optimizer", "sgd",
                            "--learning-rate", "0.05", "--weight-decay", "5e-4",
                            "--augment", "crop_flip"]),
    "mobilenet_cifar": ("cifar10", ["--epochs", "20", "--batch-size", "64", "--optimizer",
                                    "sgd", "--learning-rate", "0.05", "--weight-decay",
                                    "5e-4", "--augment", "crop_flip"]),
}
DEFAULT = ["lenet300", "lenet5", "pcqat_mnist"]


def run(model: str) -> dict:
    data, flags = RECIPES[model]
    out = pathlib.Path("runs") / "baselines" / model  # relative: the command is recorded
    cmd = [str(ROOT / ".venv" / "bin" / "ucpjax"), "train", "--model", model, "--data", data,
           "--out", str(out), *flags]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    metrics = json.loads((ROOT / out / "metrics.json").read_text())
    metrics["command"] = " ".join(["ucpjax", *cmd[1:]])
    metrics["process_seconds"] = time.perf_counter() - start
    return metrics


def markdown(rows: list[dict]) -> str:
    lines = ["| model | data | params | epochs | test error | val error | train time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['data']} | {r['parameters']:,} | {r['epochs']:g} | "
                     f"{100 * (1 - r['test_accuracy']):.2f}% | "
                     f"{100 * (1 - r['val_accuracy']):.2f}% "
                     f"| {r['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=",".join(DEFAULT), help="comma-separated models")
    args = parser.parse_args()
    folder = ROOT / "results" / "baselines"
    folder.mkdir(parents=True, exist_ok=True)
    for model in args.only.split(","):
        metrics = run(model)
        metrics["date"] = time.strftime("%Y-%m-%d")
        tmp = folder / f".{model}.tmp"
        tmp.write_text(json.dumps(metrics, indent=2))
        os.replace(tmp, folder / f"{model}.json")
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    table = markdown(rows)
    (ROOT / "results" / "baselines.md").write_text(table)
    print(table)


if __name__ == "__main__":
    sys.exit(main())
