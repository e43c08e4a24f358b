"""Background completion for dataset construction (docs/DATASET.md): the ``Inpainter`` stage on the user's own
SD1.5 inpainting checkpoint, run through ComfyUI's model code.

The checkpoint is loaded once (``comfy.sd.load_checkpoint_guess_config``; ComfyUI's model management picks the
device) and the prompts are encoded once. Pictures of one size are sampled together: ComfyUI's VAEEncodeForInpaint
node greys the masked pixels and grows the noise mask, ``nodes.common_ksampler`` samples at denoise 1 with that
mask (an inpainting UNet also gets the mask and the masked picture as its 5 extra input channels), the VAE decodes,
and the decoded pixels are pasted into the input inside the mask only, so every pixel outside it is the input's.
Sizes that are not multiples of 8 are padded (edge pixels) and cropped back.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import comfy.samplers
import comfy.sd
import comfy.supported_models
import nodes

from ...layerdiff_model.errors import DatasetError

LOG = logging.getLogger("LayerDiff.dataset")
OPTION = "--inpaint-checkpoint"
FIX = ("pass the path of an SD1.5 inpainting checkpoint (e.g. sd-v1-5-inpainting.safetensors, whose UNet takes "
       "9 input channels) to " + OPTION)


def _check_options(steps, cfg, sampler_name, scheduler, seed, grow_mask_by, batch_size) -> None:
    problems = []
    if not isinstance(steps, int) or steps < 1:
        problems.append(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(cfg, (int, float)) or cfg < 0:
        problems.append(f"cfg must be a number >= 0, got {cfg!r}")
    if sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        problems.append(f"sampler_name {sampler_name!r} is not one of ComfyUI's samplers "
                        f"({', '.join(comfy.samplers.KSampler.SAMPLERS[:6])}, ...)")
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        problems.append(f"scheduler {scheduler!r} is not one of {list(comfy.samplers.KSampler.SCHEDULERS)}")
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        problems.append(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if not isinstance(grow_mask_by, int) or not 0 <= grow_mask_by <= 64:
        problems.append(f"grow_mask_by must be an integer in [0, 64], got {grow_mask_by!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if problems:
        raise DatasetError("inpainting options: " + "; ".join(problems) + ". Fix these options and run again.")


def load_inpainting_checkpoint(path: str | os.PathLike):
    """(MODEL, CLIP, VAE, is_inpainting) of an SD1.5 checkpoint file; DatasetError naming ``--inpaint-checkpoint``
    when the file is missing, unreadable or not an SD1.5 checkpoint with text encoder and VAE."""
    path = Path(path)
    if not path.is_file():
        where = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DatasetError(f"{OPTION}: {path} {where}. Check the path, or {FIX}.")
    embeddings = None
    try:
        import folder_paths

        embeddings = folder_paths.get_folder_paths("embeddings")
    except (ImportError, KeyError):
        pass
    try:
        with torch.inference_mode():
            loaded = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True,
                                                           embedding_directory=embeddings)
    except Exception as exc:  # noqa: BLE001 - safetensors, pickle and ComfyUI's detection raise many types
        raise DatasetError(f"{OPTION}: cannot read {path} as a checkpoint ({type(exc).__name__}: "
                           f"{str(exc).strip()[:300]}). The file may be damaged or not a model; {FIX}.") from exc
    model, clip, vae = loaded[:3]
    config = getattr(getattr(model, "model", None), "model_config", None)
    if not isinstance(config, comfy.supported_models.SD15):
        family = type(config).__name__ if config is not None else "not a full checkpoint"
        raise DatasetError(f"{OPTION}: {path} is {family}, not an SD1.5-family checkpoint; {FIX}.")
    if clip is None or vae is None or getattr(vae, "first_stage_model", None) is None:
        raise DatasetError(f"{OPTION}: {path} has no text encoder or no VAE (a UNet-only file?); the inpainter needs a "
                           f"single-file checkpoint with both; {FIX}.")
    return model, clip, vae, bool(config.inpaint_model())


def _check_inputs(images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The masks as bool [H, W]; DatasetError when a picture or mask is malformed."""
    if len(images) != len(masks):
        raise DatasetError(f"inpaint: got {len(images)} pictures but {len(masks)} masks; pass one mask per picture.")
    out = []
    for i, (image, mask) in enumerate(zip(images, masks)):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            found = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
            raise DatasetError(f"inpaint: picture {i} must be uint8 [H, W, 3] RGB, found {found}; convert it first.")
        mask = np.asarray(mask)
        if mask.shape != image.shape[:2]:
            raise DatasetError(f"inpaint: mask {i} is {tuple(mask.shape)} but its picture is {image.shape[1]}x"
                               f"{image.shape[0]} (needs bool [{image.shape[0]}, {image.shape[1]}]); pass the mask "
                               "made for this picture.")
        out.append(mask.astype(bool))
    return out


def _batches(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
    """Indices of the pictures to sample, grouped by size (call order kept), at most ``batch_size`` a group."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (image, mask) in enumerate(zip(images, masks)):
        if mask.any():
            groups.setdefault(image.shape[:2], []).append(i)
    return [ids[k:k + batch_size] for ids in groups.values() for k in range(0, len(ids), batch_size)]


def _pad(array: np.ndarray, multiple: int, mode: str) -> np.ndarray:
    """``array`` [H, W, ...] padded at the bottom/right to multiples of ``multiple`` (``mode`` as np.pad)."""
    h, w = array.shape[:2]
    pads = [(0, -h % multiple), (0, -w % multiple)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pads, mode=mode) if mode == "edge" else np.pad(array, pads, constant_values=False)


class ComfyInpainter:
    """Inpainter (layerdiff_model/data/construction/stages.py) on an SD1.5 (inpainting) checkpoint.

    Picture ``i`` of a call gets the noise ComfyUI gives batch index ``i`` for ``seed`` (``batch_index`` of the
    latent, as Latent From Batch sets it), so each picture's result depends only on the seed, its position, its
    pixels and mask, never on how pictures were batched.
    """

    def __init__(self, checkpoint_path: str | os.PathLike, *, steps: int = 20, cfg: float = 5.0,
                 sampler_name: str = "euler", scheduler: str = "normal", seed: int = 0, grow_mask_by: int = 6,
                 prompt: str = "", negative_prompt: str = "", batch_size: int = 4):
        _check_options(steps, cfg, sampler_name, scheduler, seed, grow_mask_by, batch_size)
        self.steps, self.cfg, self.sampler_name, self.scheduler = steps, float(cfg), sampler_name, scheduler
        self.seed, self.grow_mask_by, self.batch_size = seed, grow_mask_by, batch_size
        self.checkpoint_path = Path(checkpoint_path)
        self.model, clip, self.vae, self.is_inpainting_model = load_inpainting_checkpoint(self.checkpoint_path)
        if not self.is_inpainting_model:
            LOG.warning("%s: %s is a plain SD1.5 checkpoint (UNet with 4 input channels); it works, but an SD1.5 "
                        "inpainting checkpoint (9 input channels, e.g. sd-v1-5-inpainting) fills the background "
                        "better: pass one with %s.", OPTION, self.checkpoint_path, OPTION)
        with torch.inference_mode():
            encoder = nodes.CLIPTextEncode()
            self.positive = encoder.encode(clip, prompt)[0]
            self.negative = encoder.encode(clip, negative_prompt)[0]

    def inpaint(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each picture (uint8 [H, W, 3]) with its mask's pixels (bool [H, W], True = fill) generated; pixels
        outside the mask are the input's exactly. A picture with an empty mask comes back unchanged, unsampled."""
        masks = _check_inputs(images, masks)
        out = [np.array(image, copy=True) for image in images]
        for ids in _batches(images, masks, self.batch_size):
            filled = self._sample(np.stack([images[i] for i in ids]), np.stack([masks[i] for i in ids]), ids)
            for i, pixels in zip(ids, filled):
                out[i][masks[i]] = pixels[masks[i]]
        return out

    def _sample(self, images: np.ndarray, masks: np.ndarray, ids: list[int]) -> np.ndarray:
        """Generated pictures uint8 [B, H, W, 3] for same-size ``images`` [B, H, W, 3] and ``masks`` [B, H, W]."""
        b, h, w = images.shape[:3]
        ratio = self.vae.downscale_ratio if isinstance(getattr(self.vae, "downscale_ratio", None), int) else 8
        pixels = np.stack([_pad(image, ratio, "edge") for image in images])  # [B, H8, W8, 3]
        fill = np.stack([_pad(mask, ratio, "constant") for mask in masks])  # [B, H8, W8]
        with torch.inference_mode():
            pixels_t = torch.from_numpy(pixels).float() / 255.0
            mask_t = torch.from_numpy(fill).float()
            (latent,) = nodes.VAEEncodeForInpaint().encode(self.vae, pixels_t, mask_t, self.grow_mask_by)
            latent["batch_index"] = list(ids)  # picture i: noise of batch index i for self.seed
            (latent,) = nodes.common_ksampler(self.model, self.seed, self.steps, self.cfg, self.sampler_name,
                                              self.scheduler, self.positive, self.negative, latent, denoise=1.0)
            decoded = self.vae.decode(latent["samples"])  # [B, H8, W8, 3] in [0, 1]
        decoded = decoded.reshape(b, *decoded.shape[-3:])[:, :h, :w, :3]
        return (decoded.float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
