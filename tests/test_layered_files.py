"""PSD / ORA files that layer editors open (layerdiff_model.layers.layered_files; pure, no ComfyUI).

PSD files are checked with psd-tools (a test-only dependency, an independent reader) and with our own reader.
"""
import io
import os
import struct
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest
from PIL import Image
from comfy_headless.product import product_module, product_names

atomic_file = product_module("layerdiff_model.atomic_file")
F = product_module("layerdiff_model.layers.layered_files")
LayerDiffError = product_names("layerdiff_model.errors", "LayerDiffError")

NAMES_TOP_FIRST = ["a red circle", "Käse ☕ layer 🦊"]


def sample(h=5, w=7, seed=0):
    """Two RGBA foregrounds (binary alpha), an opaque background and their composite (top layer over the rest)."""
    rng = np.random.default_rng(seed)
    fgs = []
    for _ in NAMES_TOP_FIRST:
        rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        rgba[..., 3] = np.where(rng.random((h, w)) > 0.5, 255, 0)
        fgs.append(rgba)
    background = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    composite = background.copy()
    for rgba in reversed(fgs):  # bottom to top
        composite = np.where(rgba[..., 3:] == 255, rgba[..., :3], composite)
    return list(zip(NAMES_TOP_FIRST, fgs)), ("a blue wall", background), composite


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------------------- PSD
def test_psd_opens_in_psd_tools_with_named_layers_alpha_and_composite(tmp_path):
    psd_tools = pytest.importorskip("psd_tools")
    layers, background, composite = sample()
    path = F.write_psd(tmp_path / "out.psd", layers, background, composite)
    doc = psd_tools.PSDImage.open(path)
    assert (doc.version, doc.depth, doc.channels, doc.size) == (1, 8, 3, (7, 5))
    assert doc.color_mode == psd_tools.constants.ColorMode.RGB
    stack = list(doc)  # psd-tools lists bottom first, as the file stores it
    assert [layer.name for layer in stack] == ["a blue wall", "Käse ☕ layer 🦊", "a red circle"]
    assert all(layer.visible and layer.opacity == 255 and layer.bbox == (0, 0, 7, 5) for layer in stack)
    for layer, (_, rgba) in zip(stack[1:], reversed(layers)):
        pil = layer.topil()
        assert pil.mode == "RGBA"  # the transparency channel is there
        assert np.array_equal(np.asarray(pil), rgba)
    bg = np.asarray(stack[0].topil().convert("RGBA"))
    assert np.array_equal(bg[..., :3], background[1]) and (bg[..., 3] == 255).all()
    assert np.array_equal(np.asarray(doc.topil())[..., :3], composite)  # stored merged image
    assert np.array_equal(np.asarray(doc.composite(force=True))[..., :3], composite)  # what an editor renders
    assert listing(tmp_path) == ["out.psd"]


def test_psd_round_trips_through_our_reader(tmp_path):
    layers, background, composite = sample(h=9, w=4, seed=3)
    path = F.write_psd(tmp_path / "out.psd", layers, background[1], composite)  # bare background array
    back = F.read_psd(path)
    assert [name for name, _ in back] == NAMES_TOP_FIRST + ["background"]  # top first
    for (_, got), (_, want) in zip(back, layers):
        assert np.array_equal(got, want)
    assert np.array_equal(back[-1][1][..., :3], background[1]) and (back[-1][1][..., 3] == 255).all()
    data = open(path, "rb").read()
    assert data[:4] == b"8BPS" and struct.unpack(">H", data[4:6])[0] == 1
    assert data.endswith(b"".join(composite[..., c].tobytes() for c in range(3)))  # merged planes last


def test_read_psd_handles_rle_and_offset_layers_from_another_writer(tmp_path):
    psd_tools = pytest.importorskip("psd_tools")
    from psd_tools.api.layers import PixelLayer

    rgb = np.random.default_rng(1).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    doc = psd_tools.PSDImage.new("RGB", (7, 5))
    doc.append(PixelLayer.frompil(Image.fromarray(rgb), doc, "Grüße", top=1, left=2))  # RLE by default
    doc.save(tmp_path / "other.psd")
    [(name, rgba)] = F.read_psd(tmp_path / "other.psd")
    assert name == "Grüße"  # legacy MacRoman name (psd-tools writes no 'luni' block)
    assert np.array_equal(rgba[1:4, 2:6, :3], rgb) and (rgba[1:4, 2:6, 3] == 255).all()
    rgba[1:4, 2:6] = 0
    assert not rgba.any()  # transparent outside the layer's bounds


def test_read_psd_refuses_other_formats_clearly(tmp_path):
    path = tmp_path / "deep.psd"
    path.write_bytes(b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 2, 2, 16, 3) + b"\0" * 16)
    with pytest.raises(F.LayeredFileError, match="only 8-bit RGB"):
        F.read_psd(path)
    (tmp_path / "x.psd").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(LayerDiffError, match="not a PSD"):
        F.read_psd(tmp_path / "x.psd")


def test_psd_size_limit_and_names_are_sanitised(tmp_path):
    wide = np.zeros((1, F.PSD_MAX_SIDE + 1, 3), np.uint8)
    with pytest.raises(F.LayeredFileError, match="at most 30000 px"):
        F.write_psd(tmp_path / "wide.psd", [], wide, wide)
    rgba = np.zeros((2, 2, 4), np.uint8)
    bg = np.zeros((2, 2, 3), np.uint8)
    path = F.write_psd(tmp_path / "n.psd", [("a\x00 cat\non a\tmat", rgba), ("  ", rgba), ("x" * 300, rgba)],
                       ("", bg), bg)
    names = [name for name, _ in F.read_psd(path)]
    assert names == ["a cat on a mat", "layer 2", "x" * 255, "background"]


# ------------------------------------------------------------------------------------------------------- ORA
def test_ora_zip_structure_stack_order_and_pixels(tmp_path):
    layers, background, composite = sample()
    path = F.write_ora(tmp_path / "out.ora", layers, background, composite)
    with zipfile.ZipFile(path) as zf:
        first = zf.infolist()[0]
        assert first.filename == "mimetype" and first.compress_type == zipfile.ZIP_STORED and first.extra == b""
        assert zf.read("mimetype") == b"image/openraster"
        assert open(path, "rb").read()[30:38] == b"mimetype"  # at offset 30, where file(1) looks for it
        root = ET.fromstring(zf.read("stack.xml"))
        assert (root.tag, root.attrib["w"], root.attrib["h"]) == ("image", "7", "5")
        entries = [(node.attrib["name"], node.attrib["src"]) for node in root.iter("layer")]
        assert [name for name, _ in entries] == NAMES_TOP_FIRST + ["a blue wall"]  # top first, background last
        assert all(src.startswith("data/") and src.endswith(".png") and src in zf.namelist() for _, src in entries)
        assert {"mergedimage.png", "Thumbnails/thumbnail.png"} <= set(zf.namelist())
        top = np.asarray(Image.open(io.BytesIO(zf.read(entries[0][1]))))
        merged = np.asarray(Image.open(io.BytesIO(zf.read("mergedimage.png"))).convert("RGB"))
    assert np.array_equal(top, layers[0][1])
    assert np.array_equal(merged, composite)
    back = F.read_ora(path)
    assert [name for name, _ in back] == NAMES_TOP_FIRST + ["a blue wall"]
    assert all(np.array_equal(got, want) for (_, got), (_, want) in zip(back, layers))
    assert np.array_equal(back[2][1][..., :3], background[1]) and (back[2][1][..., 3] == 255).all()
    assert listing(tmp_path) == ["out.ora"]


def test_ora_thumbnail_is_at_most_256_px_and_keeps_the_aspect():
    image = np.zeros((300, 600, 3), np.uint8)
    with zipfile.ZipFile(io.BytesIO(F.ora_bytes([("a", image)], image, image))) as zf:
        thumb = Image.open(io.BytesIO(zf.read("Thumbnails/thumbnail.png")))
        assert thumb.size == (256, 128)
    small = np.zeros((10, 20, 3), np.uint8)
    with zipfile.ZipFile(io.BytesIO(F.ora_bytes([("a", small)], small, small))) as zf:
        assert Image.open(io.BytesIO(zf.read("Thumbnails/thumbnail.png"))).size == (20, 10)


def test_read_ora_places_offset_layers_and_applies_opacity(tmp_path):
    local = np.full((2, 3, 4), 200, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(local).save(buffer, "PNG")
    xml = ('<image w="6" h="4"><stack><layer name="moved" src="data/a.png" x="4" y="1" opacity="0.5"/>'
           "</stack></image>")
    with zipfile.ZipFile(tmp_path / "k.ora", "w") as zf:
        zf.writestr("mimetype", "image/openraster")
        zf.writestr("stack.xml", xml)
        zf.writestr("data/a.png", buffer.getvalue())
    [(name, rgba)] = F.read_ora(tmp_path / "k.ora")
    assert name == "moved" and rgba.shape == (4, 6, 4)
    assert (rgba[1:3, 4:6, :3] == 200).all() and (rgba[1:3, 4:6, 3] == 100).all()  # clipped at the right edge
    rgba[1:3, 4:6] = 0
    assert not rgba.any()


# ----------------------------------------------------------------------------------------------- atomicity
@pytest.mark.parametrize("write", [F.write_psd, F.write_ora])
def test_invalid_input_writes_nothing_and_keeps_the_old_file(tmp_path, write):
    layers, background, composite = sample()
    with pytest.raises(F.LayeredFileError, match="must be uint8"):
        write(tmp_path / "new.out", [("bad", np.zeros((2, 2, 4), np.uint8))], background, composite)
    with pytest.raises(ValueError, match="must be uint8"):
        write(tmp_path / "new.out", layers, background, composite.astype(np.float32))
    assert listing(tmp_path) == []
    target = tmp_path / "old.out"
    target.write_bytes(b"previous")
    with pytest.raises(F.LayeredFileError):
        write(target, layers, (background[0], background[1][:, :3]), composite)
    assert target.read_bytes() == b"previous" and listing(tmp_path) == ["old.out"]


@pytest.mark.parametrize("write", [F.write_psd, F.write_ora])
@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failure_mid_write_removes_the_temp_file_and_keeps_the_old_file(tmp_path, monkeypatch, write, failing):
    layers, background, composite = sample()
    target = tmp_path / "layers.file"
    target.write_bytes(b"previous")

    def boom(*args, **kwargs):
        assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the data went to a temp file first
        raise OSError("disk full")
    monkeypatch.setattr(atomic_file.os, failing, boom)  # the writer every layered file goes through
    with pytest.raises(OSError, match="disk full"):
        write(target, layers, background, composite)
    monkeypatch.undo()
    assert target.read_bytes() == b"previous"
    assert listing(tmp_path) == ["layers.file"]


def test_interrupted_writer_leaves_nothing(tmp_path):
    def half_then_interrupt(fh):
        fh.write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        F.atomic_write(tmp_path / "x.png", half_then_interrupt)
    assert listing(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_successful_write_replaces_the_file_with_normal_permissions(tmp_path):
    layers, background, composite = sample()
    target = tmp_path / "sub" / "out.psd"
    target.parent.mkdir()
    target.write_bytes(b"previous")
    old_umask = os.umask(0o022)
    try:
        F.write_psd(target, layers, background, composite)
    finally:
        os.umask(old_umask)
    assert target.read_bytes()[:4] == b"8BPS"
    assert (target.stat().st_mode & 0o777) == 0o644  # not mkstemp's 0o600
    assert listing(target.parent) == ["out.psd"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_weights_checkpoints_and_grids_get_normal_permissions(tmp_path):
    """Every atomic writer shares layerdiff_model/atomic_file.py: no 0o600 files from mkstemp (a weights file
    copied into another user's ComfyUI must be readable)."""
    import torch

    train_state = product_module("layerdiff_model.training.state")
    validation_grid = product_module("layerdiff_model.training.validation_grid")
    LayerDiffConfig, Site = product_names("layerdiff_model.modules.config", "LayerDiffConfig", "Site")
    LayerDiffModules = product_names("layerdiff_model.modules.container", "LayerDiffModules")
    save_weights = product_names("layerdiff_model.modules.weights", "save_weights")

    old_umask = os.umask(0o022)
    try:
        config = LayerDiffConfig(sites=(Site("input", 1, 0, 32, 4),), context_dim=32, max_foregrounds=1)
        written = [save_weights(tmp_path / "w.safetensors", LayerDiffModules(config)),
                   train_state.atomic_torch_save({"x": torch.zeros(2)}, tmp_path / "c.pt"),
                   validation_grid.save_grid(tmp_path / "g.png", [torch.rand(3, 3, 8, 8)])]
    finally:
        os.umask(old_umask)
    assert [p.stat().st_mode & 0o777 for p in written] == [0o644] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "g.png", "w.safetensors"]
