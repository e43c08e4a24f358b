"""Layered image files that Photoshop, GIMP and Krita open: PSD and OpenRaster (ORA).

Each file holds the background as an opaque bottom layer, every foreground as an RGBA layer named after its
prompt (top layer first in our lists), and the composite as the merged image. Writes are atomic: data goes to a
temporary file in the target folder, is fsynced and renamed over the target; on any error the temporary file is
removed and an existing file at the target is left as it was. Arrays are uint8, ``[H, W, 3]`` or ``[H, W, 4]``.
"""
from __future__ import annotations

import io
import os
import struct
import tempfile
import zipfile
from typing import Callable
from xml.sax.saxutils import quoteattr

import numpy as np

Layer = tuple[str, np.ndarray]  # (name, [H, W, 4] uint8 RGBA)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> str:
    """Call ``write(fh)`` on a temp file next to ``path`` and rename it into place."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _check(layers: list[Layer], background: Layer, composite: np.ndarray) -> tuple[int, int]:
    h, w = composite.shape[:2]
    if composite.ndim != 3 or composite.shape[2] not in (3, 4) or composite.dtype != np.uint8:
        raise ValueError(f"composite must be uint8 [H, W, 3], got {composite.dtype} {composite.shape}")
    for name, array in [background] + list(layers):
        if array.dtype != np.uint8 or array.shape[:2] != (h, w) or array.ndim != 3 or array.shape[2] not in (3, 4):
            raise ValueError(f"layer {name!r} must be uint8 [{h}, {w}, 3|4], got {array.dtype} {array.shape}")
    return h, w


def _rgba(array: np.ndarray) -> np.ndarray:
    if array.shape[2] == 4:
        return array
    return np.concatenate([array, np.full(array.shape[:2] + (1,), 255, np.uint8)], axis=2)


# ------------------------------------------------------------------------------------------------------- PSD
def _pascal_name(name: str) -> bytes:
    raw = name.encode("ascii", "replace")[:255]
    data = bytes([len(raw)]) + raw
    return data + b"\0" * (-len(data) % 4)


def _unicode_name_block(name: str) -> bytes:
    text = name.encode("utf-16-be")
    payload = struct.pack(">I", len(text) // 2) + text
    payload += b"\0" * (-len(payload) % 4)
    return b"8BIMluni" + struct.pack(">I", len(payload)) + payload


def _layer_record(name: str, h: int, w: int) -> bytes:
    channel_bytes = 2 + h * w  # compression flag + raw plane
    record = struct.pack(">iiiiH", 0, 0, h, w, 4)
    for channel_id in (-1, 0, 1, 2):
        record += struct.pack(">hI", channel_id, channel_bytes)
    record += b"8BIMnorm" + struct.pack(">BBBB", 255, 0, 0, 0)  # opacity, clipping, flags (visible), filler
    extra = struct.pack(">I", 0) + struct.pack(">I", 0) + _pascal_name(name) + _unicode_name_block(name)
    return record + struct.pack(">I", len(extra)) + extra


def _layer_channels(rgba: np.ndarray) -> bytes:
    planes = [rgba[..., 3], rgba[..., 0], rgba[..., 1], rgba[..., 2]]  # alpha (-1), R, G, B
    return b"".join(struct.pack(">H", 0) + np.ascontiguousarray(p).tobytes() for p in planes)


def psd_bytes(layers_top_first: list[Layer], background: Layer, composite: np.ndarray) -> bytes:
    h, w = _check(layers_top_first, background, composite)
    bottom_first = [background] + list(reversed(layers_top_first))
    records = b"".join(_layer_record(name, h, w) for name, _ in bottom_first)
    channels = b"".join(_layer_channels(_rgba(array)) for _, array in bottom_first)
    layer_info = struct.pack(">h", len(bottom_first)) + records + channels
    layer_info += b"\0" * (len(layer_info) % 2)
    layer_and_mask = struct.pack(">I", len(layer_info)) + layer_info + struct.pack(">I", 0)
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3)  # version 1, 3 channels, 8 bit, RGB
    merged = struct.pack(">H", 0) + b"".join(np.ascontiguousarray(composite[..., c]).tobytes() for c in range(3))
    return (header + struct.pack(">I", 0) + struct.pack(">I", 0) + struct.pack(">I", len(layer_and_mask))
            + layer_and_mask + merged)


def write_psd(path, layers_top_first: list[Layer], background: Layer, composite: np.ndarray) -> str:
    """Adobe PSD (8-bit RGB, raw channels): background at the bottom, foregrounds above it, composite merged."""
    data = psd_bytes(layers_top_first, background, composite)
    return atomic_write(path, lambda fh: fh.write(data))


# ------------------------------------------------------------------------------------------------------- ORA
def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def ora_bytes(layers_top_first: list[Layer], background: Layer, composite: np.ndarray) -> bytes:
    from PIL import Image

    h, w = _check(layers_top_first, background, composite)
    stack = [(name, f"data/layer{i}.png", array) for i, (name, array) in enumerate(layers_top_first, start=1)]
    stack.append((background[0], "data/background.png", background[1]))
    entries = "".join(
        f'    <layer name={quoteattr(name)} src="{src}" x="0" y="0" opacity="1.0" visibility="visible" '
        'composite-op="svg:src-over"/>\n' for name, src, _ in stack)
    xml = (f"<?xml version='1.0' encoding='UTF-8'?>\n<image version=\"0.0.3\" w=\"{w}\" h=\"{h}\">\n  <stack>\n"
           f"{entries}  </stack>\n</image>\n")
    thumb = Image.fromarray(composite[..., :3])
    thumb.thumbnail((256, 256))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(zipfile.ZipInfo("mimetype"), "image/openraster", compress_type=zipfile.ZIP_STORED)
        zf.writestr("stack.xml", xml, compress_type=zipfile.ZIP_DEFLATED)
        for _, src, array in stack:
            zf.writestr(src, _png(_rgba(array)), compress_type=zipfile.ZIP_STORED)
        zf.writestr("mergedimage.png", _png(composite[..., :3]), compress_type=zipfile.ZIP_STORED)
        zf.writestr("Thumbnails/thumbnail.png", _png(np.asarray(thumb)), compress_type=zipfile.ZIP_STORED)
    return buffer.getvalue()


def write_ora(path, layers_top_first: list[Layer], background: Layer, composite: np.ndarray) -> str:
    """OpenRaster: stack.xml lists the top layer first and the background last."""
    data = ora_bytes(layers_top_first, background, composite)
    return atomic_write(path, lambda fh: fh.write(data))


def read_ora(path) -> list[Layer]:
    """Layers of an ORA file, top first, as (name, RGBA uint8 [H, W, 4])."""
    import xml.etree.ElementTree as ET

    from PIL import Image

    with zipfile.ZipFile(path) as zf:
        root = ET.fromstring(zf.read("stack.xml"))
        layers = []
        for node in root.iter("layer"):
            with Image.open(io.BytesIO(zf.read(node.attrib["src"]))) as im:
                layers.append((node.attrib.get("name", ""), np.asarray(im.convert("RGBA"))))
    return layers
