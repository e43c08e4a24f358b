"""Dataset importers: layered files (PSD, ORA) and cut-outs + backgrounds -> layered samples.

Every file is made in the test: PSDs with psd-tools (what Photoshop-compatible editors write), ORA zips by hand.
"""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_headless.product import product_module

imp = product_module("layerdiff_model.data.construction.layered_file_import")
cut = product_module("layerdiff_model.data.construction.cutout_composition")
prompts = product_module("layerdiff_model.data.construction.prompts")
errors = product_module("layerdiff_model.errors")

H, W = 64, 80
psd_tools = pytest.importorskip("psd_tools")
from psd_tools.api.layers import Group, PixelLayer  # noqa: E402


def binary_rgba(rng, h, w):
    """Random RGB with a random 0/255 alpha: uint8 [h, w, 4]."""
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((h, w)) > 0.4, 255, 0)
    return rgba


def on_canvas(local, top, left, h=H, w=W):
    """What an editor shows: the layer pasted at (top, left), clipped to the canvas; uint8 [h, w, 4]."""
    canvas = np.zeros((h, w, 4), np.uint8)
    lh, lw = local.shape[:2]
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + lh, h), min(left + lw, w)
    canvas[y0:y1, x0:x1] = local[y0 - top:y1 - top, x0 - left:x1 - left]
    return canvas


def paint(rgb, *layers_bottom_first):
    """Composite binary-alpha layers over an RGB image (uint8)."""
    out = rgb.copy()
    for rgba in layers_bottom_first:
        out[rgba[..., 3] == 255] = rgba[..., :3][rgba[..., 3] == 255]
    return out


def chw(array):
    return torch.from_numpy(np.ascontiguousarray(array[..., :3].transpose(2, 0, 1))).float() / 255


def assert_layer(sample, k, rgba):
    """Foreground k has the layer's mask (alpha >= 128), its pixels inside the mask and grey outside."""
    mask = torch.from_numpy(rgba[..., 3] >= 128)
    assert torch.equal(sample.masks[k, 0], mask.float())
    fg = sample.foregrounds[k]
    assert torch.equal(fg[:, mask], chw(rgba)[:, mask])
    assert bool((fg[:, ~mask] == 0.5).all())


def psd_file(path, background, layers, size=(W, H)):
    """A psd-tools PSD: background (name, RGB) then layers (name, RGBA, top, left) bottom first."""
    psd = psd_tools.PSDImage.new("RGB", size)
    psd.append(PixelLayer.frompil(Image.fromarray(background[1]), psd, background[0], 0, 0))
    for name, rgba, top, left in layers:
        psd.append(PixelLayer.frompil(Image.fromarray(rgba), psd, name, top, left))
    psd.save(path)
    return path


# ------------------------------------------------------------------------------------------------- PSD import
def test_psd_groups_hidden_layers_and_layers_outside_the_canvas(tmp_path):
    rng = np.random.default_rng(0)
    street = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    bird_a, bird_b, chick, ghost, hidden_child = (binary_rgba(rng, 20, 24) for _ in range(5))
    ball = binary_rgba(rng, 30, 30)
    psd = psd_tools.PSDImage.new("RGB", (W, H))
    psd.append(PixelLayer.frompil(Image.fromarray(street), psd, "city street", 0, 0))
    group = Group.new(psd, "  two\tbirds ")
    PixelLayer.frompil(Image.fromarray(bird_a), group, "bird a", 5, 5)
    nested = Group.new(group, "nest")
    PixelLayer.frompil(Image.fromarray(chick), nested, "chick", 20, 30)
    PixelLayer.frompil(Image.fromarray(hidden_child), group, "hidden bird", 0, 0).visible = False
    PixelLayer.frompil(Image.fromarray(bird_b), group, "bird b", 12, 14)  # the group's top child
    PixelLayer.frompil(Image.fromarray(ghost), psd, "ghost", 30, 30).visible = False
    PixelLayer.frompil(Image.fromarray(ball), psd, "red ball", H - 10, W - 12)  # hangs over the corner
    PixelLayer.frompil(Image.fromarray(ball), psd, "far away", H + 20, W + 20)  # entirely outside
    psd.save(tmp_path / "street.psd")

    sample = imp.import_layered_file(tmp_path / "street.psd", key="street")
    assert sample.key == "street" and sample.size == (H, W)
    assert sample.background_prompt == "city street"
    assert sample.foreground_prompts == ["red ball", "two birds"]  # top first; group name, whitespace collapsed
    assert sample.global_prompt == "a red ball and two birds in front of a city street"
    assert sample.meta["import"] == {"source": "street.psd", "layers": 8, "hidden": 2, "empty": 1, "groups": 1,
                                     "captioned": 0}
    assert torch.equal(sample.background, chw(street))
    ball_on = on_canvas(ball, H - 10, W - 12)
    assert_layer(sample, 0, ball_on)  # clipped: only the 10x12 corner inside the canvas
    assert int(sample.masks[0].sum()) == int((ball[:10, :12, 3] == 255).sum())
    children = [on_canvas(bird_a, 5, 5), on_canvas(chick, 20, 30), on_canvas(bird_b, 12, 14)]  # bottom first
    group_rgba = np.zeros((H, W, 4), np.uint8)
    for child in children:
        group_rgba[child[..., 3] == 255] = child[child[..., 3] == 255]
    assert_layer(sample, 1, group_rgba)  # children composited in order, nested group included, hidden one not
    union = np.logical_or.reduce([c[..., 3] == 255 for c in children])
    assert torch.equal(sample.masks[1, 0], torch.from_numpy(union).float())  # the group's mask: union of children
    expected = paint(street, *children, ball_on)  # the ghost and the hidden child are not visible
    assert torch.allclose(sample.composed(), chw(expected), atol=1e-6)
    editor = np.asarray(psd_tools.PSDImage.open(tmp_path / "street.psd").composite().convert("RGB"))
    assert torch.allclose(sample.composed(), chw(editor), atol=1.5 / 255)  # what psd-tools renders


def test_a_psd_layer_mask_hides_what_the_editor_hides(tmp_path):
    wall = np.full((H, W, 3), (10, 20, 30), np.uint8)
    psd = psd_tools.PSDImage.new("RGB", (W, H))
    psd.append(PixelLayer.frompil(Image.fromarray(wall), psd, "wall", 0, 0))
    ball = PixelLayer.frompil(Image.new("RGBA", (20, 20), (200, 0, 0, 255)), psd, "a ball", 10, 10)
    ball.remove_mask()
    half = np.zeros((20, 20), np.uint8)
    half[:, :8] = 255
    ball.create_mask(Image.fromarray(half), 10, 10)  # shows only the left 8 columns
    psd.save(tmp_path / "masked.psd")
    sample = imp.import_layered_file(tmp_path / "masked.psd", key="m")
    expected = torch.zeros(H, W)
    expected[10:30, 10:18] = 1
    assert torch.equal(sample.masks[0, 0], expected)
    editor = np.asarray(psd_tools.PSDImage.open(tmp_path / "masked.psd").composite().convert("RGB"))
    assert torch.allclose(sample.composed(), chw(editor), atol=1.5 / 255)


# ------------------------------------------------------------------------------------------------- ORA import
def png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def ora_file(path, stack_body, pngs, size=(W, H), stack_xml=True):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mimetype", "image/openraster")
        if stack_xml:
            zf.writestr("stack.xml", f'<?xml version="1.0"?><image version="0.0.3" w="{size[0]}" h="{size[1]}">'
                                     f"<stack>{stack_body}</stack></image>")
        for name, array in pngs.items():
            zf.writestr(name, png(array))
    return path


def test_ora_nested_stacks_hidden_entries_offsets_and_a_transparent_background(tmp_path):
    rng = np.random.default_rng(1)
    cat, flower, leaf, hidden, inside_hidden = (binary_rgba(rng, 16, 20) for _ in range(5))
    garden = np.concatenate([rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
                             np.full((H, W, 1), 255, np.uint8)], axis=2)
    garden[:, :10, 3] = 0  # a transparent strip on the left
    body = ('<layer name="a  sleeping cat" src="data/cat.png" x="50" y="40"/>'
            '<layer name="hidden" src="data/hidden.png" visibility="hidden"/>'
            '<stack name="hidden stack" visibility="hidden"><layer name="x" src="data/inside.png"/></stack>'
            '<stack name="flowers" x="4" y="6">'
            '  <layer name="flower" src="data/flower.png" x="10" y="2"/>'
            '  <stack name="leaves" x="3" y="3"><layer name="leaf" src="data/leaf.png" x="1" y="1"/></stack>'
            '</stack>'
            '<layer name="garden" src="data/garden.png"/>')
    pngs = {"data/cat.png": cat, "data/flower.png": flower, "data/leaf.png": leaf, "data/hidden.png": hidden,
            "data/inside.png": inside_hidden, "data/garden.png": garden}
    sample = imp.import_layered_file(ora_file(tmp_path / "garden.ora", body, pngs), key="garden")
    assert sample.foreground_prompts == ["a sleeping cat", "flowers"] and sample.background_prompt == "garden"
    assert sample.global_prompt == "a sleeping cat and flowers in front of a garden"
    assert sample.meta["import"]["hidden"] == 2 and sample.meta["import"]["groups"] == 1
    cat_on = on_canvas(cat, 40, 50)  # offsets: layer x/y, plus the stacks' own x/y for nested entries
    assert_layer(sample, 0, cat_on)
    flower_on, leaf_on = on_canvas(flower, 8, 14), on_canvas(leaf, 10, 8)
    assert_layer(sample, 1, _over(leaf_on, flower_on))  # the stack's entries composited, nested stack included
    mean = garden[:, 10:, :3].reshape(-1, 3).astype(np.float64).mean(axis=0)
    bg = sample.background.permute(1, 2, 0).numpy() * 255
    assert np.allclose(bg[:, :10], mean, atol=0.51)  # transparent pixels filled with the opaque pixels' mean
    assert np.allclose(bg[:, 10:], garden[:, 10:, :3], atol=1e-3)


def _over(*layers_bottom_first):
    out = np.zeros((H, W, 4), np.uint8)
    for rgba in layers_bottom_first:
        out[rgba[..., 3] == 255] = rgba[rgba[..., 3] == 255]
    return out


# ---------------------------------------------------------------------------------------- default layer names
@pytest.mark.parametrize("name, default", [
    ("Layer 3", True), ("Layer 3 copy", True), ("Layer 3 copy 2", True), ("Ebene 2", True), ("Calque 1", True),
    ("Background", True), ("Hintergrund", True), ("Group 1", True), ("Paint Layer 4", True), ("", True),
    ("a red car", False), ("Layered cake", False), ("background hills", False), ("Ebene Wiese", False)])
def test_editor_default_names_are_recognised(name, default):
    assert imp.is_default_layer_name(name) is default


class StandInCaptioner:
    """Captions an image by its size; remembers what it was shown."""

    def __init__(self):
        self.seen = []

    def caption(self, images):
        self.seen.extend(images)
        return [f"thing {im.shape[1]}x{im.shape[0]}  " for im in images]


def test_default_layer_names_are_captioned_or_the_file_is_rejected(tmp_path):
    rng = np.random.default_rng(2)
    wall = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    blob = binary_rgba(rng, 10, 12)
    blob[0, 0, 3] = blob[-1, -1, 3] = 255  # the bounding box is the whole 12x10 layer
    layers = [("a blob", blob, 3, 4), ("Layer 2", blob, 30, 40)]
    path = psd_file(tmp_path / "defaults.psd", ("Background", wall), layers)
    with pytest.raises(imp.ImportRejected, match=r"defaults.psd: .*'Layer 2' are .* rename") as info:
        imp.import_layered_file(path, key="d")
    assert info.value.reason == "default-layer-names" and isinstance(info.value, errors.DatasetError)
    only_background = psd_file(tmp_path / "bg.psd", ("Background", wall), layers[:1])  # the usual Photoshop file
    sample = imp.import_layered_file(only_background, key="bg")
    assert sample.background_prompt == "a background" and sample.foreground_prompts == ["a blob"]
    assert sample.meta["import"]["generic_background_prompt"] is True

    captioner = StandInCaptioner()
    sample = imp.import_layered_file(path, key="d", captioner=captioner)
    assert sample.foreground_prompts == ["thing 12x10", "a blob"]  # the crop of 'Layer 2' was captioned
    assert sample.background_prompt == f"thing {W}x{H}"
    assert sample.global_prompt == f"thing {W}x{H}"  # the caption of the composite
    crop, _, composite = captioner.seen
    alpha = blob[..., 3:] == 255
    assert np.array_equal(crop, np.where(alpha, blob[..., :3], 128))  # RGB over grey
    assert np.array_equal(composite, paint(wall, on_canvas(blob, 30, 40), on_canvas(blob, 3, 4))[..., :3])
    assert sample.meta["import"]["captioned"] == 2


# ------------------------------------------------------------------------------------------------ rejected files
def _reject_case(tmp_path, case):
    rng = np.random.default_rng(3)
    wall = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    blob = binary_rgba(rng, 20, 20)
    good = psd_file(tmp_path / "good.psd", ("wall", wall), [("a blob", blob, 0, 0)])
    path = tmp_path / f"{case}.psd"
    if case == "empty-psd":
        psd_tools.PSDImage.new("RGB", (W, H)).save(path)
    elif case == "only-background":
        psd_file(path, ("wall", wall), [])
    elif case in ("cmyk", "16-bit", "grayscale"):
        mode, depth = {"cmyk": ("CMYK", 8), "16-bit": ("RGB", 16), "grayscale": ("L", 8)}[case]
        psd_tools.PSDImage.new(mode, (W, H), depth=depth).save(path)
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 3])  # cut inside the layer data
    elif case == "zero-bytes":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(b"8BPS not really a psd" + bytes(40))
    elif case == "no-stack-xml":
        path = ora_file(tmp_path / "nostack.ora", "", {"data/a.png": blob}, stack_xml=False)
    elif case == "too-many":
        psd_file(path, ("wall", wall), [(f"blob {i}", blob, i, i) for i in range(5)])
    elif case == "too-small":
        psd_file(path, ("wall", wall[:32]), [("a blob", blob, 0, 0)], size=(W, 32))
    elif case == "all-hidden":
        psd = psd_tools.PSDImage.new("RGB", (W, H))
        psd.append(PixelLayer.frompil(Image.fromarray(wall), psd, "wall", 0, 0))
        psd[0].visible = False
        psd.save(path)
    return path


@pytest.mark.parametrize("case, reason, match", [
    ("empty-psd", "no-layers", "has no layers"),
    ("all-hidden", "no-layers", "no visible layer .*1 hidden"),
    ("only-background", "only-background", "only a background layer"),
    ("cmyk", "unsupported-colour-mode", "8-bit CMYK; convert it to 8-bit RGB"),
    ("16-bit", "unsupported-colour-mode", "16-bit RGB; convert it to 8-bit RGB"),
    ("grayscale", "unsupported-colour-mode", "grayscale; convert it to 8-bit RGB"),
    ("truncated", "unreadable", "truncated or corrupt PSD"),
    ("zero-bytes", "unreadable", r"empty \(0 bytes\)"),
    ("garbage", "unreadable", "not a PSD file"),
    ("no-stack-xml", "unreadable", "no stack.xml"),
    ("too-many", "too-many-layers", "5 layers above the background, at most 4 .*merge layers into groups"),
    ("too-small", "too-small", "80x32 px"),
])
def test_unusable_files_are_rejected_with_a_reason_and_the_fix(tmp_path, case, reason, match):
    path = _reject_case(tmp_path, case)
    with pytest.raises(imp.ImportRejected, match=rf"{path.name}: .*{match}") as info:
        imp.import_layered_file(path, key="k")
    assert info.value.reason == reason and reason in imp.REJECT_REASONS


def test_a_folder_imports_every_layered_file_with_unique_keys(tmp_path):
    rng = np.random.default_rng(4)
    wall = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    blob = binary_rgba(rng, 20, 20)
    psd_file(tmp_path / "scene.psd", ("wall", wall), [("a blob", blob, 0, 0)])
    ora_file(tmp_path / "scene.ora", '<layer name="a blob" src="b.png"/><layer name="wall" src="w.png"/>',
             {"b.png": on_canvas(blob, 0, 0), "w.png": wall})
    psd_file(tmp_path / "my.v2.psd", ("wall", wall), [("a blob", blob, 5, 5)])
    (tmp_path / "broken.psd").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a layered file")
    results = list(imp.import_layered_folder(tmp_path))
    assert [p.name for p, _ in results] == ["broken.psd", "my.v2.psd", "scene.ora", "scene.psd"]
    assert isinstance(results[0][1], imp.ImportRejected) and results[0][1].reason == "unreadable"
    keys = [s.key for _, s in results[1:]]
    assert keys == ["my_v2", "scene", "scene_2"]
    assert torch.equal(results[2][1].composed(), results[3][1].composed())  # the same picture in either format


def test_global_prompts_from_layer_prompts():
    g = prompts.global_prompt_from_layers
    assert g(["red car"], "city street") == "a red car in front of a city street"
    assert g(["red car", "tree"], "city street") == "a red car and a tree in front of a city street"
    assert g(["apple", "two dogs", "Eiffel Tower"], "the sky") == \
        "an apple, two dogs and Eiffel Tower in front of the sky"
    assert g(["trees"], "  hour  glass ") == "trees in front of an hour glass"
    assert g([], "beach") == "a beach" and g(["cat"], "") == "a cat"


# ------------------------------------------------------------------------------------------------------ cut-outs
def _save(path, array, mode=None, **kwargs):
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path, **kwargs)


def make_cutouts(folder):
    folder.mkdir()
    colours = {"red_car": (200, 10, 10), "blue-box_02": (10, 10, 200), "green_door": (10, 200, 10)}
    for name, colour in colours.items():  # solid rectangles with a transparent margin (cropped away)
        rgba = np.zeros((50, 70, 4), np.uint8)
        rgba[5:45, 10:60] = (*colour, 255)
        _save(folder / f"{name}.png", rgba)
    ring = np.zeros((40, 40, 4), np.uint8)
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 19.5, xx - 19.5)
    ring[(r < 20) & (r > 9)] = (250, 200, 0, 255)
    _save(folder / "ring.png", ring)
    (folder / "ring.txt").write_text("  a golden\nring \n")
    _save(folder / "photo.jpg", np.full((20, 20, 3), 90, np.uint8))
    _save(folder / "blank.png", np.zeros((20, 20, 4), np.uint8))
    (folder / "cut.png").write_bytes((folder / "ring.png").read_bytes()[:100])
    return colours


def test_cutout_and_background_folders_are_read_and_bad_files_skipped(tmp_path):
    make_cutouts(tmp_path / "cutouts")
    cutouts, skipped = cut.read_cutout_folder(tmp_path / "cutouts")
    assert [p for p, _ in cutouts] == ["blue box", "green door", "red car", "a golden ring"]
    assert cutouts[2][1].shape == (40, 50, 4) and (cutouts[2][1] == (200, 10, 10, 255)).all()  # cropped
    reasons = {p.name: r for p, r in skipped}
    assert set(reasons) == {"photo.jpg", "blank.png", "cut.png"}
    assert "no alpha" in reasons["photo.jpg"] and "empty" in reasons["blank.png"]
    assert "cannot be decoded" in reasons["cut.png"]

    folder = tmp_path / "backgrounds"
    folder.mkdir()
    _save(folder / "beach.png", np.full((70, 90, 3), (30, 60, 90), np.uint8))
    _save(folder / "fog.png", np.full((64, 64), 40000, np.uint16))  # 16-bit grayscale
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(folder / "print.jpg")
    _save(folder / "glass.png", np.full((64, 64, 4), (1, 2, 3, 0), np.uint8))
    _save(folder / "tiny.png", np.zeros((10, 10, 3), np.uint8))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    backgrounds, skipped = cut.read_background_folder(folder)
    found = {p: rgb for p, rgb in backgrounds}
    assert set(found) == {"beach", "fog", "print", "glass"}
    assert all(rgb.dtype == np.uint8 and rgb.shape[2] == 3 for rgb in found.values())
    assert (found["fog"] == round(40000 / 65535 * 255)).all()  # rescaled, not clipped to 255
    assert (found["glass"] == (1, 2, 3)).all()  # alpha dropped
    assert abs(int(found["print"][0, 0, 0]) - 255) <= 3 and found["print"][0, 0, 1] <= 3  # CMYK red -> RGB red
    assert {p.name for p, _ in skipped} == {"tiny.png", "broken.jpg"}
    with pytest.raises(errors.DatasetError, match="does not exist"):
        cut.read_cutout_folder(tmp_path / "missing")


def test_composed_samples_follow_their_recorded_placement(tmp_path):
    colours = make_cutouts(tmp_path / "cutouts")
    cutouts, _ = cut.read_cutout_folder(tmp_path / "cutouts")
    backgrounds = [("a beach", np.full((100, 150, 3), (30, 60, 90), np.uint8))]
    size, min_visible = (96, 128), 0.6
    samples = list(cut.compose_cutout_samples(cutouts, backgrounds, 8, seed=7, size=size, min_visible=min_visible,
                                              max_foregrounds=3))
    assert [s.key for s in samples] == [f"cutout{i:08d}" for i in range(8)]
    counts = set()
    for s in samples:
        assert s.size == size and torch.equal(s.background, chw(np.full((*size, 3), (30, 60, 90), np.uint8)))
        layers = s.meta["placement"]["layers"]
        counts.add(len(layers))
        assert s.foreground_prompts == [cutouts[p["cutout"]][0] for p in layers]
        assert s.global_prompt == prompts.global_prompt_from_layers(s.foreground_prompts, "a beach")
        assert len({p["cutout"] for p in layers}) == len(layers)  # distinct cut-outs
        above = torch.zeros(size, dtype=torch.bool)
        for k, p in enumerate(layers):
            x0, y0, x1, y1 = p["box"]
            name, rgba = cutouts[p["cutout"]]
            resized = np.asarray(Image.fromarray(rgba).resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS))
            assert max(x1 - x0, y1 - y0) == round(p["scale"] * min(size))
            expected = on_canvas(resized, y0, x0, *size)
            mask = torch.from_numpy(expected[..., 3] >= 128)
            assert torch.equal(s.masks[k, 0], mask.float())  # the alpha at the recorded box
            assert torch.equal(s.foregrounds[k][:, mask], chw(expected)[:, mask])
            assert bool((s.foregrounds[k][:, ~mask] == 0.5).all())
            if name != "a golden ring":  # a solid rectangle: the mask is its box clipped to the canvas
                box = torch.zeros(size)
                box[max(y0, 0):y1, max(x0, 0):x1] = 1
                assert torch.equal(s.masks[k, 0], box)
                visible = float((mask & ~above).sum()) / ((x1 - x0) * (y1 - y0))
                assert visible >= min_visible and visible == pytest.approx(p["visible"], abs=1e-5)
            above |= mask
        comp = s.composed()
        top = s.masks[0, 0].bool()
        assert torch.equal(comp[:, top], s.foregrounds[0][:, top])
    assert len(counts) > 1  # the number of layers varies
    again = list(cut.compose_cutout_samples(cutouts, backgrounds, 8, seed=7, size=size, min_visible=min_visible))
    assert all(torch.equal(a.foregrounds, b.foregrounds) and torch.equal(a.masks, b.masks) and a.meta == b.meta
               for a, b in zip(samples, again))
    later = list(cut.compose_cutout_samples(cutouts, backgrounds, 2, seed=7, size=size, min_visible=min_visible,
                                            start=3))
    assert [s.key for s in later] == ["cutout00000003", "cutout00000004"]
    assert all(a.meta == b.meta for a, b in zip(later, samples[3:5]))  # deterministic per (seed, index)
    other = list(cut.compose_cutout_samples(cutouts, backgrounds, 8, seed=8, size=size, min_visible=min_visible))
    assert [a.meta["placement"] for a in other] != [b.meta["placement"] for b in samples]
    assert set(colours)  # the rectangles were all made


@pytest.mark.parametrize("kwargs, match", [
    (dict(cutouts=[]), "no cut-outs"),
    (dict(backgrounds=[]), "no backgrounds"),
    (dict(scale_range=(0.5, 2.0)), "scale_range"),
    (dict(min_foregrounds=2), "only 1 cut-outs"),
    (dict(min_visible=1.5), "min_visible"),
])
def test_bad_composition_arguments_are_refused(kwargs, match):
    rgba = np.full((10, 10, 4), 255, np.uint8)
    args = dict(cutouts=[("a box", rgba)], backgrounds=[("a wall", np.zeros((64, 64, 3), np.uint8))])
    args.update(kwargs)
    with pytest.raises(errors.DatasetError, match=match):
        list(cut.compose_cutout_samples(args.pop("cutouts"), args.pop("backgrounds"), 2, seed=0, **args))
