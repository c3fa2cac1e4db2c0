"""Figures: weight histograms with k-means centroids, accuracy against model size.

matplotlib is imported inside the functions (Agg backend, no display), so
importing ucpjax never pays for it. Files are written atomically: a temporary
name in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import math
import os
import pathlib

import numpy as np

# One colour and marker per initialisation, in ucpjax.cluster.INITS order.
_STYLES = {
    "linear": ("tab:red", "v"),
    "density": ("tab:green", "^"),
    "forgy": ("tab:purple", "o"),
    "kmeans++": ("tab:orange", "s"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _leaf(params, layer: str) -> np.ndarray:
    """``params['Dense_0']['kernel']`` for ``'Dense_0/kernel'`` (a layer name alone: its kernel)."""
    node = params
    for part in layer.split("/"):
        node = node[part]
    if isinstance(node, dict):
        node = node["kernel"]
    return np.asarray(node)


def weight_histograms(params, centroids_by_layer: dict[str, dict[str, np.ndarray]],
                      path) -> pathlib.Path:
    """Histogram of each layer's non-zero weights, centroids of each init marked.

    After Deep Compression's figure of centroid initialisations: the weights'
    distribution with the centroids of linear, density, forgy and k-means++
    initialisation drawn as markers (a row each) below it.

    Args:
      params: Flax params pytree.
      centroids_by_layer: ``{'Dense_0/kernel': {init: centroids}}`` (e.g. from
        ``ucpjax.cluster.centroids_by_init``).
      path: PNG file to write.

    Returns:
      The path written.
    """
    plt = _pyplot()
    layers = list(centroids_by_layer)
    cols = min(len(layers), 3) or 1
    rows = max(math.ceil(len(layers) / cols), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    for ax, layer in zip(axes.flat, layers, strict=False):
        weights = _leaf(params, layer).ravel()
        nonzero = weights[weights != 0]
        counts, _, _ = ax.hist(nonzero, bins=100, color="tab:blue", alpha=0.6, label="weights")
        top = max(float(np.max(counts, initial=0)), 1.0)
        for row, (init, centroids) in enumerate(centroids_by_layer[layer].items()):
            color, marker = _STYLES.get(init, ("black", "x"))
            y = np.full(len(centroids), -top * 0.08 * (row + 1))
            ax.scatter(np.asarray(centroids), y, color=color, marker=marker, s=18,
                       label=f"{init} ({len(centroids)})", clip_on=False)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_ylim(-top * 0.08 * (len(centroids_by_layer[layer]) + 1), top * 1.05)
        ax.set_title(f"{layer}: {nonzero.size:,} non-zero of {weights.size:,}", fontsize=9)
        ax.set_xlabel("weight value")
        ax.set_ylabel("count")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def accuracy_vs_size(rows: list[dict], path, *, size_key: str = "bytes") -> pathlib.Path:
    """Accuracy (%) against model size (log x), one labelled point per stage, in order.

    Args:
      rows: dicts with ``stage``, ``accuracy`` (a fraction) and ``size_key``
        (bytes); rows without ``size_key`` use ``packed_bytes`` (the pipeline's name).
      path: PNG file to write.
      size_key: which field holds the size.

    Returns:
      The path written.
    """
    plt = _pyplot()
    sizes = [float(r.get(size_key, r.get("packed_bytes", np.nan))) for r in rows]
    accuracy = [100.0 * float(r["accuracy"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, accuracy, "-o", color="tab:blue")
    for row, x, y in zip(rows, sizes, accuracy, strict=True):
        ax.annotate(str(row["stage"]), (x, y), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("size (bytes, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def sensitivity(table: dict, path) -> pathlib.Path:
    """Accuracy drop of each layer pruned alone (left) and clustered alone (right).

    Args:
      table: ``ucpjax.sensitivity.measure``'s output.
      path: PNG file to write.

    Returns:
      The path written.
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, entry in table["layers"].items():
        for ax, key in ((left, "prune"), (right, "cluster")):
            grid = [float(g) for g in entry[key]]
            ax.plot(grid, list(entry[key].values()), "-o", markersize=3, label=name)
    left.set_xlabel("sparsity of the layer alone")
    right.set_xlabel("clusters k of the layer alone")
    right.set_xscale("log", base=2)
    for ax in (left, right):
        ax.set_ylabel("validation accuracy drop (points)")
        ax.grid(True, alpha=0.3)
    right.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
