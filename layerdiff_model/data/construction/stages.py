"""The stages of dataset construction and the one interface each backend implements (docs/DATASET.md).

A picture goes through: caption -> object phrases -> detection -> segmentation -> depth order -> background
completion -> per-layer prompts -> quality filters, and comes out as a :class:`~..layered_sample.LayeredSample`
or as a counted reject reason. Every stage is a small object with one method that takes a *batch* (a list, one
entry per picture), so a backend on a GPU runs its model once per batch. Backends never see files, shards or
reports; :mod:`.pipeline` wires them.

Array conventions, for every backend: a picture is uint8 ``[H, W, 3]`` RGB; a mask is bool ``[H, W]``; a box is
``(x0, y0, x1, y1)`` in pixels of that picture (x right, y down, x1/y1 exclusive); a nearness map is float
``[H, W]`` where larger means nearer the camera (what Depth Anything predicts: relative inverse depth).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

Box = tuple[float, float, float, float]


@dataclass
class Picture:
    """One input picture. ``key`` names it in the output (unique in a run, no '.'); ``source`` in reports."""

    key: str
    pixels: np.ndarray  # uint8 [H, W, 3]
    caption: str | None = None
    source: str = ""


@dataclass
class Detection:
    """An object the detector found for ``phrase``: its box and the detector's score in [0, 1]."""

    phrase: str
    box: Box
    score: float


@dataclass
class FoundObject:
    """A detected object with its segment (the visible extent, bool [H, W]) and, once ordered, its nearness."""

    phrase: str
    box: Box
    score: float
    mask: np.ndarray
    nearness: float | None = None
    prompt: str = ""
    info: dict = field(default_factory=dict)


@dataclass
class CaptionParts:
    """What a caption names: object phrases (each becomes a candidate layer) and the background phrase."""

    objects: list[str]
    background: str | None


@runtime_checkable
class Captioner(Protocol):
    """Describes pictures in one sentence each (BLIP-2, InstructBLIP, or the caption the input came with)."""

    def caption(self, images: Sequence[np.ndarray]) -> list[str]: ...


@runtime_checkable
class PhraseFinder(Protocol):
    """Splits a caption into object phrases and a background phrase."""

    def parts(self, caption: str) -> CaptionParts: ...


@runtime_checkable
class Detector(Protocol):
    """Open-vocabulary detection: for each picture, the objects matching its phrases (OWLv2, Grounding DINO)."""

    def detect(self, images: Sequence[np.ndarray], phrases: Sequence[Sequence[str]]) -> list[list[Detection]]: ...


@runtime_checkable
class Segmenter(Protocol):
    """Box-prompted segmentation: one bool [H, W] mask per box (SAM)."""

    def segment(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Box]]) -> list[list[np.ndarray]]: ...


@runtime_checkable
class DepthEstimator(Protocol):
    """Monocular depth as a nearness map per picture (float [H, W], larger = nearer; Depth Anything)."""

    def nearness(self, images: Sequence[np.ndarray]) -> list[np.ndarray]: ...


@runtime_checkable
class Inpainter(Protocol):
    """Fills the masked pixels (bool [H, W], True = fill) of each picture; pixels outside the mask are kept."""

    def inpaint(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> list[np.ndarray]: ...


@runtime_checkable
class LayerPrompter(Protocol):
    """The prompt of each found object layer (its phrase, or a caption of its crop)."""

    def prompts(self, images: Sequence[np.ndarray], objects: Sequence[Sequence[FoundObject]]) -> list[list[str]]: ...


@runtime_checkable
class ImageTextScorer(Protocol):
    """Image-text agreement (CLIP cosine similarity) of each image with its text."""

    def similarity(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> list[float]: ...


def check_picture(pixels: np.ndarray) -> None:
    """Raise ValueError unless ``pixels`` is uint8 [H, W, 3] (what every backend may assume)."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        found = f"{pixels.dtype} {tuple(pixels.shape)}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise ValueError(f"a picture must be uint8 [H, W, 3] RGB, found {found}")
