"""Layer split / compose / RGBA and the PSD / ORA writers (pure, no ComfyUI)."""
import zipfile

import numpy as np
import pytest
import torch

from layerdiff_model import compose as C
from layerdiff_model import layered_files as F
from layerdiff_model.errors import LayoutError
from layerdiff_model.slots import pack


def known_layers(b=2, n=2, h=8, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(b, n, h, w, generator=g) > 0.5).float()
    return C.LayeredImages(torch.rand(b, h, w, 3, generator=g), torch.rand(b, n, h, w, 3, generator=g), masks,
                           ["bg"] + [f"fg{i}" for i in range(1, n + 1)])


def test_compose_matches_the_paper_equation_by_hand():
    background = torch.full((1, 1, 2, 3), 0.1)  # [B, H, W, 3] with H=1, W=2
    fg = torch.stack([torch.full((1, 2, 3), 0.9), torch.full((1, 2, 3), 0.5)]).unsqueeze(0)  # [1, 2, 1, 2, 3]
    masks = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]]])  # top covers pixel 0 only, second covers both
    out = C.compose(C.LayeredImages(background, fg, masks))
    assert torch.allclose(out[0, 0, 0], torch.full((3,), 0.9))  # top layer wins where masks overlap
    assert torch.allclose(out[0, 0, 1], torch.full((3,), 0.5))
    soft = C.compose(C.LayeredImages(background, fg, masks * 0.5))
    # pixel 1: 0.5*0.5 (layer 2) + 0.1*0.5 (background)
    assert torch.allclose(soft[0, 0, 1], torch.full((3,), 0.3))


def test_split_of_decoded_slots_round_trips_and_composes():
    layers = known_layers()
    slots = C.layers_to_slot_images(layers)  # [B*S, H, W, 3]
    assert slots.shape == (2 * 5, 8, 6, 3)
    split = C.split_decoded_slots(slots, 2)
    for a, b in ((split.background, layers.background), (split.foregrounds, layers.foregrounds),
                 (split.masks, layers.masks)):
        assert torch.equal(a, b)
    assert torch.equal(C.compose(split), C.compose(layers))
    with pytest.raises(LayoutError, match="not whole layered images"):
        C.split_decoded_slots(slots[:-1], 2)


def test_decoded_masks_are_binarized():
    layers = known_layers(b=1, n=1)
    slots = C.layers_to_slot_images(layers) * 0.8 + 0.1  # VAE-ish grey levels
    split = C.split_decoded_slots(slots, 1)
    assert set(split.masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(split.masks, layers.masks)
    soft = C.split_decoded_slots(slots, 1, binarize=False)
    assert 0.05 < soft.masks.min() and soft.masks.max() < 0.95


def test_rgba_round_trip():
    layers = known_layers()
    rgba = C.to_rgba(layers)
    assert rgba.shape == (2, 2, 8, 6, 4)
    rgb, alpha = C.rgba_to_layer(rgba)
    assert torch.equal(rgb, layers.foregrounds) and torch.equal(alpha, layers.masks)


def _arrays(h=5, w=7):
    rng = np.random.default_rng(0)
    top = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    second = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    background = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    composite = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return [("a red circle", top), ("Käse ☕ layer", second)], ("a blue wall", background), composite


def test_psd_opens_with_named_layers_and_pixels(tmp_path):
    psd_tools = pytest.importorskip("psd_tools")
    layers, background, composite = _arrays()
    path = F.write_psd(tmp_path / "out.psd", layers, background, composite)
    doc = psd_tools.PSDImage.open(path)
    assert doc.size == (7, 5)
    assert [layer.name for layer in doc] == ["a blue wall", "Käse ☕ layer", "a red circle"]  # bottom first
    top = np.asarray(list(doc)[-1].topil())
    assert np.array_equal(top, layers[0][1])
    assert np.array_equal(np.asarray(doc.topil())[..., :3], composite)
    assert [p.name for p in tmp_path.iterdir()] == ["out.psd"]


def test_ora_structure_and_pixels(tmp_path):
    layers, background, composite = _arrays()
    path = F.write_ora(tmp_path / "out.ora", layers, background, composite)
    with zipfile.ZipFile(path) as zf:
        first = zf.infolist()[0]
        assert first.filename == "mimetype" and first.compress_type == zipfile.ZIP_STORED
        assert zf.read("mimetype") == b"image/openraster"
        assert {"stack.xml", "mergedimage.png", "Thumbnails/thumbnail.png"} <= set(zf.namelist())
    back = F.read_ora(path)
    assert [name for name, _ in back] == ["a red circle", "Käse ☕ layer", "a blue wall"]  # top first
    assert np.array_equal(back[0][1], layers[0][1])
    assert np.array_equal(back[2][1][..., :3], background[1]) and (back[2][1][..., 3] == 255).all()


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    layers, background, composite = _arrays()
    target = tmp_path / "out.psd"
    target.write_bytes(b"previous")
    with pytest.raises(ValueError, match="must be uint8"):
        F.write_psd(target, [("bad", np.zeros((2, 2, 4), np.uint8))], background, composite)

    def failing(fh):
        fh.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        F.atomic_write(target, failing)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.psd"]
