"""Command line: ``ucpjax train`` (a dense model), ``compress`` (the pipeline),
``sensitivity`` (per-layer costs), ``study`` (variants side by side),
``search`` (per-layer rules within an accuracy budget).

Exit status: 0 done; 2 a bad input (one line naming it); 3 the ``.tflite``
failed its faithfulness check (the run folder keeps everything for a look);
4 ``search`` found no candidate within its budget (it names the closest);
130 interrupted (``--resume`` continues; ``search`` continues when rerun).
``--debug`` or ``UCPJAX_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys

from ucpjax.config import ConfigError, describe

EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_BUDGET_NOT_MET, EXIT_INTERRUPTED = 2, 3, 4, 130


def _train_command(args) -> int:
    from ucpjax import experiment, models, train

    models.create(args.model)  # an unknown name fails before the data loads
    setup = experiment.Experiment(
        model=args.model, data=args.data, val_size=args.val_size,
        recipe=experiment.Recipe(seed=args.seed),
        dense=train.TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                                learning_rate=args.learning_rate, optimizer=args.optimizer,
                                weight_decay=args.weight_decay,
                                weight_decay_on=None if args.weight_decay_on == "all"
                                else args.weight_decay_on, augment=args.augment))
    m = experiment.train_to_folder(setup, pathlib.Path(args.out))
    print(f"\n{args.model} on {args.data}: test accuracy {m['test_accuracy']:.4f} "
          f"(error {100 * (1 - m['test_accuracy']):.2f}%), val {m['val_accuracy']:.4f}, "
          f"{args.epochs:g} epochs in {m['wall_seconds']:.0f} s -> {args.out}")
    return 0


def _compress_command(args) -> int:
    from ucpjax import experiment

    config = experiment.apply_overrides(experiment.load(args.config, smoke=args.smoke),
                                        args.overrides)
    if args.show_config:
        print("\n".join(describe(config)))
        return 0
    experiment.run(config, pathlib.Path(args.out), resume=args.resume)
    return 0


def _sensitivity_command(args) -> int:
    from ucpjax import experiment, plots, sensitivity
    from ucpjax.run_folder import RunFolder

    max_drop = _number(args.max_drop, "--max-drop", float)
    if not (math.isfinite(max_drop) and max_drop > 0):
        raise ConfigError(f"--max-drop {args.max_drop}: must be a positive number of "
                          "accuracy points")
    config = experiment.apply_overrides(experiment.load(args.config, smoke=args.smoke),
                                        args.overrides)
    if args.after:
        experiment.check_stage(config, pathlib.Path(args.after))
    folder = RunFolder(args.out)
    folder.claim({"sensitivity": {"config": args.config, "smoke": args.smoke,
                                  "overrides": args.overrides, "after": args.after}})
    model, dataset = (experiment.after_stage(config, pathlib.Path(args.after)) if args.after
                      else experiment.dense_model(config))
    table = sensitivity.measure(
        model.params, apply_fn=model.apply_fn(), data=dataset, rules=config.recipe.rules,
        min_per_channel=config.recipe.prune.min_per_channel,
        criterion=config.recipe.prune.criterion, seed=config.seed,
        progress=lambda name: print(f"measuring {name} ...", flush=True))
    folder.write_json("sensitivity.json", table)
    folder.write_bytes("sensitivity.md", sensitivity.markdown(table).encode())
    plots.sensitivity(table, folder.root / "sensitivity.png")
    print("\n" + sensitivity.markdown(table))
    print(f"rules within {max_drop} points (sensitivity.load_rules"
          f"({str(folder.root / 'sensitivity.json')!r}, max_drop={max_drop})):")
    for rule in sensitivity.allocate(table, max_drop=max_drop):
        print(f"  {rule}")
    return 0


def _study_command(args) -> int:
    from ucpjax import study

    only = [name for name in args.only.split(",") if name] if args.only else None
    study.run(args.config, pathlib.Path(args.out), smoke=args.smoke, only=only)
    return 0


def _search_command(args) -> int:
    from ucpjax import search

    summary = search.search(
        args.config, pathlib.Path(args.out), objective=args.objective, smoke=args.smoke,
        max_drop=_number(args.max_drop, "--max-drop", float),
        refinements=_number(args.refinements, "--refinements", int),
        seeds=_number(args.seeds, "--seeds", int), overrides=args.overrides)
    return EXIT_BUDGET_NOT_MET if summary["chosen"] is None else 0


def _number(text: str, flag: str, kind):
    """``kind(text)``; a ConfigError naming ``flag`` (argparse would print two lines)."""
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: not a number") from None


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (it prints the usage lines first)."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"ucpjax: error: {self.prog}: {message} (see {self.prog} "
                                  "--help)\n")


def _parser() -> argparse.ArgumentParser:
    from ucpjax import models
    from ucpjax.experiment import Experiment

    parser = _Parser(prog="ucpjax", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a dense model")
    t.add_argument("--model", required=True, help=f"one of {models.names()}")
    t.add_argument("--data", required=True, help="mnist, fashion_mnist, cifar10 or a folder")
    t.add_argument("--out", required=True)
    t.add_argument("--epochs", type=float, default=10)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--learning-rate", type=float, default=1e-3)
    t.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--weight-decay-on", default="all", choices=("all", "kernels"),
                   help="kernels: conv and dense kernels only, not BatchNorm or biases")
    t.add_argument("--augment", default="none", choices=("none", "shift", "crop_flip"),
                   help="shift: translate digits by up to 2 px; crop_flip: natural images")
    t.add_argument("--seed", type=int, default=0, help="draws the weights, the batches "
                   "and the validation split; a run from this folder keeps that split")
    t.add_argument("--val-size", type=int, default=5000,
                   help="training examples held out for validation (default 5000)")
    t.set_defaults(run=_train_command)

    fields = "\n  ".join(describe(Experiment()))
    c = sub.add_parser(
        "compress", help="run the compression pipeline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run prune -> distill -> cluster -> quantize -> export as configured.",
        epilog="overrides are field=value pairs (recipe fields without the 'recipe.' "
               f"prefix); fields and defaults:\n  {fields}")
    c.add_argument("--config", required=True,
                   help="experiment file, e.g. experiments/lenet300_mnist.py")
    c.add_argument("--out", required=True, help="run folder")
    c.add_argument("--resume", action="store_true", help="continue from the last finished stage")
    c.add_argument("--smoke", action="store_true", help="seconds-long run on a data slice")
    c.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    c.add_argument("overrides", nargs="*", help="e.g. prune.target_sparsity=0.95")
    c.set_defaults(run=_compress_command)

    v = sub.add_parser("sensitivity", help="accuracy drop of each layer pruned or clustered alone")
    v.add_argument("--config", required=True, help="experiment file, e.g. experiments/cifar10.py")
    v.add_argument("--out", required=True, help="folder for sensitivity.json, .md and .png")
    v.add_argument("--smoke", action="store_true", help="seconds-long run on a data slice")
    v.add_argument("--max-drop", default="1.0",
                   help="accuracy points the allocated rules may lose (default 1.0)")
    v.add_argument("--after", metavar="STAGE_FOLDER",
                   help="measure the model a finished stage of a compress run of the same "
                        "setup left (e.g. runs/x/stages/01_prune), not the dense one")
    v.add_argument("overrides", nargs="*", help="e.g. init_from=runs/baselines/cifar_cnn")
    v.set_defaults(run=_sensitivity_command)

    s = sub.add_parser("study", help="run an experiment's variants side by side")
    s.add_argument("--config", required=True, help="experiment file with get_variants(smoke)")
    s.add_argument("--out", required=True, help="folder; each variant runs in <out>/<name>")
    s.add_argument("--smoke", action="store_true", help="seconds-long runs on a data slice")
    s.add_argument("--only", default="", help="comma-separated variant names")
    s.set_defaults(run=_study_command)

    q = sub.add_parser(
        "search", help="per-layer sparsity and k within an accuracy budget",
        description="Chooses a LayerRule (sparsity, clusters) per layer for the smallest "
        "file whose validation accuracy drop is within --max-drop: predicted from per-layer "
        "sensitivity, refined on real runs (the rule: ucpjax.search). Writes search.json, "
        "search.md, accuracy_vs_size.png and best_experiment.py; exit 4 when no candidate "
        "meets the budget.")
    q.add_argument("--config", required=True, help="experiment file, e.g. "
                   "experiments/table2_pcqat.py")
    q.add_argument("--out", required=True, help="folder; each candidate runs in <out>/<name>, "
                   "rerunning continues")
    q.add_argument("--max-drop", required=True,
                   help="validation accuracy points the result may lose (> 0)")
    q.add_argument("--objective", default="zip",
                   help="zip (the zipped int8 .tflite, default) or packed")
    q.add_argument("--refinements", default="4", help="candidates after the first, at most "
                   "(default 4)")
    q.add_argument("--seeds", default="1", help="seeds a candidate within budget runs "
                   "under; it is judged by their mean validation drop (default 1)")
    q.add_argument("--smoke", action="store_true", help="seconds-long runs on a data slice")
    q.add_argument("overrides", nargs="*", help="e.g. val_size=10000")
    q.set_defaults(run=_search_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = _parser().parse_args(argv)
    debug = args.debug or os.environ.get("UCPJAX_DEBUG") == "1"
    from ucpjax import compile_cache, devices
    from ucpjax.export import ToleranceError

    devices.use_cpu_cores()
    compile_cache.enable()

    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("\nucpjax: interrupted; resume with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ToleranceError as err:
        if debug:
            raise
        print(f"ucpjax: check failed: {err}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except (ConfigError, ValueError, FloatingPointError, OSError) as err:
        if debug:
            raise
        print(f"ucpjax: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
