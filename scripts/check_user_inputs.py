"""Users' inputs (data shapes, dtypes, class counts) through ``ucpjax.compress``.

    .venv/bin/python scripts/check_user_inputs.py            # about 10 minutes on 2 cores
    .venv/bin/python scripts/check_user_inputs.py --only case1,case12
    .venv/bin/python scripts/check_user_inputs.py --sparsity 0.5

Where ``check_user_models.py`` varies the model, this varies the data a user
hands over with it: image sizes and channel counts, 2 to 100 classes, label
dtypes (int8, uint8, float64, a Python list, one-hot), images in float64, in
[0, 255] or without a channel axis, a jax array, tabular features, a test set of
one image, a training set smaller than a batch, classes missing from train or
test. Each case trains a small conv net written as a user writes it (Conv +
BatchNorm, a depthwise conv, a 1x1 conv, ``GlobalAveragePool``, Dense) or a
plain MLP for 20 epochs (Adam 1e-2, batch 50) on clean arrays: real MNIST / CIFAR-10
(JPEG copy) slices or synthetic data with class-dependent colours and patterns,
2,000 training and 500 test examples. The case's arrays, in the form under test,
then go to ``ucpjax.compress`` with the smoke recipe (every stage, a short
budget: this checks that the inputs go through end to end, not the accuracy
reached) and the ``.tflite`` is measured in LiteRT. A row says what the run did:
passed the final int8 check, refused before any work (with its one-line
message), or crashed (exception and last frame); a passing run whose numbers
look wrong is flagged. At the smoke recipe's 90% target this 3,000-weight conv
net falls to chance at the prune stage whatever the inputs; ``--sparsity 0.5``
keeps it well above chance, so that the accuracy columns say something. Writes
results/user_inputs.{json,md} (user_inputs_s0.5.* with ``--sparsity 0.5``) and
each case's log (compress's lines, any traceback) to runs/user_inputs[_s0.5]/<case>.log.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import time
import traceback
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ucpjax
from ucpjax import data, experiment, train
from ucpjax.config import ConfigError
from ucpjax.experiment import Experiment
from ucpjax.export import ToleranceError
from ucpjax.pooling import GlobalAveragePool

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT, LOGS = ROOT / "results", ROOT / "runs"
N_TRAIN, N_TEST = 2000, 500


class ConvNet(nn.Module):
    """Strided conv + BatchNorm, strided depthwise conv + BN, 1x1 conv + BN, GAP, Dense."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train=False):
        def bn(y):
            return nn.relu(nn.BatchNorm(use_running_average=not train)(y))
        x = bn(nn.Conv(8, (3, 3), strides=2, use_bias=False)(x))
        x = bn(nn.Conv(8, (3, 3), strides=2, feature_group_count=8, use_bias=False)(x))
        x = bn(nn.Conv(32, (1, 1), use_bias=False)(x))
        return nn.Dense(self.num_classes)(GlobalAveragePool()(x))


class Mlp(nn.Module):
    """Flatten, Dense 64, ReLU, Dense."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(64)(x.reshape((x.shape[0], -1))))
        return nn.Dense(self.num_classes)(x)


@dataclasses.dataclass
class Case:
    """Clean arrays to train the user's model on, and what the user passes to compress."""

    about: str
    module: nn.Module
    fit: tuple[np.ndarray, np.ndarray]
    train: tuple
    test: tuple
    batch_size: int = 50
    # The test labels as class ids, to recompute the dense accuracy independently.
    test_ids: np.ndarray | None = None


# ----------------------------------------------------------------------------- data


@functools.cache
def _mnist() -> data.Dataset:
    return data.load("mnist").take(N_TRAIN, N_TEST)


@functools.cache
def _cifar() -> data.Dataset:
    return data.load("cifar10").take(N_TRAIN, N_TEST)


def synthetic(n: int, shape: tuple[int, ...], classes: int, seed: int,
              template_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: per class a colour and a smooth pattern, plus pixel noise.

    Train and test share ``template_seed`` (the classes) and differ in ``seed``.
    """
    templates = np.random.default_rng(template_seed)
    *hw, c = shape
    colour = templates.uniform(0, 1, (classes, 1, 1, c))
    coarse = templates.normal(0, 1, (classes, 4, 4, c))
    reps = [-(-s // 4) for s in hw]  # ceil: upsample 4x4 to cover H x W
    pattern = np.repeat(np.repeat(coarse, reps[0], 1), reps[1], 2)[:, :hw[0], :hw[1]]
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % classes)
    x = colour[y] + 0.5 * pattern[y] + rng.normal(0, 0.5, (n, *shape))
    return x.astype(np.float32), y.astype(np.int32)


def synthetic_split(shape, classes):
    return synthetic(N_TRAIN, shape, classes, 1), synthetic(N_TEST, shape, classes, 2)


def tabular(n: int, features: int, classes: int, seed: int):
    """Gaussian class clusters in ``features`` dimensions."""
    means = np.random.default_rng(0).normal(0, 1, (classes, features))
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % classes)
    return (means[y] + rng.normal(0, 1, (n, features))).astype(np.float32), y.astype(np.int32)


# ----------------------------------------------------------------------------- cases


def _mnist_case(about: str, *, x=lambda x: x, y=lambda y: y, module=None) -> Case:
    """MNIST's conv net, the arrays given to compress transformed by ``x`` and ``y``."""
    d = _mnist()
    return Case(about, module or ConvNet(10), (d.x_train, d.y_train),
                (x(d.x_train), y(d.y_train)), (x(d.x_test), y(d.y_test)), test_ids=d.y_test)


def _synthetic_case(about: str, shape, classes: int) -> Case:
    (xt, yt), (xs, ys) = synthetic_split(shape, classes)
    return Case(about, ConvNet(classes), (xt, yt), (xt, yt), (xs, ys), test_ids=ys)


def case1():
    d = _cifar()
    return Case("CIFAR-10 (JPEG copy), standardised", ConvNet(10), (d.x_train, d.y_train),
                (d.x_train, d.y_train), (d.x_test, d.y_test), test_ids=d.y_test)


def case2():
    d = _mnist()
    crop = (d.x_train[:, :, 4:24], d.y_train)
    return Case("non-square: MNIST cropped to 28x20", ConvNet(10), crop, crop,
                (d.x_test[:, :, 4:24], d.y_test), test_ids=d.y_test)


def case3():
    return _synthetic_case("larger images, synthetic", (56, 56, 3), 10)


def case4():
    return _synthetic_case("100 classes, synthetic", (32, 32, 3), 100)


def case5():
    return _synthetic_case("2 classes, int32 labels, synthetic", (32, 32, 3), 2)


def case6():
    return _mnist_case("labels float64 holding whole numbers", y=lambda y: y.astype(np.float64))


def case7():
    return _mnist_case("labels int8", y=lambda y: y.astype(np.int8))


def case7b():
    return _mnist_case("labels uint8", y=lambda y: y.astype(np.uint8))


def case8():
    return _mnist_case("labels one-hot (N, 10)",
                       y=lambda y: np.eye(10, dtype=np.float32)[y])


def case9():
    d = _mnist()
    keep, keep_test = d.y_train < 7, d.y_test < 7
    train_set = (d.x_train[keep], d.y_train[keep])
    return Case("train/test use classes 0..6, the model has 10 logits", ConvNet(10),
                train_set, train_set, (d.x_test[keep_test], d.y_test[keep_test]),
                test_ids=d.y_test[keep_test])


def case10():
    d = _mnist()
    keep = d.y_train < 9
    train_set = (d.x_train[keep], d.y_train[keep])
    return Case("test has class 9, train only 0..8", ConvNet(10), train_set, train_set,
                (d.x_test, d.y_test), test_ids=d.y_test)


def case11():
    return _mnist_case("images float64", x=lambda x: x.astype(np.float64))


def case12():
    d = _mnist()
    big = (d.x_train * 255, d.y_train)
    return Case("images in [0, 255] float32, the model trained on them", ConvNet(10), big, big,
                (d.x_test * 255, d.y_test), test_ids=d.y_test)


def case12b():
    d = _mnist()
    return Case("images in [0, 255] float32, the model trained on [0, 1]", ConvNet(10),
                (d.x_train, d.y_train), (d.x_train * 255, d.y_train),
                (d.x_test * 255, d.y_test), test_ids=d.y_test)


def case13():
    train_set, test_set = tabular(N_TRAIN, 20, 10, 1), tabular(N_TEST, 20, 10, 2)
    return Case("tabular features (N, 20) to an MLP", Mlp(10), train_set, train_set, test_set,
                test_ids=test_set[1])


def case13b():
    (xt, yt), (xs, ys) = tabular(N_TRAIN, 20, 10, 1), tabular(N_TEST, 20, 10, 2)
    return Case("tabular features reshaped to (N, 1, 1, 20), an MLP", Mlp(10), (xt, yt),
                (xt.reshape(-1, 1, 1, 20), yt), (xs.reshape(-1, 1, 1, 20), ys), test_ids=ys)


def case13c():
    (xt, yt), (xs, ys) = tabular(N_TRAIN, 20, 10, 1), tabular(N_TEST, 20, 10, 2)
    return Case("tabular features reshaped to (N, 20, 1, 1), an MLP", Mlp(10), (xt, yt),
                (xt.reshape(-1, 20, 1, 1), yt), (xs.reshape(-1, 20, 1, 1), ys), test_ids=ys)


def case14():
    d = _mnist()
    return Case("a test set of 7 images", ConvNet(10), (d.x_train, d.y_train),
                (d.x_train, d.y_train), (d.x_test[:7], d.y_test[:7]), test_ids=d.y_test[:7])


def case14b():
    d = _mnist()
    return Case("a test set of 1 image", ConvNet(10), (d.x_train, d.y_train),
                (d.x_train, d.y_train), (d.x_test[:1], d.y_test[:1]), test_ids=d.y_test[:1])


def case15():
    d = _mnist()
    small = (d.x_train[:50], d.y_train[:50])
    return Case("a training set of 50 images (smoke batch 100)", ConvNet(10), small, small,
                (d.x_test, d.y_test), batch_size=25, test_ids=d.y_test)


def case16():
    return _mnist_case("images a jax array, labels a Python list",
                       x=jnp.asarray, y=lambda y: [int(v) for v in y])


def case17():
    return _mnist_case("MNIST as (N, 28, 28), no channel axis, to the conv net",
                       x=lambda x: x[..., 0])


class Conv1d(nn.Module):
    """1-D convs + BatchNorm over (N, L, C) sequences, stride by slicing, a global max."""

    num_classes: int = 4
    pool: bool = False  # a 1-D nn.max_pool, which TFLite has no kernel for

    @nn.compact
    def __call__(self, x, train=False):
        def bn(y):
            return nn.relu(nn.BatchNorm(use_running_average=not train)(y))
        x = bn(nn.Conv(16, (5,), use_bias=False)(x))
        x = nn.max_pool(x, (2,), strides=(2,)) if self.pool else x[:, ::2]
        x = bn(nn.Conv(16, (3,), use_bias=False)(x))
        return nn.Dense(self.num_classes)(jnp.max(x, axis=1))


def sequences(n: int, seed: int, length: int = 64):
    """A noisy sine per class (frequency 1..4 cycles per sequence), one channel."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 4)
    t = np.arange(length)
    x = np.sin(2 * np.pi * (y[:, None] + 1) * t / length) + 0.3 * rng.normal(0, 1, (n, length))
    return x[..., None].astype(np.float32), y.astype(np.int32)


def case18():
    (xt, yt), (xs, ys) = sequences(N_TRAIN, 1), sequences(N_TEST, 2)
    return Case("(N, L, C) sequences to a 1-D conv net", Conv1d(), (xt, yt), (xt, yt),
                (xs, ys), test_ids=ys)


def case19():
    (xt, yt), (xs, ys) = sequences(N_TRAIN, 1), sequences(N_TEST, 2)
    return Case("the 1-D conv net with a 1-D nn.max_pool", Conv1d(pool=True), (xt, yt),
                (xt, yt), (xs, ys), test_ids=ys)


CASES: dict[str, Callable[[], Case]] = {f.__name__: f for f in (
    case1, case2, case3, case4, case5, case6, case7, case7b, case8, case9, case10, case11,
    case12, case12b, case13, case13b, case13c, case14, case14b, case15, case16, case17,
    case18, case19)}


# ----------------------------------------------------------------------------- running


_FITTED: dict[tuple, dict] = {}


def fit(case: Case) -> dict:
    """The user's training: 20 epochs of Adam 1e-2, batch 50, on the clean arrays
    (reused across cases that train the same module on the same arrays)."""
    x, y = case.fit
    key = (repr(case.module), x.shape, float(np.asarray(x[:64]).sum()), y.tobytes())
    if key not in _FITTED:
        variables = dict(case.module.init(jax.random.key(0), x[:1]))
        config = train.TrainConfig(epochs=20, batch_size=case.batch_size, learning_rate=1e-2)
        steps = train.total_steps(config, len(x))
        state, _ = train.fit(variables["params"], train.classification_loss(case.module),
                             train.make_optimizer(config, steps), x, y, config=config, seed=0,
                             extra={k: v for k, v in variables.items() if k != "params"})
        _FITTED[key] = {"params": state.params, **state.extra}
    return _FITTED[key]


def describe(array) -> str:
    if isinstance(array, list):
        return f"list[{type(array[0]).__name__}] of {len(array)}"
    kind = "jax " if isinstance(array, jax.Array) else ""
    return f"{kind}{tuple(array.shape)} {array.dtype}"


def run_case(name: str, recipe, logs: pathlib.Path) -> dict:
    begin = time.perf_counter()
    case = CASES[name]()
    variables = fit(case)
    fitted = time.perf_counter()
    # The dense accuracy the user sees, computed apart from ucpjax's measurement.
    logits = case.module.apply(variables, jnp.asarray(case.test[0]).reshape(
        (-1, *case.fit[0].shape[1:])), train=False)
    own_accuracy = float(np.mean(np.asarray(logits).argmax(-1) == case.test_ids))
    row = {"case": name, "about": case.about, "x": describe(case.train[0]),
           "y": describe(case.train[1]), "test": describe(case.test[0]),
           "classes": f"{len(np.unique(case.fit[1]))} in train, "
                      f"{case.module.num_classes} logits",
           "own_dense_accuracy": own_accuracy, "fit_seconds": fitted - begin}
    lines: list[str] = []
    try:
        result = ucpjax.compress(case.module, variables, train=case.train, test=case.test,
                                 recipe=recipe, log=lines.append)
    except (ConfigError, ToleranceError) as err:
        outcome = f"refused ({type(err).__name__}: {err})"
        row.update(outcome=outcome)
        lines.append(outcome)
    except Exception as err:  # a crash is a finding: record it and go on
        frames = traceback.extract_tb(err.__traceback__)
        last = frames[-1]
        ours = [f for f in frames if "/ucpjax/" in f.filename]
        where = ours[-1] if ours else last
        first = (str(err).strip().splitlines() or [""])[0][:300]
        row.update(outcome=f"crashed ({type(err).__name__}: {first}) at "
                           f"{pathlib.Path(where.filename).name}:{where.lineno} {where.name}")
        lines.append(traceback.format_exc())
    else:
        final = result.report["final"]
        row.update(outcome="passed", dense_accuracy=result.report["rows"][0]["accuracy"],
                   **{k: final.get(k) for k in ("jax_accuracy", "tflite_accuracy",
                                                "tflite_agreement",
                                                "tflite_max_logit_error_steps")})
        row["flags"] = flags(row, case)
    row["seconds"] = time.perf_counter() - fitted
    (logs / f"{name}.log").write_text("\n".join(lines) + "\n")
    return row


def flags(row: dict, case: Case) -> list[str]:
    """What looks wrong in a run that passed."""
    found = []
    chance = 1 / len(np.unique(case.fit[1]))
    if abs(row["dense_accuracy"] - row["own_dense_accuracy"]) > 1e-3:
        found.append(f"compress's dense accuracy {row['dense_accuracy']:.3f} differs from the "
                     f"module's own {row['own_dense_accuracy']:.3f}")
    if row["own_dense_accuracy"] <= 1.5 * chance:
        found.append(f"dense accuracy near chance ({chance:.2f})")
    if abs(row["tflite_accuracy"] - row["jax_accuracy"]) > 0.02:
        found.append(".tflite accuracy over 2 points from JAX's")
    return found


def _accuracy(value) -> str:
    return "" if value is None else f"{value:.3f}"


def markdown(rows: list[dict], commands: list[str], label: str) -> str:
    lines = [f"# Users' inputs through ucpjax.compress ({label})", "",
             "| case | what it is | x given | y given | classes | outcome | dense (own) "
             "| dense | JAX final | .tflite | agreement | fit s | compress s | flags |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        outcome = r["outcome"].replace("|", "\\|").replace("\n", " ")
        agreement = r.get("tflite_agreement")
        lines.append(
            f"| {r['case']} | {r['about']} | {r['x']} | {r['y']} | {r['classes']} | {outcome} "
            f"| {_accuracy(r['own_dense_accuracy'])} | {_accuracy(r.get('dense_accuracy'))} "
            f"| {_accuracy(r.get('jax_accuracy'))} | {_accuracy(r.get('tflite_accuracy'))} "
            f"| {'' if agreement is None else f'{agreement:.4f}'} | {r['fit_seconds']:.0f} "
            f"| {r['seconds']:.0f} | {'; '.join(r.get('flags', []))} |")
    lines += ["", *(f"Command: `{c}`" for c in commands), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated cases (default: all)")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="prune.target_sparsity (default: the smoke recipe's)")
    args = parser.parse_args()
    only = [c for c in args.only.split(",") if c]
    unknown = sorted(set(only) - set(CASES))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: no such case; the cases are "
                     f"{', '.join(CASES)}")
    recipe, label, stem = experiment.smoke(Experiment()).recipe, "smoke recipe", "user_inputs"
    if args.sparsity is not None:
        recipe = dataclasses.replace(recipe, prune=dataclasses.replace(
            recipe.prune, target_sparsity=args.sparsity))
        label += f", prune.target_sparsity={args.sparsity:g}"
        stem += f"_s{args.sparsity:g}"
    logs = LOGS / stem
    logs.mkdir(parents=True, exist_ok=True)
    json_path, md_path = OUT / f"{stem}.json", OUT / f"{stem}.md"
    earlier = json.loads(json_path.read_text()) if json_path.exists() else {}
    command = "python scripts/check_user_inputs.py" + (
        "" if args.sparsity is None else f" --sparsity {args.sparsity:g}") + (
        f" --only {args.only}" if only else "")
    commands = [c for c in earlier.get("commands", []) if c != command] + [command]
    rows = {r["case"]: r for r in earlier.get("rows", [])}
    for name in only or CASES:
        print(f"== {name}", flush=True)
        rows[name] = run_case(name, recipe, logs)
        print(f"   {rows[name]['outcome'][:200]}", flush=True)
        ordered = [rows[c] for c in CASES if c in rows]
        json_path.write_text(json.dumps({"commands": commands, "rows": ordered}, indent=1))
        md_path.write_text(markdown(ordered, commands, label))
    print(markdown([rows[c] for c in CASES if c in rows], commands, label))


if __name__ == "__main__":
    main()
