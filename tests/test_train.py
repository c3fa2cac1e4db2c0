import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ucpjax import checkpoints, data, devices, models, train
from ucpjax.config import ConfigError

# Trains a few steps of a conv net with BatchNorm and prints the final params'
# checksum and the devices its batch would split over; then trains it again killed
# in its second epoch and resumed, and prints whether that ends on the same bits.
# Run with 1 and 4 devices.
_DEVICES_SCRIPT = """
import json, sys, tempfile
import jax, numpy as np
from ucpjax import batchnorm, checkpoints, data, devices, models, train
ds = data.load("mnist").take(512, 64)
m = models.create("depthwise_cnn")
v = models.init(m, ds.input_shape)
cfg = train.TrainConfig(epochs=2, batch_size=64)
opt = train.make_optimizer(cfg, train.total_steps(cfg, 512))
run = lambda: train.fit(v["params"], train.classification_loss(m), opt, ds.x_train,
                        ds.y_train, config=cfg, seed=0, extra={"batch_stats": v["batch_stats"]})
state, hist = run()
end_epoch = train._Progress.end_epoch
def killed(self, steps):
    if self.history:
        raise KeyboardInterrupt
    end_epoch(self, steps)
folder = tempfile.mkdtemp()
train._Progress.end_epoch = killed
try:
    with checkpoints.kept_in(folder, every_seconds=0):
        run()
except KeyboardInterrupt:
    pass
train._Progress.end_epoch = end_epoch
with checkpoints.kept_in(folder, every_seconds=0):
    resumed, _ = run()
leaves = [np.asarray(x).ravel() for x in jax.tree.leaves((state.params, state.extra))]
apply_fn = train.inference_fn(m, state.extra)
logits = train.predict(apply_fn, state.params, ds.x_test[:150], batch_size=64)  # 64, 64, 22
whole = jax.jit(apply_fn)(jax.device_put(state.params, jax.devices()[0]), ds.x_test[:150])
stats = batchnorm.population_statistics(m, v, ds.x_train)  # 2 batches of 256, split
print(json.dumps({"devices": len(jax.devices()),
                  "predict_split": devices.inference_mesh().size,
                  "predict_gap": float(np.abs(logits - np.asarray(whole)).max()),
                  "statistics": np.concatenate([np.ravel(x) for x in jax.tree.leaves(stats)]
                                               )[::5].tolist(),
                  "conv_split": devices.training_mesh(64, split=True).size,
                  "mlp_split": devices.training_mesh(64, split=False).size,
                  "params": np.concatenate(leaves)[::97].tolist(), "loss": hist[-1]["loss"],
                  "resumed_identical": all(np.array_equal(a, b) for a, b in zip(
                      jax.tree.leaves(state), jax.tree.leaves(resumed), strict=True))}))
"""


def _run_with_devices(n):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    out = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_four_devices_match_one():
    """A conv step splits its batch over the CPU devices (16 examples each at least),
    an MLP step stays on one; the split trains the same net, BatchNorm included."""
    one, four = _run_with_devices(1), _run_with_devices(4)
    assert (one["devices"], four["devices"]) == (1, 4)
    assert (four["conv_split"], four["mlp_split"], one["conv_split"]) == (4, 1, 1)
    np.testing.assert_allclose(four["params"], one["params"], rtol=1e-4, atol=1e-5)
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert one["resumed_identical"] and four["resumed_identical"]  # a split state too
    # Evaluation splits over all four (a last batch of 22 padded to 24) and gives the
    # logits of one device's call on all 150 images.
    assert (one["predict_split"], four["predict_split"]) == (1, 4)
    assert one["predict_gap"] < 1e-5 and four["predict_gap"] < 1e-5
    # BatchNorm's re-estimation splits its batches too: the same statistics.
    np.testing.assert_allclose(four["statistics"], one["statistics"], rtol=1e-5, atol=1e-6)


def test_a_batch_splits_over_the_devices_that_divide_it():
    """On one CPU host any batch size trains: it goes to as many devices as divide it,
    with at least 16 examples each; a step without convolutions takes one device."""
    sizes = {b: devices.split_count(b, True, 8) for b in (48, 50, 128, 8, 37)}
    assert sizes == {48: 3, 50: 2, 128: 8, 8: 1, 37: 1}
    assert devices.split_count(128, False, 8) == 1
    assert devices.batch_multiple() == 1


def test_use_cpu_cores_gives_one_device_per_core_before_jax_starts():
    script = ("import os; from ucpjax import devices; n = devices.use_cpu_cores(); "
              "import jax; print(n, len(jax.devices()), len(os.sched_getaffinity(0)))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    asked, devices_seen, cores = map(int, out[-3:])
    assert asked == devices_seen == cores


def test_use_cpu_cores_leaves_a_chosen_count_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    assert devices.use_cpu_cores() is None
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"


def _setup(mnist_small, epochs=1.0):
    m = models.create("lenet300")
    v = models.init(m, mnist_small.input_shape)
    cfg = train.TrainConfig(epochs=epochs, batch_size=100)
    opt = train.make_optimizer(cfg, train.total_steps(cfg, len(mnist_small.x_train)))
    return m, v, cfg, opt


def test_one_step_lowers_the_loss(mnist_small):
    m, v, cfg, opt = _setup(mnist_small)
    loss_fn = train.classification_loss(m)
    step = train.make_train_step(loss_fn, opt)
    state = train.TrainState(jnp.zeros((), jnp.int32), v["params"], {}, opt.init(v["params"]))
    x, y = mnist_small.x_train[:100], mnist_small.y_train[:100]
    before = loss_fn(v["params"], {}, x, y, None)[0]
    state, _ = step(state, x, y, jax.random.key(0))
    after = loss_fn(state.params, {}, x, y, None)[0]
    assert after < before


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_weight_decay_on_kernels_leaves_batchnorm_and_biases_alone(optimizer):
    m = models.create("depthwise_cnn")
    # Ones, not the initial values: decay cannot move a zero-initialised bias.
    params = jax.tree.map(jnp.ones_like, models.init(m, (28, 28, 1))["params"])
    zero_grads = jax.tree.map(jnp.zeros_like, params)

    def moved(weight_decay_on):
        cfg = train.TrainConfig(optimizer=optimizer, learning_rate=1.0, weight_decay=0.1,
                                weight_decay_on=weight_decay_on, schedule="constant")
        opt = train.make_optimizer(cfg, 10)
        updates, _ = opt.update(zero_grads, opt.init(params), params)
        return {jax.tree_util.keystr(path): bool(jnp.any(u != 0)) for path, u
                in jax.tree_util.tree_leaves_with_path(updates)}

    everywhere, kernels = moved(None), moved("kernels")
    assert all(everywhere.values())
    assert kernels == {k: "kernel" in k for k in kernels}
    assert any("scale" in k for k in kernels) and any("kernel" in k for k in kernels)


def test_weight_decay_on_takes_only_kernels():
    with pytest.raises(ConfigError, match="weight_decay_on"):
        train.TrainConfig(weight_decay_on="norms")


def test_predict_compiles_a_function_once_however_often_called():
    traces = []

    def apply_fn(params, x):
        traces.append(x.shape)
        return x.reshape(len(x), -1) @ params

    w, x = jnp.ones((4, 3)), np.ones((10, 2, 2), np.float32)
    for _ in range(3):
        np.testing.assert_allclose(train.predict(apply_fn, w, x, batch_size=5), 4.0)
    assert len(traces) == 1

    class Unhashable:  # a callable that does not hash is still evaluated, per call
        __hash__ = None

        def __call__(self, params, x):
            return apply_fn(params, x)
    np.testing.assert_allclose(train.predict(Unhashable(), w, x), 4.0)


def test_same_seed_same_result_and_training_learns(mnist_small):
    m, v, cfg, opt = _setup(mnist_small, epochs=3)
    a, _ = train.fit(v["params"], train.classification_loss(m), opt, mnist_small.x_train,
                     mnist_small.y_train, config=cfg, seed=5)
    b, _ = train.fit(v["params"], train.classification_loss(m), opt, mnist_small.x_train,
                     mnist_small.y_train, config=cfg, seed=5)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(x, y)
    acc = train.accuracy(train.inference_fn(m, {}), a.params, mnist_small.x_test,
                         mnist_small.y_test)
    assert acc > 0.8


@pytest.mark.parametrize("window_bytes", [None, 1])
def test_windows_train_as_one_step_at_a_time(mnist_small, monkeypatch, window_bytes):
    """fit's scanned windows (a padded last one; or one step each when a window's
    bytes are capped) end where make_train_step's loop over the same batches does."""
    if window_bytes is not None:
        monkeypatch.setattr(train, "_WINDOW_BYTES", window_bytes)
    m, v, cfg, opt = _setup(mnist_small, epochs=1.3)  # 20 steps an epoch, 26 in all
    loss_fn = train.classification_loss(m)
    fitted, _ = train.fit(v["params"], loss_fn, opt, mnist_small.x_train,
                          mnist_small.y_train, config=cfg, seed=3)
    step = train.make_train_step(loss_fn, opt)
    state = train.TrainState(jnp.zeros((), jnp.int32), v["params"], {}, opt.init(v["params"]))
    for epoch in range(2):
        batches = data.batches(mnist_small.x_train, mnist_small.y_train, cfg.batch_size,
                               seed=3 * 100_003 + epoch)
        for xb, yb in list(batches)[:20 if epoch == 0 else 6]:
            state, _ = step(state, xb, yb, jax.random.key(3))
    assert int(fitted.step) == int(state.step) == 26
    for a, b in zip(jax.tree.leaves(fitted.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_nan_loss_is_caught(mnist_small):
    m, v, cfg, opt = _setup(mnist_small, epochs=0.1)

    def nan_loss(params, extra, x, y, key):
        loss, aux = train.classification_loss(m)(params, extra, x, y, key)
        return loss * jnp.nan, aux

    with pytest.raises(FloatingPointError, match="non-finite"):
        train.fit(v["params"], nan_loss, opt, mnist_small.x_train, mnist_small.y_train,
                  config=cfg, seed=0)


def test_batch_size_must_divide_over_accelerators_or_hosts(mnist_small, monkeypatch):
    m, v, _, opt = _setup(mnist_small)
    monkeypatch.setattr(jax, "devices", lambda: [jax.local_devices()[0]] * 3)
    monkeypatch.setattr(devices, "splits_freely", lambda: False)  # not one CPU host
    with pytest.raises(ConfigError, match="not a multiple of the 3 JAX devices"):
        train.fit(v["params"], train.classification_loss(m), opt, mnist_small.x_train,
                  mnist_small.y_train, config=train.TrainConfig(batch_size=100), seed=0)


def test_checkpoint_restores_params_and_optimizer_state_exactly(tmp_path, mnist_small):
    m, v, cfg, opt = _setup(mnist_small, epochs=0.2)
    state, _ = train.fit(v["params"], train.classification_loss(m), opt, mnist_small.x_train,
                         mnist_small.y_train, config=cfg, seed=0)
    checkpoints.save(tmp_path / "ckpt", state)
    restored = checkpoints.restore(tmp_path / "ckpt", state)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_killed_training_resumes_from_its_last_epoch_bit_identical(tmp_path, mnist_small,
                                                                     monkeypatch):
    m, v, cfg, opt = _setup(mnist_small, epochs=3)

    def run(seed=0):
        return train.fit(v["params"], train.classification_loss(m), opt, mnist_small.x_train,
                         mnist_small.y_train, config=cfg, seed=seed)

    whole, history = run()
    ended, end_epoch = [], train._Progress.end_epoch

    def killed_in_the_third_epoch(self, steps):
        ended.append(steps)
        if len(ended) == 3:
            raise KeyboardInterrupt
        end_epoch(self, steps)

    monkeypatch.setattr(train._Progress, "end_epoch", killed_in_the_third_epoch)
    with checkpoints.kept_in(tmp_path, every_seconds=0), pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.undo()
    saved = json.loads((tmp_path / "01_train.json").read_text())
    assert saved["progress"]["epoch"] == 2 and len(saved["progress"]["history"]) == 2
    assert [p.name for p in (tmp_path / "01_train").iterdir()] == ["state_2"]  # older gone

    with checkpoints.kept_in(tmp_path, every_seconds=0) as clock:
        resumed, resumed_history = run()
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed_history == history
    # The run's time counts the killed process's, up to the point it went on from.
    assert clock.earlier == saved["seconds"] > 0
    assert clock.seconds() > saved["seconds"]
    # A training whose last epoch was saved restores it and trains no more.
    with checkpoints.kept_in(tmp_path, every_seconds=0):
        again, again_history = run()
    assert again_history == history and int(again.step) == int(whole.step)

    # Another seed does not take the saved state: it trains from its first step.
    with checkpoints.kept_in(tmp_path, every_seconds=0):
        other, _ = run(seed=1)
    fresh, _ = run(seed=1)
    for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_damaged_resume_point_is_passed_over(tmp_path):
    point = checkpoints.ResumePoint(tmp_path / "01_train", {"desc": "train"}, 0.0)
    index = tmp_path / "01_train.json"
    index.write_text('{"fingerprint": {"desc": "train"}, "state": "state_1", "progress": {}}')
    assert point.load({"w": np.zeros(3)}) is None  # its state folder is gone
    index.write_text("{truncated")
    assert point.load({"w": np.zeros(3)}) is None


@pytest.mark.parametrize("value", ["soon", "-5", "nan"])
def test_a_bad_resume_interval_is_named(tmp_path, monkeypatch, value):
    monkeypatch.setenv("UCPJAX_RESUME_EVERY", value)
    with pytest.raises(ConfigError, match="UCPJAX_RESUME_EVERY"), checkpoints.kept_in(tmp_path):
        pass


def test_batchnorm_statistics_are_trained():
    m = models.create("fashion_cnn")
    v = models.init(m, (28, 28, 1))
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 28, 28, 1), np.float32), rng.integers(0, 10, 64)
    cfg = train.TrainConfig(epochs=1, batch_size=32)
    state, _ = train.fit(v["params"], train.classification_loss(m),
                         train.make_optimizer(cfg, 2), x, y, config=cfg, seed=0,
                         extra={"batch_stats": v["batch_stats"]})
    mean = state.extra["batch_stats"]["BatchNorm_0"]["mean"]
    assert float(jnp.abs(mean).max()) > 0


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_a_step_with_convolutions_runs_outside_a_loop_on_cpu(mnist_small, monkeypatch, backend):
    """XLA on CPU runs a conv in a loop body many times slower: steps with XLA convs
    go one per call there; an MLP's steps, lenet5's (both its convs are im2col
    products, ``ucpjax.conv``), and every model's on a GPU, go in windows."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    x, y = mnist_small.x_train[:8], mnist_small.y_train[:8]
    conv_window = 1 if backend == "cpu" else train._WINDOW
    for name, expected in (("fashion_cnn", conv_window), ("lenet5", train._WINDOW),
                           ("lenet300", train._WINDOW)):
        m = models.create(name)
        v = models.init(m, x.shape[1:], 0)
        cfg = train.TrainConfig(epochs=1, batch_size=8)
        opt = train.make_optimizer(cfg, 10)
        extra = {k: value for k, value in v.items() if k != "params"}  # BatchNorm's
        state = train.TrainState(jnp.zeros((), jnp.int32), v["params"], extra,
                                 opt.init(v["params"]))
        step = train._train_step(train.classification_loss(m), opt, "none")
        has_conv, _ = train.step_convs(step, state, x, y, jax.random.key(0))
        # Off CPU, fast_convs leaves every conv to XLA.
        assert has_conv == (name == "fashion_cnn" or (name == "lenet5" and backend == "gpu"))
        assert train.window_steps(has_conv, 1000) == expected


def test_a_split_loop_reading_ahead_still_stops_at_a_nan_window():
    """Where the batch is split, fit reads a window's metrics one window late; a NaN
    window still stops the run (at the next window), and the epoch's means are whole."""
    log = train._Progress(num_steps=4, num_classes=10, desc="prune", lag=True)
    log.add({"loss": np.array([0.5, 0.7])}, 2)
    log.add({"loss": np.array([0.3, 0.5])}, 2)  # reads the first window
    assert log.done == 2
    log.end_epoch(4)
    log.close()
    assert log.history == [{"loss": pytest.approx(0.5)}]
    log = train._Progress(num_steps=4, num_classes=10, desc="prune", lag=True)
    log.add({"loss": np.array([np.nan])}, 1)
    with pytest.raises(train.DivergenceError, match="prune: non-finite metrics"):
        log.add({"loss": np.array([0.5])}, 1)


@pytest.mark.parametrize("name, shape, splits", [
    ("depthwise_cnn", (28, 28, 1), True), ("resnet8", (32, 32, 3), True),
    ("lenet300", (28, 28, 1), False), ("pcqat_mnist", (28, 28, 1), False)])
def test_the_split_rule_reads_the_step(name, shape, splits):
    """A step splits where XLA's own conv weight gradients are a large share of its
    multiply-adds (the depthwise net's 1x1 convs; resnet8's stride-1 convs, 0.198 of
    its step on CIFAR-10, which measured faster split); not an MLP, nor a net whose
    weight gradients ``ucpjax.conv`` computes as products (pcqat_mnist: one input
    channel). The share depends on shapes only, so the batch is zeros."""
    m = models.create(name)
    v = models.init(m, shape, 0)
    opt = train.make_optimizer(train.TrainConfig(epochs=1, batch_size=32), 10)
    extra = {k: c for k, c in v.items() if k != "params"}
    state = train.TrainState(jnp.zeros((), jnp.int32), v["params"], extra,
                             opt.init(v["params"]))
    step = train._train_step(train.classification_loss(m), opt, "none")
    x, y = jnp.zeros((32, *shape)), jnp.zeros(32, jnp.int32)
    _, share = train.step_convs(step, state, x, y, jax.random.key(0))
    assert (share >= devices.SPLIT_SHARE) == splits
    assert 0.0 <= share < 1.0
