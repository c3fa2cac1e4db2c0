"""Reports as text: the per-stage table and the final measurements, in markdown."""

from __future__ import annotations

_ROW_COLUMNS = (("stage", "stage", "{}"), ("accuracy", "test acc", "{:.4f}"),
                ("sparsity", "sparsity", "{:.3f}"), ("max_distinct", "distinct", "{}"),
                ("packed_bytes", "packed B", "{:,}"), ("macs_nonzero", "mults (nz)", "{:,}"),
                ("macs_dense", "mults", "{:,}"), ("seconds", "time s", "{:.1f}"))

# jax_accuracy: float activations; jax_int8_accuracy: int8 activations as the .tflite has them.
_FINAL_KEYS = ("jax_accuracy", "jax_int8_accuracy", "tflite_accuracy", "tflite_agreement",
               "tflite_near_ties", "tflite_max_logit_error_steps", "float32_bytes",
               "tflite_bytes", "tflite_zip_bytes", "packed_bytes", "channels_reordered",
               "compression_tflite_zip", "compression_packed", "sparsity", "macs_dense",
               "macs_nonzero", "channel_groups_removed", "macs_slimmed", "latency_int8_us",
               "latency_float_us", "weights_faithful", "tflite_within_tolerance")


def table(header, rows) -> str:
    """A markdown table of string cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def markdown(report: dict) -> str:
    """The report as markdown: one row per stage, then the final measurements."""
    stage_rows = [[fmt.format(row[key]) for key, _, fmt in _ROW_COLUMNS] for row in report["rows"]]
    final = report["final"]
    final_rows = [[key, _fmt(final[key])] for key in _FINAL_KEYS if key in final]
    return (table([title for _, title, _ in _ROW_COLUMNS], stage_rows)
            + "\n\n" + table(["final", "value"], final_rows) + "\n")

