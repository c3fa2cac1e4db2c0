"""TensorFlow Model Optimization PCQAT baseline: prune -> cluster -> cluster-preserving QAT.

Runs inside the separate environment made by setup_tf_env.sh (never the project's .venv):

    .venv-tf/bin/python scripts/bench_baselines/tf_pcqat.py --data /tmp/mnist.npz \
        --model pcqat_mnist --sparsity 0.9 --clusters 16 --epochs-train 2 \
        --epochs-prune 2 --epochs-cluster 2 --epochs-qat 2 --batch-size 128 --seed 0 \
        --out runs/tf_pcqat

The recipe follows TFMOT's "Sparsity and cluster preserving quantization aware training
(PCQAT)" tutorial: train a float baseline; `prune_low_magnitude` with `PolynomialDecay`
(initial 0.5 as the tutorial, final --sparsity) and `UpdatePruningStep`, `strip_pruning`;
`cluster_weights(preserve_sparsity=True, KMEANS_PLUS_PLUS)` (LINEAR on layers
with too few non-zero weights for kmeans++), fine-tune, `strip_clustering`;
`quantize_annotate_model` + `quantize_apply(Default8BitClusterPreserveQuantizeScheme(
preserve_sparsity=True))`, fine-tune; convert to a full-integer .tflite (int8 in/out) and
evaluate it with ai_edge_litert on the full test set. Writes DIR/tf_pcqat.json and
DIR/model.tflite.
"""

import os

# Must be set before TensorFlow is imported: tfmot 0.8 needs Keras 2 (tf_keras).
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import io
import json
import math
import resource
import sys
import tempfile
import time
import zipfile

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras
from ai_edge_litert.interpreter import Interpreter

# Initial sparsity of the polynomial schedule, as in TFMOT's pruning tutorials.
INITIAL_SPARSITY = 0.5
# TFLite ops whose input 1 is a weight kernel.
KERNEL_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D")


def parse_args(argv=None):
    """Parse the command line.

    Args:
      argv: argument list (default sys.argv[1:]).

    Returns:
      argparse.Namespace.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="npz with x_train, y_train, x_test, y_test")
    p.add_argument("--model", choices=("pcqat_mnist", "lenet300"), default="pcqat_mnist")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--epochs-train", type=int, default=10)
    p.add_argument("--epochs-prune", type=int, default=2)
    p.add_argument("--epochs-cluster", type=int, default=3)
    p.add_argument("--epochs-qat", type=int, default=1)
    p.add_argument("--centroid-init", choices=("kmeans_plus_plus", "linear"),
                   default="kmeans_plus_plus")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense-weights", default="",
                   help="npz of the dense model's weights: loaded if it exists, else written "
                        "after training (runs of one grid share a dense model)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        p.error("--sparsity must be in [0, 1)")
    if args.clusters < 2:
        p.error("--clusters must be >= 2")
    if args.epochs_train < 1 or args.epochs_prune < 1:
        p.error("--epochs-train and --epochs-prune must be >= 1")
    if args.epochs_cluster < 0 or args.epochs_qat < 0:
        p.error("--epochs-cluster and --epochs-qat must be >= 0")
    return args


def load_data(path):
    """Load the npz written by the orchestrator.

    Args:
      path: npz with x_train, y_train, x_test, y_test (float32 NHWC in [0, 1], int labels).

    Returns:
      dict of the four arrays (float32 images, int32 labels).
    """
    with np.load(path) as f:
        d = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    for k in ("x_train", "x_test"):
        d[k] = d[k].astype(np.float32)
        if d[k].ndim == 3:  # NHW -> NHWC
            d[k] = d[k][..., None]
    for k in ("y_train", "y_test"):
        d[k] = d[k].astype(np.int32).reshape(-1)
    return d


def build_model(name, input_shape, num_classes):
    """Build the float Keras model.

    Args:
      name: "pcqat_mnist" (TFMOT tutorial's CNN) or "lenet300" (LeNet-300-100).
      input_shape: HWC shape of one image.
      num_classes: number of logits.

    Returns:
      an uncompiled tf_keras Sequential model.
    """
    layers = keras.layers
    if name == "pcqat_mnist":
        body = [
            layers.Conv2D(12, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Flatten(),
            layers.Dense(num_classes),
        ]
    else:
        body = [
            layers.Flatten(),
            layers.Dense(300, activation="relu"),
            layers.Dense(100, activation="relu"),
            layers.Dense(num_classes),
        ]
    return keras.Sequential([keras.Input(shape=input_shape)] + body, name=name)


def compile_model(model):
    """Compile with a fresh Adam (Keras defaults, as the tutorials) and logits loss."""
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def fit(model, d, args, epochs, callbacks=()):
    """Compile and train `model` on the whole training set (shuffled, seeded)."""
    compile_model(model)
    if epochs > 0:
        model.fit(
            d["x_train"], d["y_train"], batch_size=args.batch_size, epochs=epochs,
            shuffle=True, callbacks=list(callbacks), verbose=2,
        )


def accuracy(model, d):
    """Test accuracy of a Keras model (compiled here if needed)."""
    if model.optimizer is None:
        compile_model(model)
    _, acc = model.evaluate(d["x_test"], d["y_test"], batch_size=1024, verbose=0)
    return float(acc)


def kernel_stats(model):
    """Sparsity and distinct values of each Keras kernel (float weights)."""
    out = {}
    for layer in model.layers:
        for w in layer.weights:
            if w.name.split("/")[-1].startswith("kernel"):
                v = w.numpy()
                out[layer.name] = {
                    "sparsity": float(np.mean(v == 0)),
                    "distinct": int(np.unique(v).size),
                }
    return out


def pruning_schedule(args, steps_per_epoch):
    """PolynomialDecay whose last update lands on the final sparsity inside the run.

    TFMOT's default frequency (100 steps) may never fire in a short run, and the final
    sparsity is only applied on a step with (step - begin) % frequency == 0, so the
    frequency is sized to the step count and end_step is the last such step.
    """
    total = args.epochs_prune * steps_per_epoch
    frequency = max(1, min(100, total // 10))
    end_step = max(frequency, ((total - 1) // frequency) * frequency)
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=min(INITIAL_SPARSITY, args.sparsity), final_sparsity=args.sparsity,
        begin_step=0, end_step=end_step, frequency=frequency,
    )
    return schedule, {"frequency": frequency, "end_step": end_step, "steps": total}


def prune(model, d, args):
    """Magnitude pruning with TFMOT; returns (stripped model, schedule info)."""
    steps_per_epoch = math.ceil(len(d["x_train"]) / args.batch_size)
    schedule, info = pruning_schedule(args, steps_per_epoch)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    fit(pruned, d, args, args.epochs_prune, [tfmot.sparsity.keras.UpdatePruningStep()])
    return tfmot.sparsity.keras.strip_pruning(pruned), info


def kmeans_pp_feasible(kernel, k):
    """Whether TFMOT's sparsity-preserving KMEANS_PLUS_PLUS init can run on `kernel`.

    With preserve_sparsity TFMOT keeps one centroid at zero and splits the other k - 1
    between negative and positive weights in proportion to their counts (tf.round, half to
    even like np.round); kmeans++ then fails ("Expected num_to_sample <= points.rows()")
    when a side has fewer weights than centroids, e.g. a 90%-sparse 3x3x1x12 conv kernel
    with 16 clusters.
    """
    neg, pos = int(np.sum(kernel < 0)), int(np.sum(kernel > 0))
    if neg + pos == 0:
        return True
    k_neg = int(np.round((k - 1) * neg / (neg + pos)))
    return neg >= k_neg and pos >= k - 1 - k_neg


def cluster(model, d, args):
    """Sparsity-preserving weight clustering with TFMOT.

    Every layer with a kernel is clustered (as the tutorial's whole-model call) with
    --centroid-init; a layer where kmeans++ cannot sample k - 1 non-zero centroids falls
    back to LINEAR (recorded in the returned dict).

    Returns:
      (stripped model, {layer name: init used}).
    """
    inits = {}
    names = tfmot.clustering.keras.CentroidInitialization

    def wrap(layer):
        if not hasattr(layer, "kernel"):
            return layer
        init = args.centroid_init
        if init == "kmeans_plus_plus" and not kmeans_pp_feasible(
            layer.kernel.numpy(), args.clusters
        ):
            init = "linear"
        inits[layer.name] = init
        return tfmot.clustering.keras.cluster_weights(
            layer,
            number_of_clusters=args.clusters,
            cluster_centroids_init=getattr(names, init.upper()),
            preserve_sparsity=True,
        )

    clustered = keras.models.clone_model(model, clone_function=wrap)
    fit(clustered, d, args, args.epochs_cluster)
    return tfmot.clustering.keras.strip_clustering(clustered), inits


def qat(model, d, args):
    """Sparsity- and cluster-preserving quantization-aware training (PCQAT)."""
    annotated = tfmot.quantization.keras.quantize_annotate_model(model)
    scheme = tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme(
        preserve_sparsity=True
    )
    quantized = tfmot.quantization.keras.quantize_apply(annotated, scheme)
    fit(quantized, d, args, args.epochs_qat)
    return quantized


def convert(model, x_rep, int8_io=True):
    """Convert to a full-integer .tflite.

    Args:
      model: the QAT Keras model.
      x_rep: representative inputs (training images).
      int8_io: int8 input/output tensors (else float in/out around int8 ops).

    Returns:
      the .tflite bytes.
    """
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def representative():
        for i in range(len(x_rep)):
            yield [x_rep[i : i + 1]]

    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


def tflite_accuracy(model_bytes, x, y, batch=1000):
    """Accuracy of a .tflite on (x, y) with ai_edge_litert; inputs quantized as the model says."""
    interp = Interpreter(model_content=model_bytes, num_threads=1)
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], (batch,) + tuple(x.shape[1:]))
    interp.allocate_tensors()
    preds = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        n = len(xb)
        if n < batch:
            xb = np.concatenate([xb, np.zeros((batch - n,) + xb.shape[1:], xb.dtype)])
        interp.set_tensor(inp["index"], quantize_input(xb, inp))
        interp.invoke()
        preds.append(np.argmax(interp.get_tensor(out["index"])[:n], axis=-1))
    return float(np.mean(np.concatenate(preds) == y))


def quantize_input(x, detail):
    """Quantize float inputs with the tensor's (scale, zero_point); pass floats through."""
    if detail["dtype"] == np.float32:
        return x.astype(np.float32)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    q = np.round(x / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(detail["dtype"])


def tflite_kernels(model_bytes):
    """Read the weight kernels back from the .tflite.

    Returns:
      {tensor name: {op, shape, dtype, sparsity, distinct, distinct_nonzero,
      max_distinct_per_channel, num_scales, distinct_dequantized}}.
    """
    interp = Interpreter(model_content=model_bytes)
    interp.allocate_tensors()
    details = {t["index"]: t for t in interp.get_tensor_details()}
    out = {}
    for op in interp._get_ops_details():  # private, but the only way to map ops to tensors
        if op["op_name"] not in KERNEL_OPS or len(op["inputs"]) < 2:
            continue
        t = details[int(op["inputs"][1])]
        w = interp.get_tensor(t["index"])
        qp = t["quantization_parameters"]
        scales, zps = np.asarray(qp["scales"]), np.asarray(qp["zero_points"])
        axis = int(qp["quantized_dimension"])
        if scales.size > 1:
            shape = [1] * w.ndim
            shape[axis] = -1
            deq = (w.astype(np.float64) - zps.reshape(shape)) * scales.reshape(shape)
            per_channel = max(
                np.unique(np.take(w, c, axis=axis)).size for c in range(w.shape[axis])
            )
        elif scales.size == 1:
            deq = (w.astype(np.float64) - zps[0]) * scales[0]
            per_channel = int(np.unique(w).size)
        else:
            deq, per_channel = w.astype(np.float64), int(np.unique(w).size)
        out[t["name"]] = {
            "op": op["op_name"],
            "shape": [int(s) for s in w.shape],
            "dtype": np.dtype(w.dtype).name,
            "sparsity": float(np.mean(deq == 0)),
            "distinct": int(np.unique(w).size),
            "distinct_nonzero": int(np.unique(deq[deq != 0]).size),
            "max_distinct_per_channel": int(per_channel),
            "num_scales": int(scales.size),
            "distinct_dequantized": int(np.unique(deq).size),
        }
    return out


def zip_bytes(data, name="model.tflite"):
    """Size of `data` zipped as one member, ZIP_DEFLATED level 9 (TFMOT's convention)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr(name, data)
    return len(buf.getvalue())


def write_atomic(path, data):
    """Write bytes to `path` through a temporary file in the same folder."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None):
    """Run the PCQAT pipeline and write DIR/tf_pcqat.json and DIR/model.tflite."""
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    d = load_data(args.data)
    num_classes = int(max(d["y_train"].max(), d["y_test"].max())) + 1

    t0 = time.perf_counter()
    base = build_model(args.model, d["x_train"].shape[1:], num_classes)
    if args.dense_weights and os.path.exists(args.dense_weights):
        with np.load(args.dense_weights) as saved:
            base.set_weights([saved[f"arr_{i}"] for i in range(len(saved.files))])
    else:
        fit(base, d, args, args.epochs_train)
        if args.dense_weights:
            buf = io.BytesIO()
            np.savez(buf, *base.get_weights())
            write_atomic(args.dense_weights, buf.getvalue())
    t_train = time.perf_counter() - t0
    if args.dense_weights:  # the same compression whether the dense model was loaded or trained
        keras.utils.set_random_seed(args.seed + 1)
    acc = {"baseline": accuracy(base, d)}
    float32_bytes = base.count_params() * 4

    times = {}
    t = time.perf_counter()
    pruned, prune_info = prune(base, d, args)
    times["prune"] = time.perf_counter() - t
    acc["pruned"] = accuracy(pruned, d)
    stats = {"pruned": kernel_stats(pruned)}

    t = time.perf_counter()
    clustered, centroid_inits = cluster(pruned, d, args)
    times["cluster"] = time.perf_counter() - t
    acc["clustered"] = accuracy(clustered, d)
    stats["clustered"] = kernel_stats(clustered)

    t = time.perf_counter()
    quantized = qat(clustered, d, args)
    times["qat"] = time.perf_counter() - t
    acc["qat"] = accuracy(quantized, d)

    t = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    x_rep = d["x_train"][rng.choice(len(d["x_train"]), size=min(500, len(d["x_train"])),
                                    replace=False)]
    try:
        model_bytes, io_type = convert(quantized, x_rep, int8_io=True), "int8"
    except Exception as e:
        print(f"int8 in/out conversion failed ({e!r}); using float in/out", file=sys.stderr)
        model_bytes, io_type = convert(quantized, x_rep, int8_io=False), "float32"
    times["convert"] = time.perf_counter() - t
    t_compress = sum(times.values())

    t = time.perf_counter()
    acc["tflite"] = tflite_accuracy(model_bytes, d["x_test"], d["y_test"])
    t_eval = time.perf_counter() - t
    write_atomic(os.path.join(args.out, "model.tflite"), model_bytes)

    zipped = zip_bytes(model_bytes)
    kernels = tflite_kernels(model_bytes)
    n_kernel = sum(math.prod(k["shape"]) for k in kernels.values())
    result = {
        "model": args.model,
        "accuracy": acc,
        "tflite_bytes": len(model_bytes),
        "tflite_zip_bytes": zipped,
        "float32_bytes": float32_bytes,
        "compression_tflite_zip": float32_bytes / zipped,
        "tflite_io_type": io_type,
        "tflite_kernels": kernels,
        "tflite_sparsity": sum(k["sparsity"] * math.prod(k["shape"]) for k in kernels.values())
        / max(n_kernel, 1),
        "keras_kernels": stats,
        "centroid_init": centroid_inits,
        "prune_schedule": {"initial_sparsity": min(INITIAL_SPARSITY, args.sparsity),
                           "final_sparsity": args.sparsity, "begin_step": 0, **prune_info},
        "wall_s": {"baseline_train": t_train, "compression": t_compress,
                   **{f"phase/{k}": v for k, v in times.items()}, "tflite_eval": t_eval},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "versions": {"tensorflow": tf.__version__, "tfmot": tfmot.__version__,
                     "tf_keras": keras.__version__, "numpy": np.__version__,
                     "python": sys.version.split()[0]},
        "args": vars(args),
    }
    path = os.path.join(args.out, "tf_pcqat.json")
    write_atomic(path, (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps({k: result[k] for k in ("accuracy", "tflite_bytes", "tflite_zip_bytes",
                                               "compression_tflite_zip", "tflite_sparsity")}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
