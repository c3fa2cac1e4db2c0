"""JAX's persistent compilation cache, which the command line turns on, and
``per_first_argument``, which keeps a function's compile in the process.

One ``compress`` compiles the same computations again and again: every
stage evaluates a model of its own, and a rerun, a resumed run, every ``study``
variant and every ``search`` candidate compile what the last one did. XLA's
compile is a fifth of a LeNet-300-100 compress on 2 CPU cores
(results/profile_compress_lenet300.md); with the cache, a computation compiled
once is loaded from disk, in this process and the next.

Where: ``$UCPJAX_COMPILE_CACHE`` (a folder, or ``off``), else JAX's own
``JAX_COMPILATION_CACHE_DIR`` if set, else ``xla/`` in the data cache folder
(``$UCPJAX_CACHE``, default ``~/.cache/ucpjax``), at most 2 GiB (the least
recently used entries go first). Python users call ``enable()`` themselves.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys
from collections.abc import Callable

import jax

from ucpjax.data import CACHE_DIR

# Cache everything that takes this long to compile; a model's forward pass at
# inference compiles in a few tenths of a second, which add up over a run.
_MIN_COMPILE_SECONDS = 0.05
# A bound on the folder turns on JAX's file lock (and least-recently-used
# eviction): without it, a run reading an entry that another run is writing
# finds it truncated, and warns on stderr.
_MAX_BYTES = 2 << 30


def default_folder() -> pathlib.Path | None:
    """The folder ``enable()`` uses by default, or None when set to ``off``."""
    chosen = os.environ.get("UCPJAX_COMPILE_CACHE") or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if chosen:
        return None if chosen.lower() == "off" else pathlib.Path(chosen).expanduser()
    return CACHE_DIR / "xla"


def enable(folder: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Turns the cache on at ``folder`` (default: ``default_folder()``).

    Returns the folder, or None when it is off or cannot be created (then a
    one-line warning says so and everything still runs, compiling as usual).
    """
    path = pathlib.Path(folder) if folder is not None else default_folder()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"ucpjax: warning: compilation cache off ({path}: {err.strerror}); set "
              "UCPJAX_COMPILE_CACHE to a writable folder", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", _MAX_BYTES)
    return path


def per_first_argument(fn: Callable) -> Callable[[object], Callable]:
    """``of(first)``: ``fn`` with ``first`` bound, jitted once per ``first`` (and input
    shapes) however often it is asked for; a ``first`` that does not hash (a module
    with a list field) is compiled per call."""
    jitted = jax.jit(fn, static_argnums=0)

    def of(first) -> Callable:
        try:
            hash(first)
        except TypeError:
            return jax.jit(functools.partial(fn, first))
        return functools.partial(jitted, first)
    return of
