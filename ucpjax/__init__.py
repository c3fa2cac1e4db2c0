"""ucpjax: compress a Flax model for phones (prune, distill, cluster, quantize, int8 TFLite).

``ucpjax.compress(module, variables, train=..., test=..., recipe=...)`` is the
Python entry point; ``ucpjax compress --config ...`` the command line.
"""

# Lazy, so `import ucpjax.data` does not pull in every stage.
_EXPORTS = {"compress": "pipeline", "Result": "pipeline", "Recipe": "recipe",
            "LayerRule": "rules", "ToleranceError": "export", "AccuracyError": "pipeline",
            "ConfigError": "config"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"ucpjax.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ucpjax' has no attribute {name!r}")
