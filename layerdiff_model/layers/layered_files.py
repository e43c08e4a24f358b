"""Layered image files that Photoshop, GIMP and Krita open: Adobe PSD and OpenRaster (ORA).

LayerDiff generates a background, N foreground layers and their masks; these files keep them as editable layers:
the background is an opaque layer at the bottom, every foreground is an RGBA layer (alpha = mask) named after its
prompt, and the composite is stored as the file's merged image. Our lists are top layer first (as in the paper,
k = 1 is the top); PSD stores layer records bottom first, ORA's stack.xml lists the top layer first.

Writes are atomic: the file is written to a temporary file in the target folder, fsynced and renamed over the
target (``os.replace``); on any error the temporary file is removed and an existing file at the target is left as
it was. Arrays are uint8 ``[H, W, 3]`` or ``[H, W, 4]``. Pure Python + numpy + Pillow (no ComfyUI).
"""
from __future__ import annotations

import io
import re
import struct
import zipfile
import zlib
from typing import Sequence, Union

import numpy as np

from ..atomic_file import atomic_write  # noqa: F401  (also used by the save node)
from ..errors import LayerDiffError

Layer = tuple[str, np.ndarray]  # (name, uint8 [H, W, 4] RGBA or [H, W, 3] RGB)
Background = Union[np.ndarray, Layer]  # uint8 [H, W, 3] or (name, array)

# The layered-file choice of the save node and of the headless runner's --layered-file. Workflows store the value:
# never rename one.
LAYERED_FILE_CHOICES = ("psd", "ora", "psd+ora", "none")
PSD_MAX_SIDE = 30000  # PSD version 1 limit (larger needs PSB)
MAX_NAME_CHARS = 255  # Photoshop's layer name limit
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class LayeredFileError(LayerDiffError, ValueError):
    """Layers cannot be written to, or read from, a layered file (wrong shapes or dtype, unsupported file)."""


# ---------------------------------------------------------------------------------------------- validation
def layered_file_formats(choice: str) -> tuple[str, ...]:
    """The file formats one of :data:`LAYERED_FILE_CHOICES` writes: ``"psd+ora"`` -> ``("psd", "ora")``,
    ``"none"`` -> ``()``."""
    if choice not in LAYERED_FILE_CHOICES:
        raise LayerDiffError(f"layered file {choice!r} is not one of {', '.join(LAYERED_FILE_CHOICES)}")
    return () if choice == "none" else tuple(choice.split("+"))


def _clean_name(name, fallback: str) -> str:
    text = _CONTROL_CHARS.sub("", str(name)).replace("\r", " ").replace("\n", " ").replace("\t", " ").strip()
    return text[:MAX_NAME_CHARS] or fallback


def _check_array(what: str, array, h: int, w: int) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[:2] != (h, w) or array.shape[2] not in (3, 4):
        raise LayeredFileError(
            f"{what} must be uint8 [{h}, {w}, 3|4] like the composite, got {array.dtype} {tuple(array.shape)}.")
    return array


def _prepare(layers_top_first: Sequence[Layer], background: Background,
             composite: np.ndarray, background_name: str) -> tuple[list[Layer], Layer, np.ndarray]:
    """Validate every array; returns (RGBA layers top first, (name, opaque RGBA background), RGB composite)."""
    composite = np.asarray(composite)
    if composite.dtype != np.uint8 or composite.ndim != 3 or composite.shape[2] not in (3, 4):
        raise LayeredFileError(f"composite must be uint8 [H, W, 3], got {composite.dtype} {tuple(composite.shape)}.")
    h, w = composite.shape[:2]
    if h < 1 or w < 1:
        raise LayeredFileError(f"composite is empty ({h}x{w}).")
    if isinstance(background, tuple):
        background_name, background = background
    bg = _check_array(f"background layer {background_name!r}", background, h, w)
    bg = np.concatenate([bg[..., :3], np.full((h, w, 1), 255, np.uint8)], axis=2)  # opaque [H, W, 4]
    out = []
    for i, item in enumerate(layers_top_first, start=1):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise LayeredFileError(f"foreground layer {i} must be a (name, array) pair, got {type(item).__name__}.")
        name, array = item
        out.append((_clean_name(name, f"layer {i}"), _rgba(_check_array(f"layer {name!r}", array, h, w))))
    return out, (_clean_name(background_name, "background"), bg), np.ascontiguousarray(composite[..., :3])


def _rgba(array: np.ndarray) -> np.ndarray:
    """[H, W, 3|4] -> [H, W, 4] (opaque when there is no alpha)."""
    if array.shape[2] == 4:
        return array
    return np.concatenate([array, np.full(array.shape[:2] + (1,), 255, np.uint8)], axis=2)


# ------------------------------------------------------------------------------------------------------- PSD
def _pascal_name(name: str) -> bytes:
    """Legacy layer name: Pascal string (length byte + MacRoman text), padded to a multiple of 4 bytes.
    Editors read the full Unicode name from the 'luni' block; this one is for old readers."""
    raw = name.encode("mac_roman", "replace")[:255]
    data = bytes([len(raw)]) + raw
    return data + b"\0" * (-len(data) % 4)


def _unicode_name_block(name: str) -> bytes:
    """'luni' additional layer info: the full Unicode name (UTF-16 code-unit count + UTF-16BE text)."""
    text = name.encode("utf-16-be")
    payload = struct.pack(">I", len(text) // 2) + text
    payload += b"\0" * (-len(payload) % 4)
    return b"8BIMluni" + struct.pack(">I", len(payload)) + payload


def _layer_record(name: str, h: int, w: int) -> bytes:
    channel_bytes = 2 + h * w  # compression flag + raw plane
    record = struct.pack(">iiiiH", 0, 0, h, w, 4)  # top, left, bottom, right, channel count
    for channel_id in (-1, 0, 1, 2):  # transparency, R, G, B
        record += struct.pack(">hI", channel_id, channel_bytes)
    record += b"8BIMnorm" + struct.pack(">BBBB", 255, 0, 0, 0)  # opacity, clipping, flags (0 = visible), filler
    extra = struct.pack(">I", 0) + struct.pack(">I", 0) + _pascal_name(name) + _unicode_name_block(name)  # no mask,
    return record + struct.pack(">I", len(extra)) + extra  # no blending ranges, names


def _layer_channels(rgba: np.ndarray) -> bytes:
    planes = [rgba[..., 3], rgba[..., 0], rgba[..., 1], rgba[..., 2]]  # same order as the record: -1, 0, 1, 2
    return b"".join(struct.pack(">H", 0) + np.ascontiguousarray(p).tobytes() for p in planes)  # 0 = raw


def psd_bytes(layers_top_first: Sequence[Layer], background: Background, composite: np.ndarray,
              background_name: str = "background") -> bytes:
    """The bytes of a PSD file (version 1, 8-bit RGB, raw channel data)."""
    layers, bg, merged = _prepare(layers_top_first, background, composite, background_name)
    h, w = merged.shape[:2]
    if max(h, w) > PSD_MAX_SIDE:
        raise LayeredFileError(f"PSD files hold at most {PSD_MAX_SIDE} px per side, the image is {w}x{h}; save ORA.")
    bottom_first = [bg] + list(reversed(layers))
    records = b"".join(_layer_record(name, h, w) for name, _ in bottom_first)
    channels = b"".join(_layer_channels(array) for _, array in bottom_first)
    layer_info = struct.pack(">h", len(bottom_first)) + records + channels
    layer_info += b"\0" * (len(layer_info) % 2)  # length is rounded up to even
    layer_and_mask = struct.pack(">I", len(layer_info)) + layer_info + struct.pack(">I", 0)  # no global mask
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3)  # version 1, 3 channels, h, w, 8 bit, RGB
    planes = b"".join(np.ascontiguousarray(merged[..., c]).tobytes() for c in range(3))  # planar R, G, B
    return (header + struct.pack(">I", 0) + struct.pack(">I", 0)  # no colour-mode data, no image resources
            + struct.pack(">I", len(layer_and_mask)) + layer_and_mask + struct.pack(">H", 0) + planes)


def write_psd(path, layers_top_first: Sequence[Layer], background: Background, composite: np.ndarray,
              background_name: str = "background") -> str:
    """Write an Adobe PSD: ``background`` (array or (name, array)) as the opaque bottom layer, the foregrounds
    above it (given top first), ``composite`` as the merged image. Atomic; returns the path."""
    data = psd_bytes(layers_top_first, background, composite, background_name)
    return atomic_write(path, lambda fh: fh.write(data))


def _packbits_decode(data: bytes, size: int) -> bytes:
    out, i = bytearray(), 0
    while len(out) < size and i < len(data):
        n = data[i]
        i += 1
        if n < 128:  # n + 1 literal bytes
            out += data[i:i + n + 1]
            i += n + 1
        elif n > 128:  # next byte repeated 257 - n times
            out += data[i:i + 1] * (257 - n)
            i += 1
    if len(out) != size:
        raise LayeredFileError("Corrupted RLE channel data in the PSD file.")
    return bytes(out)


def _read_plane(fh: io.BytesIO, length: int, h: int, w: int) -> np.ndarray:
    """One channel's image data (compression flag included) -> uint8 [h, w]."""
    data = fh.read(length)
    compression, body = struct.unpack(">H", data[:2])[0], data[2:]
    if h * w == 0:
        return np.zeros((h, w), np.uint8)
    if compression == 0:
        raw = body[:h * w]
    elif compression == 1:  # PackBits per row, after a table of h 2-byte row lengths
        sizes = struct.unpack(f">{h}H", body[:2 * h])
        pos, rows = 2 * h, []
        for n in sizes:
            rows.append(_packbits_decode(body[pos:pos + n], w))
            pos += n
        raw = b"".join(rows)
    elif compression in (2, 3):  # ZIP, without / with per-row delta prediction
        raw = zlib.decompress(body)
        if compression == 3:
            plane = np.frombuffer(raw, np.uint8).reshape(h, w)  # [h, w] deltas
            return np.cumsum(plane, axis=1, dtype=np.uint64).astype(np.uint8)  # running sum mod 256
    else:
        raise LayeredFileError(f"Unknown PSD channel compression {compression}.")
    if len(raw) != h * w:
        raise LayeredFileError("Truncated channel data in the PSD file.")
    return np.frombuffer(raw, np.uint8).reshape(h, w).copy()  # [h, w]


def _take(f: io.BytesIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise LayeredFileError(f"the file ends early (wanted {n} bytes at offset {f.tell() - len(data)}, "
                               f"found {len(data)})")
    return data


def _parse_record(f: io.BytesIO) -> dict:
    """One PSD layer record: bounds, channels, name, flags (bit 1 = hidden), opacity, section type (1/2 = group
    open/closed, 3 = group end: a divider without pixels of its own) and the user mask."""
    top, left, bottom, right, count = struct.unpack(">iiiiH", _take(f, 18))
    channels = [struct.unpack(">hI", _take(f, 6)) for _ in range(count)]
    sig, _blend, opacity, _clipping, flags, _filler = struct.unpack(">4s4sBBBB", _take(f, 12))
    if sig not in (b"8BIM", b"8B64"):
        raise LayeredFileError(f"bad layer record signature {sig!r}")
    extra = io.BytesIO(_take(f, struct.unpack(">I", _take(f, 4))[0]))
    mask_data = _take(extra, struct.unpack(">I", _take(extra, 4))[0])
    mask = None
    if len(mask_data) >= 18:  # top, left, bottom, right, default colour, flags (bit 1 = disabled)
        mt, ml, mb, mr, default, mflags = struct.unpack(">iiiiBB", mask_data[:18])
        if not mflags & 2:
            mask = {"bounds": (mt, ml, mb, mr), "default": default}
    _take(extra, struct.unpack(">I", _take(extra, 4))[0])  # blending ranges
    n = _take(extra, 1)[0]
    name = _take(extra, n).decode("mac_roman")
    extra.read(-(n + 1) % 4)
    section = 0
    while True:
        head = extra.read(12)
        if len(head) < 12 or head[:4] not in (b"8BIM", b"8B64"):
            break
        key, size = head[4:8], struct.unpack(">I", head[8:12])[0]
        block = extra.read(size)
        if key == b"luni" and len(block) >= 4:
            chars = struct.unpack(">I", block[:4])[0]
            name = block[4:4 + 2 * chars].decode("utf-16-be", "replace")
        elif key in (b"lsct", b"lsdk") and len(block) >= 4:
            section = struct.unpack(">I", block[:4])[0]  # 1/2 = group open/closed, 3 = group end
    return {"bounds": (top, left, bottom, right), "channels": channels, "name": name, "hidden": bool(flags & 2),
            "opacity": opacity / 255, "section": section, "mask": mask}


def read_psd(path) -> list[Layer]:
    """Layers of an 8-bit RGB PSD, top first, as (name, RGBA uint8 [H, W, 4]) placed on the full canvas.

    Minimal reader (for files written by :func:`write_psd` and simple files from other editors): group markers
    are skipped; layer masks, opacity, blend modes and effects are ignored.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    f = io.BytesIO(data)
    sig, version, channels, h, w, depth, mode = struct.unpack(">4sH6xHIIHH", f.read(26))
    if sig != b"8BPS" or version != 1:
        raise LayeredFileError(f"{path}: not a PSD file (or a PSB large-document file, which is not supported).")
    if depth != 8 or mode != 3:
        raise LayeredFileError(f"{path}: only 8-bit RGB PSD files are supported, found {depth}-bit colour mode "
                               f"{mode}; convert it to 8-bit RGB in your editor.")
    for _ in range(2):  # colour-mode data, image resources
        f.read(struct.unpack(">I", f.read(4))[0])
    if struct.unpack(">I", f.read(4))[0] == 0:
        return []
    info_length = struct.unpack(">I", f.read(4))[0]
    if info_length == 0:
        return []
    count = abs(struct.unpack(">h", f.read(2))[0])
    records = [_parse_record(f) for _ in range(count)]
    layers = []
    for rec in records:  # bottom first
        top, left, bottom, right = rec["bounds"]
        lh, lw = max(bottom - top, 0), max(right - left, 0)
        planes = {cid: _read_plane(f, length, lh, lw) for cid, length in rec["channels"]}
        if rec["section"] in (1, 2, 3):  # group start/end marker, no pixels of its own
            continue
        local = np.zeros((lh, lw, 4), np.uint8)  # [lh, lw, 4]
        for c in range(3):
            if c in planes:
                local[..., c] = planes[c]
        local[..., 3] = planes.get(-1, np.full((lh, lw), 255, np.uint8))
        layers.append((rec["name"], _place(local, top, left, h, w)))
    return layers[::-1]


def _place(local: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    """Paste a layer [lh, lw, 4] at (top, left) onto a transparent [h, w, 4] canvas, clipping what falls outside."""
    canvas = np.zeros((h, w, 4), np.uint8)
    lh, lw = local.shape[:2]
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + lh, h), min(left + lw, w)
    if y1 > y0 and x1 > x0:
        canvas[y0:y1, x0:x1] = local[y0 - top:y1 - top, x0 - left:x1 - left]
    return canvas


# ------------------------------------------------------------------------------------------------------- ORA
def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _stack_xml(stack: list[tuple[str, str]], h: int, w: int) -> str:
    from xml.sax.saxutils import quoteattr

    entries = "".join(
        f'    <layer name={quoteattr(name)} src="{src}" x="0" y="0" opacity="1.0" visibility="visible" '
        'composite-op="svg:src-over"/>\n' for name, src in stack)
    return (f"<?xml version='1.0' encoding='UTF-8'?>\n<image version=\"0.0.3\" w=\"{w}\" h=\"{h}\">\n  <stack>\n"
            f"{entries}  </stack>\n</image>\n")


def ora_bytes(layers_top_first: Sequence[Layer], background: Background, composite: np.ndarray,
              background_name: str = "background") -> bytes:
    """The bytes of an OpenRaster file."""
    from PIL import Image

    layers, bg, merged = _prepare(layers_top_first, background, composite, background_name)
    h, w = merged.shape[:2]
    stack = [(name, f"data/layer{i}.png", array) for i, (name, array) in enumerate(layers, start=1)]
    stack.append((bg[0], "data/background.png", bg[1]))  # top first, background last
    thumb = Image.fromarray(merged)
    thumb.thumbnail((256, 256))  # keeps the aspect ratio, never enlarges
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(zipfile.ZipInfo("mimetype"), "image/openraster", compress_type=zipfile.ZIP_STORED)  # first
        zf.writestr("stack.xml", _stack_xml([(n, s) for n, s, _ in stack], h, w), compress_type=zipfile.ZIP_DEFLATED)
        for _, src, array in stack:
            zf.writestr(src, _png(array), compress_type=zipfile.ZIP_STORED)  # PNG is compressed already
        zf.writestr("mergedimage.png", _png(merged), compress_type=zipfile.ZIP_STORED)
        zf.writestr("Thumbnails/thumbnail.png", _png(np.asarray(thumb)), compress_type=zipfile.ZIP_STORED)
    return buffer.getvalue()


def write_ora(path, layers_top_first: Sequence[Layer], background: Background, composite: np.ndarray,
              background_name: str = "background") -> str:
    """Write an OpenRaster file (Krita, GIMP): stack.xml lists the top layer first and the background last.
    Same inputs as :func:`write_psd`. Atomic; returns the path."""
    data = ora_bytes(layers_top_first, background, composite, background_name)
    return atomic_write(path, lambda fh: fh.write(data))


def read_ora(path) -> list[Layer]:
    """Layers of an ORA file, top first, as (name, RGBA uint8 [H, W, 4]) placed on the full canvas.

    Minimal reader: x/y offsets and opacity are applied; nested stacks are flattened; visibility and blend modes
    are ignored.
    """
    import xml.etree.ElementTree as ET

    from PIL import Image

    with zipfile.ZipFile(path) as zf:
        root = ET.fromstring(zf.read("stack.xml"))
        h, w = int(root.attrib["h"]), int(root.attrib["w"])
        layers = []
        for node in root.iter("layer"):
            with Image.open(io.BytesIO(zf.read(node.attrib["src"]))) as im:
                local = np.asarray(im.convert("RGBA")).copy()  # [lh, lw, 4]
            opacity = float(node.attrib.get("opacity", "1"))
            if opacity < 1:
                local[..., 3] = np.round(local[..., 3] * max(opacity, 0.0)).astype(np.uint8)
            x, y = int(float(node.attrib.get("x", "0"))), int(float(node.attrib.get("y", "0")))
            layers.append((node.attrib.get("name", ""), _place(local, y, x, h, w)))
    return layers
