import numpy as np
import pytest

from ucpjax import data


def test_mnist_is_the_real_dataset(mnist):
    assert mnist.x_train.shape == (55_000, 28, 28, 1)
    assert mnist.x_val.shape == (5_000, 28, 28, 1)
    assert mnist.x_test.shape == (10_000, 28, 28, 1)
    assert mnist.num_classes == 10
    # Mean pixel of the original test set is 33.7912 / 255 (TOOLCHAIN.md).
    assert mnist.x_test.mean() * 255 == pytest.approx(33.7912, abs=1e-3)
    assert mnist.x_train.min() >= 0.0 and mnist.x_train.max() <= 1.0
    assert np.bincount(mnist.y_test).tolist()[:3] == [980, 1135, 1032]


def test_validation_split_is_held_out_and_seeded():
    a, b, c = data.load("mnist", seed=0), data.load("mnist", seed=0), data.load("mnist", seed=1)
    np.testing.assert_array_equal(a.y_val, b.y_val)
    assert not np.array_equal(a.y_val, c.y_val)
    assert len(a.x_train) + len(a.x_val) == 60_000


def test_batches_are_deterministic_per_seed():
    x, y = np.arange(10).reshape(10, 1), np.arange(10)
    first = [b[1].tolist() for b in data.batches(x, y, 4, seed=3)]
    again = [b[1].tolist() for b in data.batches(x, y, 4, seed=3)]
    other = [b[1].tolist() for b in data.batches(x, y, 4, seed=4)]
    assert first == again != other
    assert len(first) == 2  # drop_remainder


def test_unknown_dataset_names_the_choices():
    with pytest.raises(data.DatasetError, match="unknown dataset 'mnits'.*mnist"):
        data.load("mnits")


def test_bad_folder_says_what_layout_is_expected(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(data.DatasetError, match="test/<label>/<image>"):
        data.load(str(tmp_path))


def test_image_folder(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for label in ("cat", "dog"):
            folder = tmp_path / "imgs" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(folder / f"{i}.png")
    ds = data.load(str(tmp_path / "imgs"), val_size=2)
    assert ds.x_train.shape == (10, 8, 8, 3) and ds.x_test.shape == (4, 8, 8, 3)
    assert sorted(set(ds.y_test.tolist())) == [0, 1]
