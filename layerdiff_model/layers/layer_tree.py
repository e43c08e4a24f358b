"""Layered files with their structure: groups, hidden flags and opacity (for dataset import).

:mod:`.layered_files` reads a PSD or ORA flattened into pixel layers (what the Load Layered File node needs);
the readers here keep the tree, so :mod:`..data.construction.layered_file_import` can merge groups and drop
hidden layers as docs/DATASET.md describes. 8-bit RGB PSD only; blend modes, clipping masks and effects are
ignored (layers composite as "normal").
"""
from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .layered_files import LayeredFileError, _parse_record, _place, _read_plane, _take

@dataclass
class TreeNode:
    """One entry of a layered file: a pixel layer (``rgba`` uint8 [H, W, 4] on the canvas, clipped to it, layer
    opacity and an enabled PSD layer mask already applied to alpha) or a group (``children`` top first,
    ``opacity`` still to be applied to the group's composite). ``visible`` is the entry's own flag only."""

    name: str
    visible: bool = True
    rgba: np.ndarray | None = None
    children: list["TreeNode"] = field(default_factory=list)
    is_group: bool = False
    opacity: float = 1.0

    def pixel_layers(self) -> list["TreeNode"]:
        """This layer, or every pixel layer inside this group (at any depth)."""
        return [self] if not self.is_group else [p for c in self.children for p in c.pixel_layers()]


@dataclass
class LayerTree:
    """A layered file's canvas size (H, W) and its top-level entries, top first."""

    size: tuple[int, int]
    layers: list[TreeNode]


class PsdColourModeError(LayeredFileError):
    """The PSD is not 8-bit RGB (16/32-bit, CMYK, grayscale, indexed ...)."""


def _tree_layer_pixels(f: io.BytesIO, rec: dict, h: int, w: int) -> np.ndarray | None:
    """Read one record's channel data (always, to keep the stream in step); RGBA on the canvas or None."""
    top, left, bottom, right = rec["bounds"]
    lh, lw = max(bottom - top, 0), max(right - left, 0)
    planes = {}
    for cid, length in rec["channels"]:
        if cid in (-1, 0, 1, 2):
            planes[cid] = _read_plane(io.BytesIO(_take(f, length)), length, lh, lw)
        elif cid == -2 and rec["mask"] is not None:
            mt, ml, mb, mr = rec["mask"]["bounds"]
            planes[cid] = _read_plane(io.BytesIO(_take(f, length)), length, max(mb - mt, 0), max(mr - ml, 0))
        else:
            _take(f, length)
    if rec["section"] in (1, 2, 3):
        return None
    local = np.zeros((lh, lw, 4), np.uint8)  # [lh, lw, 4]
    for c in range(3):
        if c in planes:
            local[..., c] = planes[c]
    local[..., 3] = planes.get(-1, np.full((lh, lw), 255, np.uint8))
    rgba = _place(local, top, left, h, w)  # [h, w, 4]
    alpha = rgba[..., 3].astype(np.float32) * rec["opacity"]
    if -2 in planes:  # the user mask: its own rectangle, the default colour outside it
        mt, ml = rec["mask"]["bounds"][:2]
        full = np.full((h, w), rec["mask"]["default"], np.uint8)
        plane = planes[-2]
        y0, x0, y1, x1 = max(mt, 0), max(ml, 0), min(mt + plane.shape[0], h), min(ml + plane.shape[1], w)
        if y1 > y0 and x1 > x0:
            full[y0:y1, x0:x1] = plane[y0 - mt:y1 - mt, x0 - ml:x1 - ml]
        alpha = alpha * (full.astype(np.float32) / 255)
    rgba[..., 3] = np.round(alpha).astype(np.uint8)
    return rgba


def _psd_canvas(f: io.BytesIO, path) -> tuple[int, int]:
    sig, version, _channels, h, w, depth, mode = struct.unpack(">4sH6xHIIHH", _take(f, 26))
    if sig != b"8BPS" or version != 1:
        raise LayeredFileError("not a PSD file (or a PSB large-document file, which is not supported)")
    if depth != 8 or mode != 3:
        modes = {0: "bitmap", 1: "grayscale", 2: "indexed", 3: "RGB", 4: "CMYK", 7: "multichannel",
                 8: "duotone", 9: "Lab"}
        raise PsdColourModeError(f"{path}: only 8-bit RGB PSD files are supported, found {depth}-bit "
                                 f"{modes.get(mode, f'colour mode {mode}')}; convert it to 8-bit RGB in your editor.")
    return h, w


def read_psd_tree(path) -> LayerTree:
    """The layer tree of an 8-bit RGB PSD: groups (from the 'lsct' section dividers), hidden flags (record flags
    bit 1), layer opacity and enabled layer masks. Blend modes, clipping masks, effects and adjustment layers are
    ignored (pixel layers are composited with "normal"). Raises :class:`LayeredFileError` for truncated or corrupt
    files and :class:`PsdColourModeError` for other colour modes / bit depths."""
    with open(path, "rb") as fh:
        data = fh.read()
    f = io.BytesIO(data)
    try:
        h, w = _psd_canvas(f, path)
        for _ in range(2):  # colour-mode data, image resources
            _take(f, struct.unpack(">I", _take(f, 4))[0])
        if struct.unpack(">I", _take(f, 4))[0] == 0:
            return LayerTree((h, w), [])
        info_length = struct.unpack(">I", _take(f, 4))[0]
        if info_length == 0:
            return LayerTree((h, w), [])
        count = abs(struct.unpack(">h", _take(f, 2))[0])
        records = [_parse_record(f) for _ in range(count)]
        pixels = [_tree_layer_pixels(f, rec, h, w) for rec in records]  # bottom first
    except PsdColourModeError:
        raise
    except (LayeredFileError, struct.error, zlib.error, ValueError, IndexError) as e:
        raise LayeredFileError(f"{path}: truncated or corrupt PSD file ({e}).") from e
    root: list[TreeNode] = []
    stack = [root]
    for rec, rgba in reversed(list(zip(records, pixels))):  # top first: group header, children, group end
        if rec["section"] in (1, 2):
            group = TreeNode(rec["name"], not rec["hidden"], None, [], True, rec["opacity"])
            stack[-1].append(group)
            stack.append(group.children)
        elif rec["section"] == 3:
            if len(stack) > 1:
                stack.pop()
        else:
            stack[-1].append(TreeNode(rec["name"], not rec["hidden"], rgba))
    return LayerTree((h, w), root)


def read_ora_tree(path) -> LayerTree:
    """The layer tree of an OpenRaster file: nested ``<stack>`` elements are groups, ``visibility="hidden"``
    hides a layer or stack, ``opacity`` and ``x``/``y`` offsets (of layers and of stacks) are applied; blend modes
    are ignored. Raises :class:`LayeredFileError` for a missing stack.xml, a missing layer PNG or a broken zip."""
    import xml.etree.ElementTree as ET

    from PIL import Image

    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "stack.xml" not in names:
                raise LayeredFileError(f"{path}: the ORA (zip) file has no stack.xml, so its layers are unknown.")
            root = ET.fromstring(zf.read("stack.xml"))
            h, w = int(root.attrib["h"]), int(root.attrib["w"])
            top = root.find("stack")

            def entries(stack, dx: int, dy: int) -> list[TreeNode]:
                out = []
                for node in stack:
                    visible = node.attrib.get("visibility", "visible") != "hidden"
                    opacity = min(max(float(node.attrib.get("opacity", "1")), 0.0), 1.0)
                    x = dx + int(float(node.attrib.get("x", "0")))
                    y = dy + int(float(node.attrib.get("y", "0")))
                    name = node.attrib.get("name", "")
                    if node.tag == "stack":
                        out.append(TreeNode(name, visible, None, entries(node, x, y), True, opacity))
                    elif node.tag == "layer":
                        src = node.attrib.get("src", "")
                        if src not in names:
                            raise LayeredFileError(f"{path}: layer {name!r} points at {src!r}, which is not in the "
                                                   "file.")
                        with Image.open(io.BytesIO(zf.read(src))) as im:
                            local = np.asarray(im.convert("RGBA")).copy()  # [lh, lw, 4]
                        local[..., 3] = np.round(local[..., 3] * opacity).astype(np.uint8)
                        out.append(TreeNode(name, visible, _place(local, y, x, h, w)))
                return out

            layers = entries(top, 0, 0) if top is not None else []
    except LayeredFileError:
        raise
    except (zipfile.BadZipFile, ET.ParseError, KeyError, ValueError, OSError, EOFError, zlib.error) as e:
        raise LayeredFileError(f"{path}: truncated or corrupt ORA file ({type(e).__name__}: {e}).") from e
    return LayerTree((h, w), layers)


def read_layer_tree(path) -> LayerTree:
    """:func:`read_psd_tree` or :func:`read_ora_tree`, by the file's extension (.psd / .ora)."""
    suffix = str(path).lower().rsplit(".", 1)[-1]
    if suffix == "psd":
        return read_psd_tree(path)
    if suffix == "ora":
        return read_ora_tree(path)
    raise LayeredFileError(f"{path}: not a .psd or .ora file.")


def flatten_visible(nodes: Sequence[TreeNode], h: int, w: int) -> np.ndarray:
    """Alpha-composite ("normal", straight alpha) the visible entries (top first; groups recursively, with their
    opacity; hidden entries and everything inside a hidden group skipped) -> uint8 RGBA [h, w, 4]."""
    premul = _flatten_premultiplied(nodes, h, w)  # [h, w, 4] float, premultiplied
    alpha = premul[..., 3:]
    rgb = np.divide(premul[..., :3], alpha, out=np.zeros_like(premul[..., :3]), where=alpha > 0)
    out = np.concatenate([rgb, alpha], axis=2)
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def _flatten_premultiplied(nodes: Sequence[TreeNode], h: int, w: int) -> np.ndarray:
    acc = np.zeros((h, w, 4), np.float32)  # premultiplied RGBA, bottom-up "over"
    for node in reversed(list(nodes)):
        if not node.visible:
            continue
        if node.is_group:
            src = _flatten_premultiplied(node.children, h, w) * node.opacity
        elif node.rgba is not None:
            src = node.rgba.astype(np.float32) / 255
            src[..., :3] *= src[..., 3:]
        else:
            continue
        acc = src + acc * (1 - src[..., 3:])
    return acc
