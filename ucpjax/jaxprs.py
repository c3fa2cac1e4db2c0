"""Walking a traced program (a jaxpr), nested calls included: what training and
model checks read from a step or a forward pass before running it."""

from __future__ import annotations


def sub_jaxprs(eqn):
    """The jaxprs inside one equation (of a jit, custom_vjp, cond, scan, ...)."""
    for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds a Jaxpr
            if hasattr(inner, "eqns"):
                yield inner


def has_conv(jaxpr) -> bool:
    """True when ``jaxpr`` or a jaxpr inside it holds a convolution."""
    return any(eqn.primitive.name == "conv_general_dilated"
               or any(has_conv(sub) for sub in sub_jaxprs(eqn)) for eqn in jaxpr.eqns)
