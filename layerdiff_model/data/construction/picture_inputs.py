"""Input pictures: work units (input shards) and reading them, with broken inputs counted instead of raised.

Inputs are folders of images (captions in a sidecar ``<name>.txt``, or ``"caption"`` in ``<name>.json``) or
WebDataset tar shards as img2dataset writes them (``<key>.jpg|png|webp`` + ``<key>.txt`` + ``<key>.json``).
A work unit is one input shard, or a run of ``images_per_unit`` files of a folder (sorted), so every process
of a distributed run can take whole units (:mod:`.work_shares`) and each unit becomes one output shard.

Pictures are converted to 8-bit RGB (grayscale, palette, CMYK, 16-bit, alpha over white), counted by source
mode; images that cannot be decoded (zero bytes, truncated, not an image) and members after the point where a
shard stops are rejected with a reason.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ...errors import DatasetError
from .sample_keys import key_from_name
from .stages import Picture

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class WorkUnit:
    """``name`` names the output shard; ``tar`` is an input shard, else ``files`` are images of a folder."""

    name: str
    tar: Path | None = None
    files: tuple[Path, ...] = ()
    root: Path | None = None  # the folder ``files`` are in (keys are their paths relative to it)


@dataclass
class BrokenInput:
    source: str
    reason: str


def _unit_name(text: str) -> str:
    return _KEY_CHARS.sub("-", text).strip("-") or "unit"


def find_work_units(inputs: Sequence[str | Path], images_per_unit: int = 1000) -> list[WorkUnit]:
    """Work units of the inputs: each .tar file (given, or directly in a given folder) is one unit; the images
    of a folder without tar files (recursively, sorted) are cut into units of ``images_per_unit``."""
    if images_per_unit < 1:
        raise DatasetError(f"--images-per-unit must be at least 1, got {images_per_unit}.")
    units: list[WorkUnit] = []
    for given in inputs:
        path = Path(given)
        if path.is_file() and path.suffix == ".tar":
            units.append(WorkUnit(_unit_name(path.stem), tar=path))
        elif path.is_dir():
            tars = sorted(p for p in path.glob("*.tar") if p.is_file())
            if tars:
                units += [WorkUnit(_unit_name(t.stem), tar=t) for t in tars]
                continue
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            for i in range(0, len(files), images_per_unit):
                units.append(WorkUnit(_unit_name(f"{path.name}-{i // images_per_unit:06d}"),
                                      files=tuple(files[i:i + images_per_unit]), root=path))
        else:
            raise DatasetError(f"Input {given} is neither a folder of images or tar shards nor a .tar shard: "
                               f"give folders or .tar files that exist.")
    names = [u.name for u in units]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"Two inputs give the same output shard names {duplicates}: rename one of the input "
                           f"shards or folders so every unit's name is unique.")
    return units


@contextmanager
def refusing_truncated_images():
    """Pillow raises on a truncated image inside this block, whatever the host set: a host may let it fill
    truncated images with grey (``ImageFile.LOAD_TRUNCATED_IMAGES``)."""
    from PIL import ImageFile

    before, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def decode_picture(data: bytes, max_side: int = 0) -> tuple[np.ndarray, str | None]:
    """uint8 [H, W, 3] RGB of encoded image bytes, and the source mode when it was converted (else None).

    Raises ValueError with the reason when the bytes are not a whole image. ``max_side`` > 0 shrinks larger
    pictures (aspect kept).
    """
    from PIL import Image

    if not data:
        raise ValueError("zero-byte file")
    try:
        with refusing_truncated_images(), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # decodes fully: a truncated file raises here
                mode, image = im.mode, im
                if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
                    rgba = image.convert("RGBA")
                    image = Image.new("RGB", rgba.size, (255, 255, 255))
                    image.paste(rgba, mask=rgba.getchannel("A"))
                elif mode.startswith("I;16") or mode == "I":
                    arr = np.asarray(image, np.float64)
                    image = Image.fromarray(np.round(arr / max(arr.max(), 1) * 255).astype(np.uint8)).convert("RGB")
                else:
                    image = image.convert("RGB")
                if max_side and max(image.size) > max_side:
                    scale = max_side / max(image.size)
                    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                         Image.BICUBIC)
                pixels = np.asarray(image, np.uint8).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None
    converted = None if mode == "RGB" else {"L": "grayscale", "1": "grayscale", "CMYK": "CMYK", "P": "palette",
                                             "I;16": "16-bit", "I;16B": "16-bit", "I": "16-bit"}.get(mode, mode)
    return pixels, converted


def _caption_of(text: bytes | None, meta: bytes | None) -> str | None:
    if text is not None:
        caption = text.decode("utf-8", "replace").strip()
        if caption:
            return caption
    if meta is not None:
        try:
            caption = json.loads(meta.decode("utf-8", "replace")).get("caption")
        except (ValueError, AttributeError):
            return None
        if isinstance(caption, str) and caption.strip():
            return caption.strip()
    return None


def read_unit(unit: WorkUnit, max_side: int = 0) -> Iterator[tuple[Picture | BrokenInput, str | None]]:
    """Every input of a unit, in order: ``(Picture, converted-from mode or None)`` or ``(BrokenInput, None)``."""
    if unit.tar is not None:
        yield from _read_tar(unit.tar, max_side)
        return
    for path in unit.files:
        rel = path.relative_to(unit.root) if unit.root else Path(path.name)
        source = str(path)
        try:
            pixels, converted = decode_picture(path.read_bytes(), max_side)
        except (OSError, ValueError) as e:
            yield BrokenInput(source, _reason(e)), None
            continue
        txt, meta = path.with_suffix(".txt"), path.with_suffix(".json")
        caption = _caption_of(txt.read_bytes() if txt.is_file() else None, meta.read_bytes() if meta.is_file()
                              else None)
        yield Picture(key_from_name(str(rel.with_suffix(""))), pixels, caption, source), converted


def _reason(e: Exception) -> str:
    text = str(e)
    if "zero-byte" in text:
        return "zero-byte image file"
    if "truncated" in text.lower() or "broken data stream" in text.lower():
        return "truncated image"
    return "unreadable image"


def _read_tar(path: Path, max_side: int) -> Iterator[tuple[Picture | BrokenInput, str | None]]:
    group_key, files = None, {}

    def flush():
        image_name = next((n for n in files if "." + n.rsplit(".", 1)[-1].lower() in IMAGE_SUFFIXES), None)
        source = f"{path.name}:{group_key}"
        if image_name is None:
            return BrokenInput(source, "shard member without an image"), None
        try:
            pixels, converted = decode_picture(files[image_name], max_side)
        except ValueError as e:
            return BrokenInput(source, _reason(e)), None
        caption = _caption_of(files.get("txt"), files.get("json"))
        return Picture(key_from_name(group_key), pixels, caption, source), converted

    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                if "." not in base:
                    continue
                stem, _, ext = base.partition(".")
                key = f"{directory}/{stem}" if directory else stem
                if key != group_key:
                    if group_key is not None:
                        yield flush()
                    group_key, files = key, {}
                files[ext] = tar.extractfile(member).read()
        if group_key is not None:
            yield flush()
    except (tarfile.TarError, OSError, EOFError) as e:  # the shard stops mid-member
        yield BrokenInput(f"{path.name}:{group_key or ''}", f"input shard ends mid-member ({type(e).__name__})"), None
