"""Kills a smoke `ucpjax compress` at random moments and checks that each resumed run
ends bit-identical to an uninterrupted one.

    .venv/bin/python scripts/chaos_resume.py --kills 10 --out runs/chaos

For each kill: start the run, SIGKILL it after a random time within the
uninterrupted run's wall time, then `--resume` it to the end. Asserts that
`model.tflite`, `model.ucpj` and `report.json` (timings aside) equal the
uninterrupted run's and that every final file is present. Writes
results/chaos_resume.json and .md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = "experiments/lenet300_mnist.py"
FINAL_FILES = ("model.tflite", "model.ucpj", "report.json", "report.md", "config.json",
               "weights.png", "accuracy_vs_size.png")
TIMINGS = ("seconds", "latency_int8_us", "latency_float_us")


def _command(out: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ucpjax.cli", "compress", "--config", CONFIG, "--smoke",
            "--out", str(out), *extra]


def _without_timings(tree):
    if isinstance(tree, dict):
        return {k: _without_timings(v) for k, v in tree.items() if k not in TIMINGS}
    if isinstance(tree, list):
        return [_without_timings(v) for v in tree]
    return tree


def _fingerprint(out: pathlib.Path) -> dict:
    missing = [name for name in FINAL_FILES if not (out / name).exists()]
    if missing:
        return {"missing": missing}
    return {"tflite": (out / "model.tflite").read_bytes(),
            "packed": (out / "model.ucpj").read_bytes(),
            "report": _without_timings(json.loads((out / "report.json").read_text()))}


def _killed_then_resumed(out: pathlib.Path, after: float) -> dict:
    proc = subprocess.Popen(_command(out), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(after)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(_command(out, "--resume"), cwd=ROOT, capture_output=True,
                             text=True)
    stages_done = sum(1 for _ in (out / "stages").glob("*.json"))
    return {"after_s": round(after, 2), "killed": killed, "resume_exit": resumed.returncode,
            "restored_lines": resumed.stdout.count("finished earlier, restored"),
            "stages": stages_done}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--out", default="runs/chaos")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = ROOT / args.out
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(_command(out / "whole"), cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - start
    reference = _fingerprint(out / "whole")
    rng = random.Random(args.seed)
    rows = []
    for i in range(args.kills):
        run = out / f"kill{i}"
        row = _killed_then_resumed(run, rng.uniform(1.0, wall))
        row["identical"] = _fingerprint(run) == reference
        rows.append(row)
        print(f"kill {i}: {row}", flush=True)
    result = {"command": f"python scripts/chaos_resume.py --kills {args.kills} "
                         f"--out {args.out} --seed {args.seed}",
              "uninterrupted_seconds": round(wall, 1), "runs": rows,
              "all_identical": all(r["identical"] and r["resume_exit"] == 0 for r in rows)}
    (ROOT / "results" / "chaos_resume.json").write_text(json.dumps(result, indent=2))
    table = ["| kill | after s | killed | resume exit | stages restored | identical |",
             "|---|---|---|---|---|---|"]
    table += [f"| {i} | {r['after_s']} | {r['killed']} | {r['resume_exit']} | "
              f"{r['restored_lines']} | {r['identical']} |" for i, r in enumerate(rows)]
    (ROOT / "results" / "chaos_resume.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0 if result["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
