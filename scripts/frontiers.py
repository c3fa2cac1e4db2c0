"""Accuracy against size: each `ucpjax search`'s candidates beside the fixed recipe.

    .venv/bin/python scripts/frontiers.py            # after the searches of results/search/

For each ``results/search/<name>/search.json`` whose experiment has a fixed-recipe
report ``results/<name>.json``, writes ``results/frontiers.md`` (one row per
point: test drop in points against the dense model, zipped and packed bytes)
and ``results/frontiers.png`` (test accuracy against zipped bytes).
"""

from __future__ import annotations

import json
import pathlib

from ucpjax import report

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def points(name: str) -> list[dict]:
    """The fixed recipe's point and each search candidate's, test columns from the .tflite."""
    fixed = json.loads((RESULTS / f"{name}.json").read_text())
    dense = fixed["rows"][0]["accuracy"]
    final = fixed["final"]
    rows = [{"experiment": name, "point": "fixed recipe", "accuracy": final["tflite_accuracy"],
             "test_drop": 100 * (dense - final["tflite_accuracy"]),
             "zip": final["tflite_zip_bytes"], "packed": final["packed_bytes"]}]
    found = json.loads((RESULTS / "search" / name / "search.json").read_text())
    for row in found["rows"]:
        chosen = " (chosen)" if row["name"] == found["chosen"] else ""
        rows.append({"experiment": name, "point": f"c{row['candidate']}{chosen}",
                     "accuracy": row["test_accuracy"], "test_drop": row["test_drop"],
                     "zip": row["tflite_zip_bytes"], "packed": row["packed_bytes"]})
    return rows


def main() -> None:
    from ucpjax import plots

    names = sorted(p.parent.name for p in (RESULTS / "search").glob("*/search.json")
                   if (RESULTS / f"{p.parent.name}.json").exists())
    rows = [row for name in names for row in points(name)]
    body = [[r["experiment"], r["point"], f"{r['accuracy']:.4f}", f"{r['test_drop']:.2f}",
             f"{r['zip']:,}", f"{r['packed']:,}"] for r in rows]
    text = report.table(["experiment", "point", "test acc", "test drop", "zipped B",
                         "packed B"], body)
    (RESULTS / "frontiers.md").write_text(
        "Fixed recipe against `ucpjax search` candidates (int8 .tflite on the test set; "
        "drops in points against the dense model)\n\n" + text + "\n")
    plots.accuracy_vs_size(
        [{"stage": f"{r['experiment']}: {r['point']}", "accuracy": r["accuracy"],
          "bytes": r["zip"]} for r in sorted(rows, key=lambda r: (r["experiment"], r["zip"]))],
        RESULTS / "frontiers.png")
    print(text)


if __name__ == "__main__":
    main()
