"""The shipped digits networks: the feature extractor (accuracy on its held-out split, what its Frechet
distance separates, the classifier behind digits class accuracy) and the autoencoder of the latent path
(reconstruction, latent statistics, the digits_latent dataset); input errors; deterministic retraining."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from flowmap_kernels import digits as dfeat  # noqa: E402
from flowmap_kernels.data import get_dataset  # noqa: E402
from flowmap_kernels.metrics import class_accuracy, frechet_distance  # noqa: E402


@pytest.fixture(scope="module")
def split():
    (xtr, ytr), (xte, yte) = dfeat._split()
    return xtr.reshape(-1, 64).numpy(), ytr.numpy(), xte.reshape(-1, 64).numpy(), yte.numpy()


def test_shipped_weights_classify_the_held_out_split(split):
    _, _, xte, yte = split
    acc = float((dfeat.classify(xte) == yte).mean())
    assert acc >= 0.95
    assert abs(acc - float(dfeat.load("features")["test_accuracy"])) <= 0.01  # float32-stored weights, same split


def test_frechet_features_sees_missing_classes_that_pixels_miss(split):
    xtr, ytr, xte, _ = split
    rng = np.random.default_rng(0)
    a, b = xtr[:700], xtr[700:1400]
    floor_f, floor_p = dfeat.frechet_features(a, b), frechet_distance(a, b)

    def ratios(x):
        return dfeat.frechet_features(x, b) / floor_f, frechet_distance(x, b) / floor_p

    assert ratios(rng.standard_normal((700, 64)))[0] > 5
    no_threes_f, no_threes_p = ratios(xtr[ytr != 3][:700])  # one class dropped
    assert no_threes_f > 2.5 and no_threes_f > 2 * no_threes_p
    half_f, half_p = ratios(xtr[ytr < 5][:700])  # five classes dropped
    assert half_f > 15 and half_f > 2 * half_p
    jitter_f, jitter_p = ratios(a + 0.3 * rng.standard_normal(a.shape))  # pixel noise, digits still readable
    assert jitter_f < 2 < jitter_p
    # features are a function of the images: same input, same features; shapes (N,1,8,8) and (N,64) agree
    f = dfeat.features(xte[:5])
    assert f.shape == (5, 64) and f.dtype == np.float64
    np.testing.assert_array_equal(f, dfeat.features(torch.tensor(xte[:5]).reshape(5, 1, 8, 8)))


def test_digits_class_accuracy_uses_the_classifier(split):
    _, _, xte, yte = split
    assert class_accuracy(xte, yte, "digits")["accuracy"] >= 0.95
    wrong = (yte + 1) % 10
    assert class_accuracy(xte, wrong, "digits")["accuracy"] <= 0.05
    per = class_accuracy(xte.reshape(-1, 1, 8, 8), yte, "digits")["per_class"]
    assert set(per) == set(range(10))


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"x: expected digits of shape"):
        dfeat.features(np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"x: expected digits of shape"):
        dfeat.classify(np.zeros(64))


def test_autoencoder_reconstructs_held_out_digits_and_standardises_latents(split):
    _, _, xte, yte = split
    x = torch.tensor(xte, dtype=torch.float32).reshape(-1, 1, 8, 8)
    z = dfeat.encode(x)
    assert z.shape == (x.shape[0], *dfeat.LATENT_SHAPE) and z.dtype == torch.float32
    rec = dfeat.decode(z)
    assert rec.shape == x.shape and rec.abs().max() <= 1
    mse = torch.mean((rec - x) ** 2).item()
    assert mse == pytest.approx(float(dfeat.load("autoencoder")["test_mse"]), rel=0.05) and mse < 0.05
    assert (dfeat.classify(rec) == yte).mean() >= 0.9  # reconstructions stay readable
    ztr = dfeat.encode(torch.tensor(split[0], dtype=torch.float32).reshape(-1, 1, 8, 8))
    assert ztr.mean((0, 2, 3)).abs().max() < 1e-3 and (ztr.std((0, 2, 3)) - 1).abs().max() < 1e-3


def test_digits_latent_dataset_samples_latents_that_decode_to_digits():
    ds = get_dataset("digits_latent")
    assert ds.shape == dfeat.LATENT_SHAPE and ds.pixels == "digits" and ds.num_classes == 10
    g = torch.Generator().manual_seed(0)
    z, y = ds.sample(400, generator=g, with_labels=True)
    assert z.shape == (400, *dfeat.LATENT_SHAPE)
    assert (dfeat.classify(ds.decode(z)) == y.numpy()).mean() >= 0.9
    g2 = torch.Generator().manual_seed(0)
    torch.testing.assert_close(ds.sample(400, generator=g2), z, rtol=0, atol=0)  # a pure function of g
    with pytest.raises(ValueError, match=r"z: expected latents of shape \(N, 2, 4, 4\)"):
        ds.decode(torch.zeros(3, 1, 8, 8))


@pytest.mark.parametrize("train", [dfeat.train_features, dfeat.train_autoencoder], ids=["features", "autoencoder"])
def test_retraining_is_deterministic(train):
    a, b = train(steps=3), train(steps=3)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
