"""Tests of ucpjax.run_folder: the run folder owns its files and heals itself."""

import copy
import os
import subprocess

import numpy as np
import pytest

from ucpjax.config import ConfigError, to_dict
from ucpjax.recipe import Recipe
from ucpjax.run_folder import RunFolder

VARIABLES = {"params": {"Dense_0": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}
DONE = {"row": {"stage": "prune"}, "report": {"prune/sparsity": 0.5}}


def _saved(tmp_path) -> RunFolder:
    folder = RunFolder(tmp_path / "run")
    folder.claim({"recipe": {"seed": 0}})
    folder.save_stage(1, "prune", VARIABLES, DONE)
    return folder


def test_a_saved_stage_loads_back(tmp_path):
    variables, done = _saved(tmp_path).load_stage(1, "prune", VARIABLES)
    np.testing.assert_array_equal(variables["params"]["Dense_0"]["kernel"],
                                  VARIABLES["params"]["Dense_0"]["kernel"])
    assert done == DONE


@pytest.mark.parametrize("damage", ["empty_json", "garbled_json", "no_checkpoint",
                                    "truncated_checkpoint"])
def test_a_damaged_stage_is_redone_with_one_line(tmp_path, damage):
    folder = _saved(tmp_path)
    base = folder.root / folder.stage_name(1, "prune")
    if damage == "empty_json":
        base.with_suffix(".json").write_text("{}")
    elif damage == "garbled_json":
        base.with_suffix(".json").write_text('{"row": ')
    elif damage == "no_checkpoint":
        subprocess.run(["rm", "-r", str(base)], check=True)
    else:
        for path in base.rglob("*"):
            if path.is_file() and path.stat().st_size > 0:
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    lines = []
    assert folder.load_stage(1, "prune", VARIABLES, log=lines.append) is None
    assert len(lines) == 1 and "redoing it" in lines[0]
    assert not base.with_suffix(".json").exists()  # so the redo is clean


def test_out_refuses_the_users_own_files_and_other_configs(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.tflite").write_bytes(b"my model")
    with pytest.raises(ConfigError, match="not a ucpjax run"):
        RunFolder(mine).claim({"recipe": {}})
    assert (mine / "model.tflite").read_bytes() == b"my model"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        RunFolder(tmp_path / "file").claim({"recipe": {}})
    folder = _saved(tmp_path)
    with pytest.raises(ConfigError, match=r"different config \(fields \['recipe'\]"):
        folder.claim({"recipe": {"seed": 1}})


def test_a_setting_added_later_at_its_none_default_keeps_old_runs_their_own(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.claim({"recipe": {"distill": {"alpha": 0.9}}})  # made before teacher_from existed
    folder.claim({"recipe": {"distill": {"alpha": 0.9, "teacher_from": None}}})
    with pytest.raises(ConfigError, match=r"fields \['recipe'\]"):
        folder.claim({"recipe": {"distill": {"alpha": 0.9, "teacher_from": "runs/t"}}})


def test_a_run_made_before_the_prune_teacher_settings_resumes(tmp_path):
    resolved = to_dict(Recipe())
    before = copy.deepcopy(resolved)
    for field in ("teacher_alpha", "teacher_temperature"):
        del before["prune"][field]
    folder = RunFolder(tmp_path / "run")
    folder.claim({"recipe": before})
    folder.claim({"recipe": resolved})  # today's defaults: the same run


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path):
    folder = RunFolder(tmp_path / "run")
    with folder.lock():
        assert (folder.root / ".lock").read_text() == str(os.getpid())
        with (pytest.raises(ConfigError, match=f"in use by process {os.getpid()}"),
              RunFolder(tmp_path / "run").lock()):
            pass
    assert not (folder.root / ".lock").exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (folder.root / ".lock").write_text(str(dead.pid))  # left by a killed run
    with folder.lock():
        assert (folder.root / ".lock").read_text() == str(os.getpid())


def test_a_garbled_report_names_its_file(tmp_path):
    folder = _saved(tmp_path)
    (folder.root / "report.json").write_text("{not json")
    with pytest.raises(ConfigError, match="report.json is not valid JSON") as err:
        folder.read_json("report.json")
    assert "\n" not in str(err.value)
