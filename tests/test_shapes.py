"""The procedural "shapes" dataset and its evaluation classifiers (docs/DESIGN.md 2.7)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_headless.product import product_module, product_names
from layerdiff_toy import shapes as S

REPO_ROOT = Path(__file__).resolve().parents[1]

layered_sample = product_module("layerdiff_model.data.layered_sample")
sample_folders = product_module("layerdiff_model.data.sample_files")
shards = product_module("layerdiff_model.data.shards")
data_validation = product_module("layerdiff_model.data.validation")
DatasetError = product_names("layerdiff_model.errors", "DatasetError")


def test_generator_is_deterministic_per_seed():
    a, b = S.generate_sample(7, 3), S.generate_sample(7, 3)
    assert a.global_prompt == b.global_prompt and a.meta == b.meta
    for name in ("background", "foregrounds", "masks"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    other_seed = [S.generate_sample(8, i).global_prompt for i in range(10)]
    assert other_seed != [S.generate_sample(7, i).global_prompt for i in range(10)]
    train, test = S.config_for_split("train"), S.config_for_split("test")
    assert S.generate_sample(7, 3, train).meta["foregrounds"] != S.generate_sample(7, 3, test).meta["foregrounds"]


@pytest.mark.parametrize("size", [32, 64, 96])
def test_samples_are_well_formed(size):
    config = S.ShapesConfig(size=size, max_foregrounds=3)
    counts = set()
    for sample in S.generate_samples(0, 40, config):
        n = sample.num_foregrounds
        counts.add(n)
        assert layered_sample.check_sample(sample) == []
        assert sample.size == (size, size) and 1 <= n <= 3
        truth = S.shapes_truth(sample)
        assert sample.foreground_prompts == [S.shape_prompt(f.colour, f.shape) for f in truth.foregrounds]
        assert sample.background_prompt == S.background_prompt(truth.background_colour, truth.background_texture)
        assert sample.global_prompt.startswith(sample.foreground_prompts[0])
        assert sample.global_prompt.endswith(" on " + sample.background_prompt)
        assert truth.background_colour not in {f.colour for f in truth.foregrounds}
        for k, (fg, info) in enumerate(zip(truth.foregrounds, sample.meta["foregrounds"])):
            full = S.render_shape(info["shape"], tuple(info["box"]), size)
            assert np.array_equal(fg.mask.numpy(), full)  # full, un-occluded mask
            assert fg.visible.sum() >= config.min_visible * fg.mask.sum()  # not hidden by layers above
            layer = sample.foregrounds[k]
            colour = torch.tensor(S.COLOURS[fg.colour]).float()[:, None] / 255
            assert torch.allclose(layer[:, fg.mask], colour.expand(-1, int(fg.mask.sum())))
            assert torch.allclose(layer[:, ~fg.mask], torch.tensor(128 / 255))
    assert counts == {1, 2, 3}


def test_prompts_read_naturally():
    assert S.global_prompt([("red", "circle")], "blue", "striped") == "a red circle on a blue striped background"
    assert S.global_prompt([("red", "circle"), ("green", "square"), ("black", "ring")], "white", "plain") == \
        "a red circle, a green square and a black ring on a plain white background"
    assert S.global_prompt([("orange", "ring")], "orange", "dotted") == "an orange ring on an orange dotted background"


def test_held_out_split_is_disjoint_and_covers_every_colour_and_shape():
    train, test = S.held_out_combinations(seed=0)
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(S.all_combinations())
    assert {c for c, _ in train} == set(S.COLOURS) and {s for _, s in train} == set(S.SHAPES)
    assert {c for c, _ in test} == set(S.COLOURS)  # one unseen shape per colour
    assert S.held_out_combinations(seed=0) == (train, test)
    assert S.held_out_combinations(seed=1)[1] != test
    prompts = {}
    for split, allowed in (("train", set(train)), ("val", set(test)), ("test", set(test))):
        config = S.config_for_split(split)
        prompts[split] = set()
        for sample in S.generate_samples(1, 30, config):
            pairs = {(f["colour"], f["shape"]) for f in sample.meta["foregrounds"]}
            assert pairs <= allowed and sample.meta["split"] == split
            prompts[split].add(sample.global_prompt)
    # the validation split: the held-out pairs in other scenes (its own random stream), so tuning never sees a
    # test sample even with the same seed
    assert len(prompts["val"] & prompts["test"]) <= 1
    with pytest.raises(DatasetError, match="split"):
        S.split_combinations("validation")


def test_config_errors_are_clear():
    with pytest.raises(DatasetError, match="multiple of 8"):
        S.generate_sample(0, 0, S.ShapesConfig(size=60))
    with pytest.raises(DatasetError, match="Unknown shapes vocabulary"):
        S.generate_sample(0, 0, S.ShapesConfig(combos=(("pink", "circle"),)))


# ----------------------------------------------------------------------------------------------- classifiers


@pytest.mark.parametrize("size,count", [(64, 150), (32, 40), (128, 30)])
def test_classifiers_read_back_the_ground_truth(size, count):
    hits = {"bg colour": 0, "texture": 0, "colour": 0, "shape": 0, "iou": 0}
    n_bg = n_fg = 0
    for sample in S.generate_samples(11, count, S.ShapesConfig(size=size)):
        truth, got = S.shapes_truth(sample), S.classify_sample_layers(sample)
        n_bg += 1
        hits["bg colour"] += got["background"]["colour"] == truth.background_colour
        hits["texture"] += got["background"]["texture"] == truth.background_texture
        for fg, read, layer in zip(truth.foregrounds, got["foregrounds"], sample.foregrounds):
            n_fg += 1
            hits["colour"] += read["colour"] == fg.colour
            hits["shape"] += read["shape"] == fg.shape
            hits["iou"] += S.mask_iou(fg.mask, torch.from_numpy(S.render_shape(fg.shape, _box(fg.mask), size))) > 0.8
    rates = {k: v / (n_bg if k in ("bg colour", "texture") else n_fg) for k, v in hits.items()}
    assert all(rate > 0.95 for rate in rates.values()), rates


def _box(mask):
    ys, xs = np.nonzero(mask.numpy())
    return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def test_classifiers_tolerate_mild_noise():
    g = torch.Generator().manual_seed(0)
    right = total = 0
    for sample in S.generate_samples(4, 60):
        truth = S.shapes_truth(sample)
        bg = (sample.background + 0.05 * torch.randn(sample.background.shape, generator=g)).clamp(0, 1)
        bg = torch.nn.functional.avg_pool2d(bg[None], 3, 1, 1, count_include_pad=False)[0]  # soft edges
        right += S.background_texture_name(bg) == truth.background_texture
        right += S.background_colour_name(bg) == truth.background_colour
        total += 2
        for fg, layer in zip(truth.foregrounds, sample.foregrounds):
            noisy = (layer + 0.05 * torch.randn(layer.shape, generator=g)).clamp(0, 1)
            speckled = fg.mask ^ (torch.rand(fg.mask.shape, generator=g) < 0.01)
            right += S.dominant_colour_name(noisy, speckled) == fg.colour
            right += S.shape_name_from_mask(speckled) == fg.shape
            total += 2
    assert right / total > 0.95


def test_classifier_basics():
    assert S.mask_iou(torch.ones(4, 4), torch.ones(4, 4)) == 1.0
    a, b = torch.zeros(4, 4), torch.zeros(4, 4)
    a[:2], b[:, :2] = 1, 1
    assert S.mask_iou(a, b) == pytest.approx(4 / 12)
    assert S.mask_iou(torch.zeros(3, 3), torch.zeros(3, 3)) == 1.0
    assert S.shape_name_from_mask(torch.zeros(8, 8)) == "none"
    pixels = np.array([[220, 40, 40]] * 5 + [[0, 0, 255]] * 2, np.uint8)  # [K, 3] uint8 input
    assert S.dominant_colour_name(pixels) == "red"
    for shape in S.SHAPES:
        assert S.shape_name_from_mask(S.render_shape(shape, (10, 10, 60, 60), 72)) == shape
    for colour in S.COLOURS:  # a texture's shade is nearer its own colour's entry than any other colour
        img = np.zeros((3, 16, 16))
        img[:, :, :8] = np.array(S.COLOURS[colour])[:, None, None] / 255
        img[:, :, 8:] = np.array(S.shade(colour))[:, None, None] / 255
        assert S.background_colour_name(img) == colour and S.background_texture_name(img) == "striped"


def test_ground_truth_survives_the_disk(tmp_path):
    sample = S.generate_sample(2, 5)
    back = sample_folders.read_sample(sample_folders.write_sample(tmp_path / "s", sample))
    a, b = S.shapes_truth(sample), S.shapes_truth(back)
    assert (a.background_colour, a.background_texture) == (b.background_colour, b.background_texture)
    assert all(torch.equal(x.mask, y.mask) and x.shape == y.shape for x, y in zip(a.foregrounds, b.foregrounds))
    plain = layered_sample.LayeredSample("g", "b", ["f"], back.background, back.foregrounds[:1], back.masks[:1])
    with pytest.raises(DatasetError, match="shapes generator"):
        S.shapes_truth(plain)


# ----------------------------------------------------------------------------------------------- script


@pytest.mark.slow  # script runs in fresh processes (~12 s)
def test_make_shapes_dataset_script(tmp_path):
    script = str(REPO_ROOT / "scripts" / "make_shapes_dataset.py")
    run = subprocess.run([sys.executable, script, "--out", str(tmp_path / "f"), "--count", "12", "--size", "32",
                          "--seed", "3", "--split", "test"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr
    report = data_validation.validate_dataset(tmp_path / "f")
    assert report.ok and report.good == 12
    info = json.loads((tmp_path / "f" / "shapes_dataset.json").read_text())
    assert info["split"] == "test" and [tuple(c) for c in info["combinations"]] == S.held_out_combinations()[1]
    first = sample_folders.read_sample(tmp_path / "f" / "00000000")
    assert first.global_prompt == S.generate_sample(3, 0, S.config_for_split("test", size=32)).global_prompt

    from scripts import make_shapes_dataset as make
    args = make.parse_args(["--out", str(tmp_path / "s"), "--count", "5", "--format", "shards",
                            "--samples-per-shard", "2", "--seed", "3", "--split", "test", "--size", "32"])
    assert make.main(args) == 0
    found = shards.find_shards(tmp_path / "s")
    assert len(found) == 3
    from_shards = list(shards.iter_shard_samples(found))
    assert [s.global_prompt for s in from_shards] == [
        sample_folders.read_sample(tmp_path / "f" / f"{i:08d}").global_prompt for i in range(5)]
    with pytest.raises(SystemExit):
        make.parse_args(["--out", str(tmp_path / "f"), "--count", "3"])  # not empty, no --overwrite
    with pytest.raises(SystemExit):
        make.parse_args(["--out", str(tmp_path / "x"), "--size", "60"])


def test_toy_prompt_check_accepts_every_dataset_prompt_and_names_what_it_cannot_read():
    for sample in S.generate_samples(5, 60, S.ShapesConfig(max_foregrounds=3)):
        assert S.prompt_problem(sample.global_prompt, "global") is None, sample.global_prompt
        assert S.prompt_problem(sample.background_prompt, "background") is None, sample.background_prompt
        assert all(S.prompt_problem(p, "foreground") is None for p in sample.foreground_prompts)
    assert S.prompt_problem("a red cat", "foreground") == "words it never saw: cat"
    assert "a plain green background" in S.prompt_problem("a green background", "background")
    assert "phrasing" in S.prompt_problem("a red circle on a green background", "global")
    assert "phrasing" in S.prompt_problem("red circle", "foreground")
