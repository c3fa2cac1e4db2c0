"""ucpjax: compress a Flax model for phones (prune, distill, cluster, quantize, int8 TFLite).

``ucpjax.compress(module, variables, train=..., test=..., config=...)`` is the
Python entry point; ``ucpjax compress --config ...`` the command line.
"""

__all__ = ["PipelineConfig", "Result", "compress"]


def __getattr__(name):
    # Lazy, so `import ucpjax.data` does not pull in every stage.
    if name in __all__:
        from ucpjax import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'ucpjax' has no attribute {name!r}")
