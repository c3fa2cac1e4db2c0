"""Per-layer settings: which weights are compressed, and how far.

One rule type carries every per-layer setting. A ``LayerRule`` matches params
leaves by a regex over their ``'Layer/name'`` path (``'Dense_0/kernel'``); the
first rule that matches a leaf decides for it (``rule_for``), and a leaf that
no rule matches is left alone by every stage (biases, BatchNorm parameters).
A field left None takes the stage's default (``prune.target_sparsity``,
``cluster.num_clusters``, ``quantize.weight_bits``).

This module imports nothing of ours, so every stage, measurement and the
export can share it without sitting above the training code.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax

# Largest k of a weight-shared leaf (see ``constraints.codebook``).
MAX_CLUSTERS = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerRule:
    """The settings of the leaves whose ``'Layer/name'`` path matches ``pattern``.

    Attributes:
      pattern: regex, searched (``re.search``) in the leaf's path.
      sparsity: final fraction of zeros of each matched leaf; 0 leaves it dense.
        None: ``prune.target_sparsity`` (and in ``scope="global"`` the leaf joins
        the global ranking; an explicit value keeps it out).
      clusters: number of shared non-zero values; 0 leaves it unclustered.
        None: ``cluster.num_clusters``.
      bits: weight bits of quantization-aware training, 2..8. None:
        ``quantize.weight_bits``.
    """

    pattern: str
    sparsity: float | None = None
    clusters: int | None = None
    bits: int | None = None

    def __post_init__(self):
        def refuse(field, requirement):
            raise ValueError(f"LayerRule({self.pattern!r}).{field}="
                             f"{getattr(self, field)!r}: {requirement}")

        try:
            re.compile(self.pattern)
        except (re.error, TypeError):
            refuse("pattern", "not a valid regex")
        if self.sparsity is not None and not (
                _is_number(self.sparsity) and 0 <= self.sparsity < 1):
            refuse("sparsity", "must be a number in [0, 1)")
        if self.clusters is not None and not (
                _is_int(self.clusters) and (self.clusters == 0
                                            or 2 <= self.clusters <= MAX_CLUSTERS)):
            refuse("clusters", f"must be 0 (not clustered) or an integer in 2..{MAX_CLUSTERS}")
        if self.bits is not None and not (_is_int(self.bits) and 2 <= self.bits <= 8):
            refuse("bits", "must be an integer in 2..8")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# Every kernel (Dense, Conv), no bias: what the paper compresses.
DEFAULT_RULES = (LayerRule(pattern=r"kernel$"),)

Rules = Sequence[LayerRule]


def path_name(path) -> str:
    """``'Dense_0/kernel'`` for a tree path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def call_name(layer: str, call: int) -> str:
    """The name of a layer's ``call``-th use (0-based): ``Dense_0``, ``Dense_0#2``, ..."""
    return f"{layer}#{call + 1}" if call else layer


def rule_for(name: str, rules: Rules) -> LayerRule | None:
    """The first rule whose pattern matches ``name``, or None."""
    return next((rule for rule in rules if re.search(rule.pattern, name)), None)


def matched(params, rules: Rules) -> dict[str, LayerRule]:
    """``{'Layer/name': rule}`` of every leaf some rule matches, in tree order."""
    found = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        name = path_name(path)
        rule = rule_for(name, rules)
        if rule is not None:
            found[name] = rule
    return found


def selected(params, rules: Rules = DEFAULT_RULES):
    """Pytree of bools like ``params``: which leaves some rule matches."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: rule_for(path_name(path), rules) is not None, params)


def unselected_matrices(params, rules: Rules) -> dict[str, int]:
    """``{'Layer/name': size}`` of the leaves of 2 or more dimensions that no rule
    matches: weight matrices under names of their own (``self.param("w", ...)``),
    which every stage leaves uncompressed."""
    return {path_name(path): int(leaf.size)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if getattr(leaf, "ndim", 0) >= 2 and rule_for(path_name(path), rules) is None}


def setting(params, rules: Rules, field: str, default):
    """Pytree like ``params``: each matched leaf's ``field`` (``default`` when None).

    Unmatched leaves get None; pass ``is_leaf=lambda x: x is None`` when mapping
    over the result.
    """
    def value(path, _):
        rule = rule_for(path_name(path), rules)
        if rule is None:
            return None
        own = getattr(rule, field)
        return default if own is None else own

    return jax.tree_util.tree_map_with_path(value, params)
