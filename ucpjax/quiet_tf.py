"""Importing TensorFlow without its C++ start-up lines on stderr.

On a CPU where oneDNN's custom ops are on (AVX-512 machines), TensorFlow 2.21
prints "All log messages before absl::InitializeLog() ..." and "oneDNN custom
operations are on ..." while it loads. absl writes them before its logging is
set up, so ``TF_CPP_MIN_LOG_LEVEL`` does not reach them (abseil-cpp#1718), and a
one-line error from the command line would arrive under four lines of noise.
All of it comes during the import, so the import alone runs with file
descriptor 2 on /dev/null; Python errors are raised, not printed, so none is
lost. ``UCPJAX_DEBUG=1`` keeps stderr as it is.
"""

from __future__ import annotations

import importlib
import os
import sys


def import_tensorflow():
    """The ``tensorflow`` module, imported quietly the first time."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or os.environ.get("UCPJAX_DEBUG") == "1":
        return importlib.import_module("tensorflow")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            return importlib.import_module("tensorflow")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
