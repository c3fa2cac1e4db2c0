"""The persistent compilation cache: where it goes, and that a bad folder costs nothing."""

import pathlib

import jax
from jax._src import compilation_cache

from ucpjax import compile_cache
from ucpjax.data import CACHE_DIR


def test_default_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("UCPJAX_COMPILE_CACHE", raising=False)
    assert compile_cache.default_folder() == CACHE_DIR / "xla"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compile_cache.default_folder() == tmp_path / "jax"
    monkeypatch.setenv("UCPJAX_COMPILE_CACHE", str(tmp_path / "ours"))
    assert compile_cache.default_folder() == tmp_path / "ours"
    monkeypatch.setenv("UCPJAX_COMPILE_CACHE", "off")
    assert compile_cache.default_folder() is None
    assert compile_cache.enable() is None


def test_an_unwritable_folder_warns_in_one_line_and_changes_nothing(tmp_path, capsys):
    before = jax.config.jax_compilation_cache_dir
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert compile_cache.enable(blocker / "xla") is None
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "UCPJAX_COMPILE_CACHE" in err
    assert jax.config.jax_compilation_cache_dir == before


def test_the_test_run_has_a_cache_of_its_own():
    """conftest points the cache at a fresh folder: no state from earlier runs."""
    folder = pathlib.Path(jax.config.jax_compilation_cache_dir)
    assert folder.is_dir() and folder.name.startswith("ucpjax-test-xla-")


def test_runs_at_once_take_turns_on_the_cache_folder():
    """A bounded cache is a locked one: a run never reads an entry half written."""
    jax.jit(lambda x: x * 3 + 1)(jax.numpy.ones(7)).block_until_ready()
    cache = compilation_cache._cache
    assert jax.config.jax_compilation_cache_max_size == 2 << 30
    assert getattr(cache, "_base_cache", cache).eviction_enabled
