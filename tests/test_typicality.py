"""Typicality: bits per pixel from the classifier's own forward pass, a threshold fitted on validation, and the
out-of-distribution sets it is scored on. Fast: a tiny untrained model."""

import numpy as np
import pytest
import torch

from tgm.model import TGM, TGMConfig
from tgm.preprocess import PreprocessSpec
from tgm.training.data import Split
from tgm.training.objectives import LN2, Generative, evaluate_split
from tgm.typicality import Typicality, auroc, classify_and_score, ood_sets


def tiny_model(seed=0) -> TGM:
    torch.manual_seed(seed)
    return TGM(TGMConfig(palette_size=8, seq_len=36, n_layer=1, n_head=2, n_embd=16, n_classes=3))


def test_one_forward_pass_gives_the_classes_and_the_split_mean_bits_per_pixel():
    model = tiny_model()
    tokens = np.random.default_rng(0).integers(0, 8, (50, 36))
    probs, bpp = classify_and_score(model, tokens, batch_size=16)
    assert probs.shape == (50, 3) and np.allclose(probs.sum(1), 1, atol=1e-5) and bpp.shape == (50,)
    whole = evaluate_split(model, Split(tokens), Generative(), 16, torch.device("cpu"))
    assert bpp.mean() == pytest.approx(whole["gen_loss"] / LN2, rel=1e-5)
    # Per image, not per batch: an image's score does not depend on its neighbours.
    assert classify_and_score(model, tokens[7:8])[1][0] == pytest.approx(bpp[7], rel=1e-5)


def test_the_threshold_is_the_validation_quantile_and_round_trips(tmp_path):
    val = np.linspace(0.5, 1.5, 101)
    typ = Typicality.fit(val, 0.99)
    assert typ.threshold == pytest.approx(1.49) and typ.median == pytest.approx(1.0)
    assert typ.typical(np.array([1.49, 1.4901])).tolist() == [True, False]
    assert np.mean(~typ.typical(val)) == pytest.approx(0.01, abs=0.01)
    typ.save(tmp_path / "t.json")
    assert Typicality.load(tmp_path / "t.json") == typ


def test_auroc_orders_scores():
    assert auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert auroc(np.array([0.3, 0.4]), np.array([0.1, 0.2])) == 0.0


def test_out_of_distribution_sets_are_valid_token_sequences_and_seeded():
    spec = PreprocessSpec(6, "grey", np.linspace(0, 255, 8).round().astype(np.uint8).reshape(-1, 1))
    test = np.random.default_rng(1).integers(0, 8, (40, 36))
    sets = ood_sets(spec, test, 30, seed=0)
    assert set(sets) == {"uniform_noise", "inverted_test", "digits_8x8_upscaled", "photo_crops"}
    for name, tokens in sets.items():
        assert tokens.shape == (30, 36) and tokens.min() >= 0 and tokens.max() < 8, name
        assert np.array_equal(tokens, ood_sets(spec, test, 30, seed=0)[name]), name
    # Inverted on an even grey palette: token t becomes 7 - t.
    assert np.isin(sets["inverted_test"], 7 - test).all()
