"""Data-parallel training: one jitted step, the batch sharded over every JAX device.

A loss function has the signature ``loss_fn(params, extra, x, y, key) ->
(loss, (extra, metrics))``. ``extra`` is state that changes during training
but is not trained by gradients (BatchNorm statistics, activation ranges of
quantization-aware training); stages swap the loss (distillation, QAT) and the
optimizer (pruning masks, centroid training) and reuse everything else.

One code path serves one device, N local devices and N hosts: the mesh
(``devices.training_mesh``) spans the devices that share the batch, parameters
are replicated and each process feeds its share of every global batch. On
several hosts call ``jax.distributed.initialize()`` first (see README).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from ucpjax import checkpoints, compile_cache, devices, jaxprs
from ucpjax import data as data_lib
from ucpjax.config import check
from ucpjax.conv import depthwise_only, fast_convs

LossFn = Callable[..., tuple[jax.Array, tuple[Any, dict]]]
ApplyFn = Callable[[Any, jax.Array], jax.Array]


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    extra: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How long and how fast to train. Used by dense training and every stage."""

    epochs: float = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    optimizer: str = "adam"  # "adam" or "sgd" (Nesterov momentum 0.9)
    weight_decay: float = 0.0
    # None: every parameter decays; "kernels": only those of two or more dimensions
    # (conv and dense kernels), not BatchNorm's scale and offset nor biases, whose
    # decay can silence a small net's channels for good (resnet8's stem lost 4 of 16).
    weight_decay_on: str | None = None
    schedule: str = "cosine"  # "cosine" or "constant"
    # "shift": random translation by up to 2 pixels (digits); "crop_flip": 4-pixel
    # padded random crop and horizontal flip (natural images); "none".
    augment: str = "none"

    def __post_init__(self):
        # Finite numbers first: nan fails every comparison below with a misleading
        # requirement, and inf epochs would train forever. A large learning rate
        # is allowed: ``fit`` stops a run that diverges, naming the stage.
        for name in ("epochs", "learning_rate", "weight_decay"):
            value = getattr(self, name)
            check(isinstance(value, (int, float, np.integer, np.floating))
                  and not isinstance(value, bool) and math.isfinite(value),
                  name, value, "must be a finite number")
        check(isinstance(self.batch_size, (int, np.integer)) and not isinstance(
            self.batch_size, bool), "batch_size", self.batch_size, "must be an integer")
        check(self.epochs > 0, "epochs", self.epochs, "must be > 0")
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        check(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be > 0")
        check(self.optimizer in ("adam", "sgd"), "optimizer", self.optimizer, "adam or sgd")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.weight_decay_on in (None, "kernels"), "weight_decay_on",
              self.weight_decay_on, "None (every parameter) or 'kernels'")
        check(self.schedule in ("cosine", "constant"), "schedule", self.schedule,
              "cosine or constant")
        check(self.augment in AUGMENTATIONS, "augment", self.augment, f"one of {AUGMENTATIONS}")


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return max(num_examples // batch_size, 1)


def total_steps(config: TrainConfig, num_examples: int) -> int:
    return max(math.ceil(config.epochs * steps_per_epoch(num_examples, config.batch_size)), 1)


def make_optimizer(config: TrainConfig, num_steps: int,
                   kernels=None) -> optax.GradientTransformation:
    """The base optimizer of ``config``; stages chain their transforms after it.

    ``kernels``: for ``weight_decay_on="kernels"``, a bool pytree like the trained
    tree marking what decays (a trained tree of centroids is not shaped like the
    kernels it encodes: see ``constraints.kernel_mask``); default ``kernel_leaves``.
    """
    if config.schedule == "cosine":
        lr = optax.cosine_decay_schedule(config.learning_rate, num_steps)
    else:
        lr = config.learning_rate
    decayed = None
    if config.weight_decay_on == "kernels":
        decayed = kernel_leaves if kernels is None else kernels
    if config.optimizer == "adam":
        return optax.adamw(lr, weight_decay=config.weight_decay, mask=decayed)
    return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decayed),
                       optax.sgd(lr, momentum=0.9, nesterov=True))


def kernel_leaves(params):
    """True for the leaves of two or more dimensions: the weights weight decay means."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def classification_loss(model, *, train: bool = True) -> LossFn:
    """Cross-entropy of a Flax model; ``extra`` holds its non-param collections."""
    def loss_fn(params, extra, x, y, key):
        logits, extra = apply_model(model, params, extra, x, train=train, key=key)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (extra, {"loss": loss, "accuracy": jnp.mean(logits.argmax(-1) == y)})
    return loss_fn


def apply_model(model, params, extra, x, *, train: bool, key=None):
    """Runs a Flax model; in training mode its mutable collections are updated."""
    variables = {"params": params, **extra}
    rngs = {"dropout": key} if key is not None else {}
    if train and extra:
        logits, extra = model.apply(variables, x, train=True, rngs=rngs, mutable=list(extra))
        return logits, dict(extra)
    return model.apply(variables, x, train=train, rngs=rngs), extra


def _shard_windows(m: Mesh, *arrays: np.ndarray):
    """Arrays of shape ``(steps, batch, ...)``, the batch axis sharded: each process
    contributes its contiguous share of every global batch."""
    sharding = NamedSharding(m, PartitionSpec(None, "data"))
    n, i = jax.process_count(), jax.process_index()
    out = []
    for a in arrays:
        share = a.shape[1] // n
        out.append(jax.make_array_from_process_local_data(
            sharding, a[:, i * share:(i + 1) * share]))
    return out


AUGMENTATIONS = ("none", "shift", "crop_flip")


def _augment(x: jax.Array, key: jax.Array, mode: str) -> jax.Array:
    """Per-example random translation (``shift``) or crop and flip (``crop_flip``)."""
    pad, flip, fill = {"shift": (2, False, "constant"), "crop_flip": (4, True, "reflect")}[mode]

    def one(image, k):
        k_crop, k_flip = jax.random.split(k)
        h, w, c = image.shape
        padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode=fill)
        dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * pad + 1)
        image = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
        return jnp.where(flip & jax.random.bernoulli(k_flip), image[:, ::-1], image)
    return jax.vmap(one)(x, jax.random.split(key, x.shape[0]))


def _train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, augment: str):
    """``step(state, x, y, key) -> (state, metrics)``, not jitted."""
    def step(state: TrainState, x, y, key):
        key = jax.random.fold_in(key, state.step)
        if augment != "none":
            key, k_aug = jax.random.split(key)
            x = _augment(x, k_aug, augment)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        with fast_convs():  # XLA's CPU conv gradients are slow; see ucpjax.conv
            (_, (extra, metrics)), grads = grad_fn(state.params, state.extra, x, y, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, extra, opt_state), metrics
    return step


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    augment: str = "none"):
    """A jitted ``step(state, x, y, key) -> (state, metrics)``."""
    return jax.jit(_train_step(loss_fn, optimizer, augment))


# Steps per jitted call (``make_train_window``); metrics come back from the
# device once per window, so the checks below cost one sync per window. Fewer
# steps when a window's batches would pass _WINDOW_BYTES (large images).
_WINDOW = 50
_WINDOW_BYTES = 256 << 20


def step_convs(step_fn, state, x, y, key) -> tuple[bool, float]:
    """Whether ``step_fn`` traced on these arguments holds a convolution, and the
    share of its multiply-adds in XLA-computed conv weight gradients
    (``devices.weight_grad_share``)."""
    jaxpr = jax.make_jaxpr(step_fn)(state, x, y, key).jaxpr
    return jaxprs.has_conv(jaxpr), devices.weight_grad_share(jaxpr, state.params)


def window_steps(has_conv: bool, batch_bytes: int) -> int:
    """Steps per jitted call: ``_WINDOW``, fewer for large batches, 1 for a step
    with convolutions on CPU. XLA on CPU runs a convolution inside a loop body
    far slower than at top level (one step of cifar_cnn: 3.1 s in ``lax.scan``,
    0.11 s alone; lenet5 5.5x, fashion_cnn 8x), while an MLP gains from the loop.
    Convs that ``ucpjax.conv`` computes as im2col products are no conv ops, so a step
    with only those (pcqat_mnist's, lenet5's) goes in windows.
    Elsewhere (a GPU) conv steps go in windows too: one host round trip per window."""
    if has_conv and jax.default_backend() == "cpu":
        return 1
    return max(1, min(_WINDOW, _WINDOW_BYTES // max(batch_bytes, 1)))


def make_train_window(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                      augment: str = "none", steps: int = _WINDOW):
    """A jitted ``window(state, xs, ys, active, key) -> (state, metrics)``.

    Runs ``len(xs)`` steps in one call (``lax.scan`` over the leading axis of
    ``xs``, ``ys``): one dispatch and one host-device sync per window instead of
    per step, which on CPU is a quarter of a small model's epoch. A step whose
    ``active`` flag is False leaves the state as it is and reports zeros, so an
    epoch's last, shorter window runs padded and one compile serves them all.
    Each step is ``make_train_step``'s, with the same key: the same training up
    to float rounding (XLA may fuse the scanned step differently; bit-identical
    on LeNet-300-100 and pcqat_mnist, within 1e-4 after one Adam step of a
    BatchNorm + depthwise net).
    """
    step = _train_step(loss_fn, optimizer, augment)
    if steps == 1:  # no loop at all (see window_steps); ``active`` is then always True
        def single(state: TrainState, xs, ys, active, key):
            del active
            state, metrics = step(state, xs[0], ys[0], key)
            return state, jax.tree.map(lambda m: m[None], metrics)
        return jax.jit(single)

    def window(state: TrainState, xs, ys, active, key):
        shapes = jax.eval_shape(step, state, xs[0], ys[0], key)[1]
        idle = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(state, batch):
            x, y, on = batch
            return jax.lax.cond(on, lambda s: step(s, x, y, key), lambda s: (s, idle), state)
        return jax.lax.scan(body, state, (xs, ys, active))
    return jax.jit(window)


class DivergenceError(FloatingPointError):
    """Training diverged or learned nothing; the message names the stage."""


# A window whose mean loss exceeds this multiple of the reference loss has
# diverged. The reference is max(first step's loss, log(num_classes)): log(K)
# is the loss of a uniform guess, a floor that keeps a fine-tuning run that
# starts near zero and fluctuates (0.01 -> 0.3) from tripping the check, while
# a too-high learning rate drives the loss to 1e3 and beyond.
_DIVERGENCE_FACTOR = 10.0
# A window that starts past this fraction of a stage's steps and has training
# accuracy at or below chance (1 / num_classes) means the run learned nothing
# (judging only such windows leaves slow starts on hard data alone) ...
_CHANCE_AFTER = 0.5
# ... provided the window holds this many steps: a mean over a few batches of a
# short smoke run is too noisy to judge.
_CHANCE_MIN_STEPS = 20


def _check_progress(means: dict, first_loss: float, step: int, window: int,
                    num_steps: int, num_classes: int, desc: str) -> None:
    """Raises DivergenceError if a window's mean metrics show divergence."""
    fix = "lower the learning rate of this stage"
    if not all(math.isfinite(v) for v in means.values()):
        shown = ", ".join(f"{k} {v:.4g}" for k, v in means.items())
        raise DivergenceError(f"{desc}: non-finite metrics ({shown}) at step {step} of "
                              f"{num_steps}; {fix}")
    loss = means.get("loss")
    # A first loss that is NaN (no "loss" metric) leaves only the floor.
    reference = max(first_loss if math.isfinite(first_loss) else 0.0,
                    math.log(num_classes) if num_classes >= 2 else 0.0)
    if loss is not None and reference > 0 and loss > _DIVERGENCE_FACTOR * reference:
        raise DivergenceError(f"{desc}: training diverged (loss {first_loss:.3g} -> "
                              f"{loss:.3g} at step {step} of {num_steps}); {fix}")
    acc = means.get("accuracy")
    if (acc is not None and num_classes >= 2 and window >= _CHANCE_MIN_STEPS
            and step - window >= _CHANCE_AFTER * num_steps
            and acc <= 1 / num_classes + 1e-6):  # float32 means of 1/K land either side
        raise DivergenceError(
            f"{desc}: training stuck at chance (accuracy {acc:.3f} <= 1/{num_classes} in "
            f"steps {step - window + 1}-{step} of {num_steps}); {fix}")


def fit(
    params, loss_fn: LossFn, optimizer: optax.GradientTransformation,
    x: np.ndarray, y: np.ndarray, *, config: TrainConfig, seed: int, extra=None,
    desc: str = "train",
) -> tuple[TrainState, list[dict]]:
    """Trains for ``config.epochs`` (fractions allowed) and returns the final state.

    Steps run in windows of ``_WINDOW`` (one jitted call each, fewer steps for
    large inputs), each within one epoch. After every window its mean metrics
    are checked: a NaN/Inf metric, a mean loss above ``_DIVERGENCE_FACTOR``
    times the reference (see that constant), or, in a window past
    ``_CHANCE_AFTER`` of the steps, training accuracy at or below chance stops
    the run. Inside ``checkpoints.kept_in`` it keeps resume points at epoch ends
    and, run again, goes on from the last one with the same result.

    Args:
      params: initial trainable pytree.
      loss_fn: see the module docstring.
      optimizer: a full optax chain (see ``make_optimizer``).
      x, y: training data, numpy; ``y`` holds class ids 0..K-1.
      config: epochs and batch size (the rest is already in ``optimizer``).
      seed: fixes shuffling, dropout and augmentation.
      extra: initial non-trained state (``{}`` when None).
      desc: the stage's name, for the progress bar and errors.

    Returns:
      ``(state, history)``; history has one dict of mean metrics per epoch.

    Raises:
      ConfigError: ``batch_size`` larger than the training set, or not a multiple
        of the devices.
      DivergenceError: (a FloatingPointError) the run diverged, as above.
    """
    check(config.batch_size <= len(x), "batch_size", config.batch_size,
          f"larger than the {len(x)} training examples; use a batch size <= {len(x)}")
    state = TrainState(jnp.zeros((), jnp.int32), params, {} if extra is None else extra,
                       optimizer.init(params))
    key = jax.random.key(seed)
    step = _train_step(loss_fn, optimizer, config.augment)
    has_conv, share = step_convs(step, state, x[:config.batch_size], y[:config.batch_size], key)
    m = devices.training_mesh(config.batch_size, split=share >= devices.SPLIT_SHARE)
    check(config.batch_size % m.size == 0, "batch_size", config.batch_size,
          f"not a multiple of the {m.size} JAX devices that share each batch")
    num_steps, per_epoch = total_steps(config, len(x)), steps_per_epoch(len(x), config.batch_size)
    num_classes = int(np.max(y)) + 1 if np.issubdtype(np.asarray(y).dtype, np.integer) else 0
    log = _Progress(num_steps, num_classes, desc, lag=m.size > 1)
    resume = checkpoints.for_fit(desc, {"seed": seed, "steps": num_steps,
                                        "batch_size": config.batch_size})
    state = jax.device_put(state, NamedSharding(m, PartitionSpec()))
    state, start = _resumed(resume, state, log)
    steps_per_call = window_steps(has_conv, config.batch_size * (x[:1].nbytes + y[:1].nbytes))
    window = make_train_window(loss_fn, optimizer, config.augment, steps_per_call)
    for epoch in range(start, math.ceil(num_steps / per_epoch)):
        order = data_lib.epoch_order(len(x), seed * 100_003 + epoch)
        steps = min(per_epoch, num_steps - log.done)  # every window of an epoch is taken
        for first in range(0, steps, steps_per_call):
            count = min(steps_per_call, steps - first)
            idx = _padded(order[first * config.batch_size:][:count * config.batch_size]
                          .reshape(count, config.batch_size), steps_per_call)
            state, metrics = window(state, *_shard_windows(m, x[idx], y[idx]),
                                    np.arange(steps_per_call) < count, key)
            log.add(metrics, count)
        log.end_epoch(steps)
        if resume is not None:
            resume.save_if_due(state, {"epoch": epoch + 1, **log.progress()})
    log.close()
    if devices.splits_freely():  # the next stage may split over other CPU devices
        state = jax.device_get(state)  # host arrays go to any of them
    return state, log.history


def _resumed(resume: checkpoints.ResumePoint | None, state: TrainState,
             log: _Progress) -> tuple[TrainState, int]:
    """The state and first epoch to train from: a resume point's if it has one."""
    saved = resume.load(state) if resume is not None else None
    if saved is None:
        return state, 0
    state, progress = saved
    log.restore(progress)
    tqdm.write(f"{log.desc}: resumed after epoch {progress['epoch']} (step {log.done})")
    return state, progress["epoch"]


class _Progress:
    """Per-window metrics of ``fit``: checked, summed per epoch, shown in a progress bar.

    With ``lag``, a window's metrics are read from the device when the next
    window has been dispatched, so the host prepares and sends the next batches
    while the devices compute, and a divergence is caught one window later. That
    pays where the batch is split over CPU devices (cifar_cnn, half an epoch in
    three alternating runs: 26-37 s -> 22-26 s; RESULTS.md). On one device XLA's
    threads already keep the cores busy and no gain showed (cifar_cnn 69 vs 72 s),
    so there the check stays immediate.
    """

    def __init__(self, num_steps: int, num_classes: int, desc: str, lag: bool):
        self.num_steps, self.num_classes, self.desc, self.lag = num_steps, num_classes, desc, lag
        self.done, self.first_loss = 0, math.nan
        self.pending, self.sums, self.history = [], {}, []
        self.bar = tqdm(total=num_steps, desc=desc, unit="step", mininterval=1.0, leave=False)

    def add(self, metrics, count: int) -> None:
        self.pending.append((metrics, count))
        if len(self.pending) > self.lag:
            self._take(*self.pending.pop(0))

    def end_epoch(self, steps: int) -> None:
        while self.pending:
            self._take(*self.pending.pop(0))
        self.history.append({k: v / steps for k, v in self.sums.items()})
        self.sums = {}
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in self.history[-1].items()})

    def close(self) -> None:
        self.bar.close()

    def progress(self) -> dict:
        """What a resume point keeps to go on where this left off."""
        return {"done": self.done, "first_loss": self.first_loss, "history": self.history}

    def restore(self, progress: dict) -> None:
        self.done, self.first_loss = progress["done"], progress["first_loss"]
        self.history = list(progress["history"])
        self.bar.update(self.done)

    def _take(self, metrics, count: int) -> None:
        metrics = {k: np.asarray(v, np.float64)[:count]  # the one sync per window
                   for k, v in jax.device_get(metrics).items()}
        if self.done == 0 and "loss" in metrics:
            self.first_loss = float(metrics["loss"][0])  # loss of the model as given
        self.done += count
        self.bar.update(count)
        means = {k: float(v.mean()) for k, v in metrics.items()}
        try:
            _check_progress(means, self.first_loss, self.done, count, self.num_steps,
                            self.num_classes, self.desc)
        except DivergenceError:
            self.bar.close()
            raise
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.sum())


def _padded(idx: np.ndarray, steps: int) -> np.ndarray:
    """``(steps, batch)`` indices padded to ``steps`` (with example 0; the padding
    steps are inactive and change nothing)."""
    return np.concatenate([idx, np.zeros((steps - len(idx), idx.shape[1]), idx.dtype)])


def predict(apply_fn: ApplyFn, params, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Logits of ``apply_fn(params, x)`` for all of ``x``, in batches, each split over
    this process's devices (``devices.inference_mesh``)."""
    mesh = devices.inference_mesh()
    fn = _forward_of(apply_fn)
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    out = []
    for start in range(0, len(x), batch_size):
        batch = np.asarray(x[start:start + batch_size])
        size = len(batch)
        # Rows of zeros make the batch divide among the devices; their logits are dropped.
        batch = np.pad(batch, [(0, -size % mesh.size)] + [(0, 0)] * (batch.ndim - 1))
        out.append(np.asarray(fn(params, jax.device_put(batch, rows)))[:size])
    return np.concatenate(out)


def _forward(apply_fn: ApplyFn, params, x):
    with fast_convs(depthwise_only):  # XLA's forward is slow on depthwise convs only
        return apply_fn(params, x)


_forward_of = compile_cache.per_first_argument(_forward)


def accuracy(apply_fn: ApplyFn, params, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    return float(np.mean(predict(apply_fn, params, x).argmax(-1) == y))


def inference_fn(model, extra) -> ApplyFn:
    """``apply_fn(params, x)`` of a Flax model in inference mode, ``extra`` fixed."""
    return lambda params, x: model.apply({"params": params, **extra}, x, train=False)
