"""Per-layer sensitivity: the validation accuracy one layer alone loses when compressed.

After Han et al. 2015 (Fig. 6): each compressible leaf is pruned alone, in one
shot, to each sparsity of a grid, and clustered alone to each k of a grid, with
every other leaf as it was; the drop in validation accuracy (points, no
fine-tuning) is what that layer costs. Fine-tuning recovers much of it, so the
drops over-state the final cost, but they rank layers: a first conv, a
depthwise conv or a last dense layer shows up as steep.

``allocate`` turns the table into per-layer ``LayerRule``s that the prune and
cluster stages take: the stated rule is that no layer alone may lose more than
``max_drop / number of layers`` points (drops treated as additive), and each
layer gets the highest sparsity and the smallest k of the grid within that.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from ucpjax import batchnorm, cluster, prune, saliency, train
from ucpjax import rules as rules_lib
from ucpjax.rules import DEFAULT_RULES, LayerRule, Rules

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
CLUSTERS = (4, 8, 16, 32, 64)


def measure(params, *, apply_fn, data, rules: Rules = DEFAULT_RULES,
            sparsities=SPARSITIES, clusters=CLUSTERS, min_per_channel: int = 0,
            criterion: str | None = None, seed: int = 0, progress=lambda name: None) -> dict:
    """The accuracy drop of each compressible leaf pruned or clustered alone.

    Args:
      params: trained params, as the stages see them.
      apply_fn: ``apply_fn(params, x) -> logits`` in inference mode (a live
        ``batchnorm.LiveBatchNorm`` has its statistics re-estimated per trial).
      data: a ``ucpjax.data.Dataset``; its validation split is the measure.
      rules: which leaves are measured (those some rule matches).
      sparsities: the pruning grid (fractions of zeros).
      clusters: the grid of k.
      min_per_channel: non-zeros kept in each output channel (``PruneConfig``).
      criterion: what ranks the weights pruned (``PruneConfig.criterion``).
      seed: fixes the k-means draws.
      progress: called with each leaf's name before it is measured.

    Returns:
      ``{"val_accuracy": base, "criterion", "layers": {name: {"size", "prune":
      {s: drop}, "cluster": {k: drop}}}}``, drops in accuracy points (positive:
      worse).
    """
    base = train.accuracy(apply_fn, params, data.x_val, data.y_val)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in flat]
    scales = jax.tree.leaves(saliency.scales(criterion, apply_fn, params, data.x_train),
                             is_leaf=lambda f: f is None)
    layers = {}
    padded_size = cluster.common_padded_size(
        w for path, w in flat if rules_lib.rule_for(rules_lib.path_name(path), rules) is not None)
    for i, (path, w) in enumerate(flat):
        name = rules_lib.path_name(path)
        if rules_lib.rule_for(name, rules) is None:
            continue
        progress(name)

        def drop(changed, i=i):
            trial = jax.tree.unflatten(treedef, [*leaves[:i], changed, *leaves[i + 1:]])
            # A live BatchNorm model gets its running statistics re-estimated, as the
            # stages do after training, so the drop is the weights' and not stale BN's.
            trial_fn = batchnorm.settled(apply_fn, trial, data.x_train)
            return 100.0 * (base - train.accuracy(trial_fn, trial, data.x_val, data.y_val))

        w = np.asarray(w)
        key = jax.random.fold_in(jax.random.key(seed), i)
        layers[name] = {
            "size": int(w.size),
            "prune": {str(s): drop(prune.prune_once(w, s, min_per_channel, scales[i]))
                      for s in sparsities},
            "cluster": {str(k): drop(cluster.share_leaf(
                w, k, cluster.ClusterConfig(num_clusters=k, fine_tune=None), key,
                padded_size)[0])
                for k in clusters},
        }
    return {"val_accuracy": base, "criterion": criterion or "magnitude", "layers": layers}


def allocate(table: dict, *, max_drop: float) -> tuple[LayerRule, ...]:
    """Per-layer rules from a ``measure`` table: the most compression within the budget.

    Args:
      table: the output of ``measure`` (or its JSON).
      max_drop: accuracy points the whole model may lose; each of the L layers
        may lose ``max_drop / L`` alone.

    Returns:
      One ``LayerRule`` per measured leaf (its exact path), in table order: the
      highest sparsity whose drop, and every lower sparsity's, is within the
      share, and the smallest such k counting down from the largest (so one
      lucky point of a noisy curve is not taken); 0 sparsity, and the largest
      k of the grid, when none is.
    """
    layers = table["layers"]
    share = max_drop / max(len(layers), 1)
    chosen = []
    for name, entry in layers.items():
        sparsity = _last_within(sorted((float(s), d) for s, d in entry["prune"].items()),
                                share, default=0.0)
        ks = sorted(((int(k), d) for k, d in entry["cluster"].items()), reverse=True)
        clusters = _last_within(ks, share, default=ks[0][0])
        chosen.append(LayerRule(pattern=f"^{re.escape(name)}$", sparsity=sparsity,
                                clusters=clusters))
    return tuple(chosen)


def _last_within(curve: list[tuple], share: float, default):
    """The last grid value of ``curve`` before the first drop above ``share``."""
    last = default
    for value, drop in curve:
        if drop > share:
            break
        last = value
    return last


def markdown(table: dict) -> str:
    """The table as markdown: one row per layer, drops in points."""
    layers = table["layers"]
    if not layers:
        return "(no layer measured)\n"
    first = next(iter(layers.values()))
    heads = [f"s={s}" for s in first["prune"]] + [f"k={k}" for k in first["cluster"]]
    lines = [f"validation accuracy {table['val_accuracy']:.4f}; accuracy drop in points when "
             "one layer alone is pruned (s) or clustered (k), no fine-tuning", "",
             "| layer | size | " + " | ".join(heads) + " |",
             "|---|---|" + "---|" * len(heads)]
    for name, entry in layers.items():
        drops = [*entry["prune"].values(), *entry["cluster"].values()]
        lines.append(f"| {name} | {entry['size']:,} | "
                     + " | ".join(f"{d:.2f}" for d in drops) + " |")
    return "\n".join(lines) + "\n"


def load_rules(path, *, max_drop: float) -> tuple[LayerRule, ...]:
    """``allocate`` over a ``sensitivity.json`` written by ``ucpjax sensitivity``.

    For an experiment file: ``Recipe(rules=sensitivity.load_rules(path, max_drop=1.0))``.
    """
    import json
    import pathlib

    from ucpjax.config import ConfigError

    path = pathlib.Path(path)
    try:
        table = json.loads(path.read_text())
        return allocate(table, max_drop=max_drop)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a sensitivity table ({type(err).__name__}); "
                          "write one with `ucpjax sensitivity --config ... --out ...`") from None
