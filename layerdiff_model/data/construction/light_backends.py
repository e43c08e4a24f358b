"""The light backends: no model weights. OpenCV's classical inpainting and the two layer-prompt rules."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .stages import Captioner, FoundObject

GREY = 128


class OpenCVInpainter:
    """:class:`~.stages.Inpainter` with ``cv2.inpaint`` (Telea or Navier-Stokes), the light option.

    The mask is grown by ``grow`` pixels first, so object edges and halos go too; pixels outside the grown mask
    are returned unchanged.
    """

    def __init__(self, radius: int = 5, method: str = "telea", grow: int = 2):
        if method not in ("telea", "ns"):
            raise ValueError(f"OpenCV inpainting method must be 'telea' or 'ns', got {method!r}")
        self.radius, self.method, self.grow = radius, method, grow

    def inpaint(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> list[np.ndarray]:
        import cv2

        flag = cv2.INPAINT_TELEA if self.method == "telea" else cv2.INPAINT_NS
        out = []
        for image, mask in zip(images, masks):
            m = grow_mask(mask, self.grow)
            if not m.any():
                out.append(image.copy())
                continue
            filled = cv2.inpaint(np.ascontiguousarray(image), m.astype(np.uint8) * 255, self.radius, flag)
            out.append(np.where(m[..., None], filled, image))
        return out


def grow_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` dilated by ``pixels`` (a square structuring element); bool [H, W]."""
    if pixels <= 0:
        return mask.astype(bool)
    import cv2

    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def object_crop(image: np.ndarray, mask: np.ndarray, margin: int = 4) -> np.ndarray:
    """The object alone: its bounding box (plus ``margin``) with the pixels outside its mask grey; uint8 RGB."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return np.full((8, 8, 3), GREY, np.uint8)
    y0, y1 = max(ys.min() - margin, 0), min(ys.max() + 1 + margin, mask.shape[0])
    x0, x1 = max(xs.min() - margin, 0), min(xs.max() + 1 + margin, mask.shape[1])
    crop = np.where(mask[y0:y1, x0:x1, None], image[y0:y1, x0:x1], np.uint8(GREY))
    return np.ascontiguousarray(crop.astype(np.uint8))


class PhrasePrompter:
    """:class:`~.stages.LayerPrompter`: each layer's prompt is the phrase it was detected for."""

    def prompts(self, images: Sequence[np.ndarray], objects: Sequence[Sequence[FoundObject]]) -> list[list[str]]:
        return [[o.phrase for o in objs] for objs in objects]


class CropCaptionPrompter:
    """:class:`~.stages.LayerPrompter`: each layer's prompt is a caption of its crop (object over grey)."""

    def __init__(self, captioner: Captioner):
        self.captioner = captioner

    def prompts(self, images: Sequence[np.ndarray], objects: Sequence[Sequence[FoundObject]]) -> list[list[str]]:
        crops = [object_crop(image, o.mask) for image, objs in zip(images, objects) for o in objs]
        captions = iter(self.captioner.caption(crops) if crops else [])
        return [[next(captions).strip() or o.phrase for o in objs] for objs in objects]
