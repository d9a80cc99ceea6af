"""The bundled-data loaders: shapes, splits, standardisation and the OOD statistics option."""

from __future__ import annotations

import pytest
import torch

from torch_proxvi.reference import datasets


@pytest.mark.parametrize("name, n_train, n_features, n_classes", [("digits", 1079, 64, 10),
                                                                   ("breast_cancer", 341, 30, 2)])
def test_small_datasets_split_and_standardise(name, n_train, n_features, n_classes):
    pytest.importorskip("sklearn")
    data = datasets.load(name, seed=3)
    assert data.x_train.shape == (n_train, n_features) and data.num_classes == n_classes
    assert len(data.x_val) + len(data.x_test) + n_train == {"digits": 1797, "breast_cancer": 569}[name]
    # standardised with the training statistics: training columns have mean 0 and std 1 (or are constant)
    assert data.x_train.mean(0).abs().max() < 1e-4
    std = data.x_train.std(0, unbiased=False)
    assert ((std - 1).abs() < 1e-3).logical_or(std < 1e-3).all()
    again, other = datasets.load(name, seed=3), datasets.load(name, seed=4)
    assert torch.equal(again.y_test, data.y_test) and not torch.equal(other.x_test, data.x_test)


def _require_images():
    for name in datasets.IMAGES:
        try:
            datasets.image_arrays(name)
        except (ImportError, FileNotFoundError) as e:
            pytest.skip(str(e))


def test_image_datasets_share_the_50k_10k_10k_layout():
    _require_images()
    for name in datasets.IMAGES:
        data = datasets.load(name)
        assert [len(t) for t in data] == [50_000] * 2 + [10_000] * 4
        assert data.x_train.shape[1] == 784 and data.num_classes == 10
        assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-4
        raw = datasets.image_arrays(name)
        assert raw[0][0].min() >= 0 and raw[0][0].max() <= 1


def test_stats_from_standardises_with_the_other_datasets_training_pixels():
    _require_images()
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
