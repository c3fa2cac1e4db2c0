"""The verdict of a paired study: one variant against another, per sparsity, over seeds.

    .venv/bin/python scripts/findings.py --study runs/findings_distill
    .venv/bin/python scripts/findings.py --finding teacher --study runs/findings_teacher
    .venv/bin/python scripts/findings.py --finding distill_conv --study runs/findings_conv

``--finding distill`` (``experiments/findings_distill.py``): distillation against
equal-epoch plain fine-tuning. ``--finding teacher``
(``experiments/findings_teacher.py``): the aligned teacher (the student's own dense
model) against a small convolutional teacher. ``--finding distill_conv`` and
``teacher_conv`` (``experiments/findings_conv.py``): the same two questions with the
conv net pcqat_mnist as the student and LeNet-5 as the other teacher. Reads the study's variants
``s<sparsity>_seed<seed>_<variant>`` (their ``report.json``: test accuracy after
the prune stage and after the last stage) and writes
results/findings_<finding>.{json,md}. Each seed's difference is paired (same dense
and pruned model). The rule, stated before the numbers: a finding is *confirmed*
when every seed's difference is positive and the mean exceeds twice its standard
error; *refuted* when every seed's is negative with the same margin; otherwise
*not resolvable at this noise*.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics

from ucpjax.run_folder import RunFolder

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAME = re.compile(r"s(\d+)_seed(\d+)_(\w+)$")
# finding -> (variant A, variant B, title, what the two are); difference = A - B.
FINDINGS = {
    "distill": ("distill", "finetune",
                "Distillation against equal-epoch fine-tuning (LeNet-300-100 / MNIST)",
                "after the 15-epoch stage that follows it: distillation (alpha 0.9, T 4) or "
                "the same stage with alpha 0 (labels only)"),
    "teacher": ("distill", "pcqat_teacher",
                "An aligned teacher against another architecture (LeNet-300-100 / MNIST)",
                "after the 15-epoch distillation (alpha 0.9, T 4) that follows it, taught "
                "by the student's own dense LeNet-300-100 (aligned, 98.79%) or by the "
                "convolutional pcqat_mnist model (98.25%)"),
    "distill_conv": ("distill", "finetune",
                     "Distillation against equal-epoch fine-tuning (pcqat_mnist / MNIST, a "
                     "conv net)",
                     "after the 4-epoch stage that follows it: distillation (alpha 0.9, T 4) "
                     "from the dense pcqat_mnist or the same stage with alpha 0 (labels only)"),
    "teacher_conv": ("distill", "lenet5_teacher",
                     "An aligned teacher against another architecture (pcqat_mnist / MNIST, "
                     "a conv net)",
                     "after the 4-epoch distillation (alpha 0.9, T 4) that follows it, taught "
                     "by the student's own dense pcqat_mnist (aligned, 98.25%) or by LeNet-5 "
                     "(99.38%)"),
}


def accuracies(run: pathlib.Path) -> dict:
    rows = json.loads((run / "report.json").read_text())["rows"]
    by_stage = {row["stage"]: row["accuracy"] for row in rows}
    return {"pruned": by_stage["prune"], "after": rows[-1]["accuracy"]}


def verdict(differences: list[float]) -> str:
    mean = statistics.mean(differences)
    error = statistics.stdev(differences) / len(differences) ** 0.5
    if all(d > 0 for d in differences) and mean > 2 * error:
        return "confirmed"
    if all(d < 0 for d in differences) and -mean > 2 * error:
        return "refuted"
    return "not resolvable at this noise"


def summarise(study: pathlib.Path, a: str, b: str) -> dict:
    runs = {}
    for run in sorted(study.iterdir()):
        match = NAME.match(run.name)
        if match and match[3] in (a, b) and (run / "report.json").exists():
            sparsity, seed, variant = int(match[1]), int(match[2]), match[3]
            runs.setdefault(sparsity, {}).setdefault(seed, {})[variant] = accuracies(run)
    result = {}
    for sparsity, seeds in sorted(runs.items()):
        paired = {seed: v for seed, v in sorted(seeds.items()) if len(v) == 2}
        diffs = [100 * (v[a]["after"] - v[b]["after"]) for v in paired.values()]
        result[f"{sparsity}%"] = {
            "seeds": paired,
            "difference_points": diffs,
            "mean_points": statistics.mean(diffs) if diffs else None,
            "stdev_points": statistics.stdev(diffs) if len(diffs) > 1 else None,
            "verdict": verdict(diffs) if len(diffs) > 1 else "too few seeds",
        }
    return result


def markdown(result: dict, study: str, finding: str) -> str:
    a, b, title, what = FINDINGS[finding]
    lines = [f"# {title}", "",
             f"Test accuracy (10,000 images, 0.01 points each) after the prune stage and "
             f"{what}. Difference = {a} - {b}, in points, paired by seed.", "",
             f"| sparsity | seed | pruned | {a} | {b} | difference |",
             "|---|---|---|---|---|---|"]
    for sparsity, r in result.items():
        for seed, v in r["seeds"].items():
            lines.append(f"| {sparsity} | {seed} | {v[a]['pruned']:.4f} | "
                         f"{v[a]['after']:.4f} | {v[b]['after']:.4f} | "
                         f"{100 * (v[a]['after'] - v[b]['after']):+.2f} |")
    lines += ["", "| sparsity | mean difference | spread (stdev) | verdict |", "|---|---|---|---|"]
    for sparsity, r in result.items():
        spread = "-" if r["stdev_points"] is None else f"{r['stdev_points']:.2f}"
        lines.append(f"| {sparsity} | {r['mean_points']:+.2f} | {spread} | {r['verdict']} |")
    command = " ".join([".venv/bin/python scripts/findings.py",
                        *(["--finding", finding] if finding != "distill" else []),
                        "--study", study])
    lines += ["", "Verdict rule: confirmed when every seed's difference is positive and the "
              "mean exceeds twice its standard error; refuted when all are negative with the "
              "same margin; otherwise not resolvable at this noise.", "",
              f"Command: `{command}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finding", choices=sorted(FINDINGS), default="distill")
    parser.add_argument("--study", type=pathlib.Path, default=pathlib.Path("runs/findings_distill"))
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "results")
    args = parser.parse_args()
    a, b = FINDINGS[args.finding][:2]
    result = summarise(args.study, a, b)
    study = os.path.relpath(args.study.resolve(), ROOT)
    md = markdown(result, study, args.finding)
    results = RunFolder(args.out)  # its atomic writes
    results.write_json(f"findings_{args.finding}.json", {"study": study, "by_sparsity": result})
    results.write_bytes(f"findings_{args.finding}.md", md.encode())
    print(md)


if __name__ == "__main__":
    main()
