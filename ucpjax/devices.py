"""Which devices share a training batch, and the CPU devices the command line asks for.

On one CPU host XLA runs each op on one pool of threads, and the weight
gradients of the convolutions it computes itself use that pool poorly. Split
over two host devices, one per core, that run their halves side by side,
cifar_cnn's loss-and-gradient (batch 48, 2 cores) took 44.4 ms instead of 65.0
(results/bench_train_step.md). Where products dominate, the split only adds the
gradients' all-reduce: in ad-hoc timings LeNet-300-100 (all matrix products)
went from 1.1 to 1.9 ms per step, and resnet8 (when most of its convs' weight
gradients were ``ucpjax.conv``'s per-tap products) from 106 to 115 ms
(RESULTS.md, "The batch split over one device per core").

So the command line asks XLA for one host device per usable core
(``use_cpu_cores``, before JAX starts), and a step splits its batch when the
weight gradients XLA computes as convolutions are at least ``SPLIT_SHARE`` of
its multiply-adds (``weight_grad_share``): over as many devices as divide the
batch, at least ``MIN_SHARE`` examples each. Other steps stay on one device.
Every device computes the same global-batch step (BatchNorm's batch
statistics included), so the split changes only float rounding. Evaluation
batches split over all of the process's devices (``inference_mesh``).

On accelerators, and across hosts (``jax.distributed``), every device takes a
share as before, and the batch size must be a multiple of the device count.
Python users call ``use_cpu_cores()`` before their first JAX computation.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import Mesh

from ucpjax import jaxprs

_FLAG = "--xla_force_host_platform_device_count"
# Shares of the repo's models (a conv's weight gradient is about a third of its
# multiply-adds, so 0.33 is every conv's): cifar_cnn 0.33, mobilenet_cifar 0.30,
# fashion_cnn 0.29 and resnet8 0.20 split (resnet8's loss and gradient: 80 ms on two
# devices against 98 on one, RESULTS.md); lenet5, pcqat_mnist (convs as im2col
# products) and LeNet-300-100 (0) do not.
SPLIT_SHARE = 0.1
# Fewer examples than this per device leave a core's vector units idle and
# make the all-reduce the larger cost; a batch of 48 still splits over 3.
MIN_SHARE = 16


def use_cpu_cores() -> int | None:
    """Asks XLA for one CPU device per usable core; returns that count.

    Does nothing (returns None) when ``XLA_FLAGS`` already sets the count (the
    user's choice wins) or JAX has already started its backends (the flag is
    read once, at start).
    """
    from jax._src import xla_bridge  # no public way to ask whether JAX has started

    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG in flags or xla_bridge.backends_are_initialized():
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={cores or 1}".strip()
    return cores


def splits_freely() -> bool:
    """True on one CPU host: a batch may go to fewer devices than there are."""
    return jax.default_backend() == "cpu" and jax.process_count() == 1


def batch_multiple() -> int:
    """What a batch size must be a multiple of (1 where ``training_mesh`` adapts)."""
    return 1 if splits_freely() else jax.device_count()


def _multiply_adds(jaxpr, kernel_shapes: set, totals: dict) -> dict:
    for eqn in jaxpr.eqns:
        out = eqn.outvars[0].aval.shape if eqn.outvars else ()
        if eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
            macs = math.prod(out) * rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
            # A conv whose output has a kernel's shape computes that kernel's gradient.
            kind = "weight_grad" if tuple(sorted(out)) in kernel_shapes else "other"
            totals[kind] += macs
        elif eqn.primitive.name == "dot_general":
            (contracted, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            totals["other"] += math.prod(out) * math.prod(lhs[d] for d in contracted)
        for sub in jaxprs.sub_jaxprs(eqn):
            _multiply_adds(sub, kernel_shapes, totals)
    return totals


def weight_grad_share(jaxpr, params) -> float:
    """The share of a step's multiply-adds (convolutions and products) spent in conv
    weight gradients that XLA computes as convolutions (not as ``ucpjax.conv``'s
    per-tap products)."""
    kernels = {tuple(sorted(leaf.shape)) for leaf in jax.tree.leaves(params)
               if np.ndim(leaf) == 4}
    totals = _multiply_adds(jaxpr, kernels, {"weight_grad": 0, "other": 0})
    return totals["weight_grad"] / max(totals["weight_grad"] + totals["other"], 1)


def split_count(batch_size: int, split: bool, available: int) -> int:
    """How many of ``available`` CPU devices one step's batch goes to (module doc)."""
    most = min(available, batch_size // MIN_SHARE) if split else 1
    return max(d for d in range(1, max(most, 1) + 1) if batch_size % d == 0)


def inference_mesh() -> Mesh:
    """This process's devices, which share each evaluation batch. Examples are
    independent in inference, so the split changes only which device computes
    which logits: the same logits, 10,000 test images on 2 CPU cores in 6.6 s
    instead of 12.5 on one for mobilenet_cifar, 1.30x for resnet8, 0.97-1.27x for
    the others (RESULTS.md, "Evaluations split over the cores too")."""
    return Mesh(np.asarray(jax.local_devices()), ("data",))


def training_mesh(batch_size: int, split: bool) -> Mesh:
    """The devices one training step's batch goes to: on one CPU host, several only
    if ``split`` (see the module doc); elsewhere all of them."""
    devices = jax.devices()
    if splits_freely():
        devices = devices[:split_count(batch_size, split, len(devices))]
    return Mesh(np.asarray(devices), ("data",))
