"""Tests of the shapes benchmark scoring (layerdiff_toy/shapes_eval.py) and the autoencoder trainer (pure maths)."""
from __future__ import annotations

import math

import pytest
import torch

from comfy_headless.product import product_names
from layerdiff_toy import shapes, shapes_eval
from layerdiff_toy.autoencoder_training import (AutoencoderTrainConfig, evaluate_autoencoder, latent_penalty,
                                                 random_crops, train_autoencoder)

LayeredImages = product_names("layerdiff_model.layers.compose", "LayeredImages")


def _test_samples(count=12):
    return list(shapes.generate_samples(3, count, shapes.config_for_split("test", max_foregrounds=2)))


def test_ground_truth_layers_score_perfectly():
    scores = [shapes_eval.score_sample(*_pair(s)) for s in _test_samples()]
    summary = shapes_eval.summarize(scores)
    for key in ("fg_colour_acc", "fg_shape_acc", "bg_colour_acc", "bg_texture_acc", "composite_acc", "true_mask_iou"):
        assert summary[key] == 1.0, key
    assert summary["mask_agreement"] > 0.97
    assert summary["per_colour"] == {c: [n, n] for c, (_, n) in summary["per_colour"].items()}
    assert sum(n for _, n in summary["per_colour"].values()) == summary["layers"]


def _pair(sample):
    layers, truth = shapes_eval.truth_layers(sample)
    return layers, 0, truth, shapes_eval.NOMINAL, True


def test_wrong_colour_wrong_mask_and_grey_layer_are_caught():
    sample = next(s for s in _test_samples() if len(s.foreground_prompts) == 2)
    layers, _, truth, _, _ = _pair(sample)
    want = truth.foregrounds[0].colour
    other = next(c for c in shapes.COLOURS if c not in (want, truth.foregrounds[1].colour, truth.background_colour))
    fg = layers.foregrounds.clone()
    fg[0, 0][layers.masks[0, 0] > 0.5] = torch.tensor(shapes.COLOURS[other], dtype=fg.dtype) / 255
    score = shapes_eval.score_sample(LayeredImages(layers.background, fg, layers.masks), 0, truth)
    assert not score.layers[0].colour_ok and score.layers[0].colour == other
    assert not score.composite_ok  # the top layer shows the wrong colour in the composite
    assert score.layers[1].colour_ok
    # a mask that misses the content: low IoU; an empty mask: colour/shape "none", IoU 0
    masks = layers.masks.clone()
    masks[0, 0] = torch.roll(masks[0, 0], shifts=(32, 32), dims=(0, 1))
    masks[0, 1] = 0
    score = shapes_eval.score_sample(LayeredImages(layers.background, layers.foregrounds, masks), 0, truth,
                                     layout_is_true=True)
    assert score.layers[0].mask_agreement < 0.5 and score.layers[0].true_mask_iou < 0.5
    assert (score.layers[1].colour, score.layers[1].shape, score.layers[1].mask_agreement) == ("none", "none", 0.0)
    # a plain grey foreground has no content region
    assert not shapes_eval.content_region(torch.full((64, 64, 3), shapes.FOREGROUND_FILL)).any()


def test_chance_levels_and_table():
    truths = [shapes.shapes_truth(s) for s in _test_samples()]
    chance = shapes_eval.chance_levels(truths)
    assert chance["fg_colour_acc"] == 1 / len(shapes.COLOURS) and chance["fg_shape_acc"] == 0.25
    assert 0.0 <= chance["true_mask_iou"] < 0.3 and chance["mask_agreement"] != chance["mask_agreement"]  # nan
    assert chance["composite_acc"] < 0.02
    table = shapes_eval.markdown_table({"chance": chance}, {"chance": "1 s"})
    assert table.splitlines()[2].startswith("| chance | 0.12 | 0.25 | n/a |") and table.count("\n") == 2


def test_a_layer_that_draws_nothing_never_scores_as_a_colour():
    """The read's case: an all-grey layer with a full mask, prompted purple, used to be classified purple (no grey
    class) and passed layer colour and the composite. Now it is "none" and fails both."""
    sample = next(s for s in _test_samples(40) if s.meta["foregrounds"][0]["colour"] == "purple")
    layers, _, truth, _, _ = _pair(sample)
    fg, masks = layers.foregrounds.clone(), layers.masks.clone()
    fg[0, 0] = shapes.FOREGROUND_FILL
    masks[0, 0] = 1.0
    score = shapes_eval.score_sample(LayeredImages(layers.background, fg, masks), 0, truth)
    assert score.layers[0].colour == "none" and not score.layers[0].colour_ok
    assert not score.composite_ok and score.details["composite_visible_colours"][0] == "none"
    assert score.layers[0].mask_agreement == 0.0  # no content anywhere
    assert shapes_eval.summarize([score])["no_colour_rate"] > 0


def test_decoded_palette_sets_the_content_threshold_per_colour():
    """A thin purple ring that decodes washed toward grey: with the nominal palette most of it is not content; with
    the palette measured on decoded layers it is, so mask/content agreement measures the mask, not the VAE."""
    sample = next(s for s in _test_samples(40) if s.meta["foregrounds"][0]["colour"] == "purple")
    layers, _, truth, _, _ = _pair(sample)
    washed = layers.foregrounds.clone()
    purple = torch.tensor(shapes.COLOURS["purple"], dtype=washed.dtype) / 255
    inside = layers.masks[0, 0] > 0.5
    washed[0, 0][inside] = 0.5 + 0.35 * (purple - 0.5)  # 35% of the way from grey to purple
    trip = LayeredImages(layers.background, washed, layers.masks)
    palette = shapes_eval.decoded_palette([(trip, truth)])
    assert torch.allclose(torch.tensor(palette.colours["purple"]), washed[0, 0][inside][0], atol=1e-6)
    absent = next(c for c in shapes.COLOURS if c not in {f.colour for f in truth.foregrounds})
    assert palette.colours[absent] == shapes_eval.NOMINAL.colours[absent]  # never seen: kept nominal
    nominal = shapes_eval.score_sample(trip, 0, truth, shapes_eval.NOMINAL)
    decoded = shapes_eval.score_sample(trip, 0, truth, palette)
    assert nominal.layers[0].mask_agreement < 0.5 and nominal.layers[0].colour == "none"
    assert decoded.layers[0].mask_agreement > 0.95 and decoded.layers[0].colour == "purple"


def test_paired_difference_and_per_colour_table():
    samples = _test_samples(8)
    good = [shapes_eval.score_sample(*_pair(s)) for s in samples]
    bad = []
    for s in samples:  # every top layer drawn in the wrong colour
        layers, _, truth, _, _ = _pair(s)
        fg = layers.foregrounds.clone()
        other = next(c for c in shapes.COLOURS if c != truth.foregrounds[0].colour)
        fg[0, 0][layers.masks[0, 0] > 0.5] = torch.tensor(shapes.COLOURS[other], dtype=fg.dtype) / 255
        bad.append(shapes_eval.score_sample(LayeredImages(layers.background, fg, layers.masks), 0, truth))
    diff = shapes_eval.paired_difference(good, bad, "composite_acc")
    assert diff == {"metric": "composite_acc", "n": 8, "mean": 1.0, "se": 0.0}
    layers_total = sum(len(s.layers) for s in good)
    colour = shapes_eval.paired_difference(good, bad, "fg_colour_acc")
    assert colour["n"] == layers_total and colour["mean"] == pytest.approx(8 / layers_total) and colour["se"] > 0
    table = shapes_eval.per_colour_table({"good": shapes_eval.summarize(good), "bad": shapes_eval.summarize(bad)})
    cells = {row.split("|")[1].strip(): [tuple(map(int, c.split("/"))) for c in row.split("|")[2:-1] if c.strip()]
             for row in table.splitlines()[2:]}
    assert all(right == n for right, n in cells["good"])
    assert sum(n - right for right, n in cells["bad"]) == 8 and len(cells["bad"]) == len(cells["good"])
    with pytest.raises(ValueError, match="unknown metric"):
        shapes_eval.paired_difference(good, bad, "mask_iou")


def test_score_rejects_layer_count_mismatch():
    sample = next(s for s in _test_samples() if len(s.foreground_prompts) == 2)
    layers, _, truth, _, _ = _pair(sample)
    truth.foregrounds.pop()
    with pytest.raises(ValueError, match="2 generated foregrounds for 1 prompts"):
        shapes_eval.score_sample(layers, 0, truth)


# ------------------------------------------------------------------------------------------ autoencoder trainer
def _tiny_autoencoder():
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 4, 3, stride=2, padding=1))
    dec = torch.nn.Sequential(torch.nn.Upsample(scale_factor=4), torch.nn.Conv2d(4, 16, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.Conv2d(16, 3, 3, padding=1))
    return enc, dec


def test_autoencoder_training_reduces_reconstruction_error():
    samples = list(shapes.generate_samples(0, 8, shapes.ShapesConfig(size=32, max_foregrounds=1)))
    images = torch.stack([s.background for s in samples] + [s.foregrounds[0] for s in samples])
    enc, dec = _tiny_autoencoder()
    before = evaluate_autoencoder(enc, dec, images)
    summary = train_autoencoder(enc, dec, (images * 255).round().byte(),
                                AutoencoderTrainConfig(steps=60, batch_size=8, lr=3e-3, crop=16, downscale=4,
                                                       warmup=5, log_every=1000))
    after = evaluate_autoencoder(enc, dec, images)
    assert summary["steps"] == 60 and math.isfinite(summary["reconstruction_loss"])
    assert after["psnr_db"] > before["psnr_db"] + 3
    assert len(after["latent_std"]) == 4


def test_latent_penalty_and_crops():
    z = torch.randn(64, 4, 8, 8)
    assert latent_penalty(z, 1.0) < 0.01 < latent_penalty(3 * z + 1, 1.0)
    crops = random_crops(torch.rand(5, 3, 64, 64), 32, torch.Generator().manual_seed(0))
    assert crops.shape == (5, 3, 32, 32)
    enc, dec = _tiny_autoencoder()
    with pytest.raises(ValueError, match="multiple of the downscale"):
        train_autoencoder(enc, dec, torch.rand(4, 3, 32, 32), AutoencoderTrainConfig(steps=1, crop=12, downscale=8))
