"""Host side of decomposing a flat picture into layers (docs/DESIGN.md 2.10): the picture as a layered latent, and
composite guidance as a post-CFG function (like self-mask guidance), so any sampler runs it."""
from __future__ import annotations

import torch

from ...layerdiff_model.errors import LayoutError
from ...layerdiff_model.sampling import composite_guidance, smg
from ...layerdiff_model.slots import check_foreground_count, num_slots, pack
from . import inference

PICTURE_KEY = "picture"  # in the layerdiff entry: the picture's latent [B, 4, h, w], as VAE Encode gives it
FOREGROUND_STARTS = ("picture", "grey")


def picture_latent(vae, image: torch.Tensor, num_foregrounds: int, foreground_start: str, layer_names, node: str
                   ) -> dict:
    """A layered latent to decompose ``image`` [B, H, W, 3]: the picture in the background slot and, with
    ``foreground_start`` "picture", in every foreground slot too ("grey": neutral grey); grey in the mask slots."""
    check_foreground_count(num_foregrounds, 16, node)
    b, h, w = int(image.shape[0]), int(image.shape[1]), int(image.shape[2])
    if h % 8 or w % 8:
        raise LayoutError(f"{node}: the picture is {w}x{h}; width and height must be multiples of 8 for the VAE. "
                          "Scale or crop it first (e.g. Upscale Image / ImageCrop).")
    if foreground_start not in FOREGROUND_STARTS:
        raise LayoutError(f"{node}: 'foreground_start' must be one of {FOREGROUND_STARTS}, got {foreground_start!r}.")
    if layer_names is not None and len(layer_names) != num_foregrounds + 1:
        raise LayoutError(f"{node}: 'layer_names' has {len(layer_names)} lines for a background and "
                          f"{num_foregrounds} foregrounds; connect the same prompt encoder to both inputs.")
    with torch.no_grad():
        picture = vae.encode(image[..., :3])  # [B, 4, h, w]
        grey = vae.encode(torch.full((1, h, w, 3), 0.5, dtype=image.dtype, device=image.device)).to(picture)
    n, greys = num_foregrounds, grey.expand(b, -1, -1, -1)[:, None].expand(-1, num_foregrounds, -1, -1, -1)
    starts = picture[:, None].expand(-1, n, -1, -1, -1) if foreground_start == "picture" else greys
    samples = pack(picture, starts, greys)  # [(b s), 4, h, w]
    latent = inference.make_layered_latent(samples.contiguous(), n, layer_names)
    latent[inference.LATENT_KEY][PICTURE_KEY] = picture
    return latent


class CompositeGuidance:
    """Post-CFG function: the predicted layers' composite pulled toward the picture (composite_guidance)."""

    def __init__(self, state, picture: torch.Tensor, strength: float, sigma_start: float):
        self.state, self.picture, self.strength, self.sigma_start = state, picture, strength, sigma_start

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args):
        x0, uncond = args["denoised"], args.get("uncond")
        if self.strength == 0 or float(args["sigma"].max()) > self.sigma_start:
            return x0
        n = inference.num_foregrounds_of_conds(uncond if uncond is not None else args["cond"])
        self.state.ensure_device(x0.device)
        b = x0.shape[0] // num_slots(n)
        picture = args["model"].process_latent_in(self.picture.to(x0.device, x0.dtype))
        if picture.shape[0] != b:
            picture = picture.repeat(b // picture.shape[0], 1, 1, 1)
        with torch.no_grad():
            masks = smg.read_masks(x0, n, self.state.modules.mask_readout)
            return composite_guidance.pull_to_picture(x0, masks, n, picture, self.strength)


def with_composite_guidance(model, latent: dict, strength: float, start_percent: float, node: str):
    """Clone of a LayerDiff-patched ``model`` that pulls the composite toward ``latent``'s picture."""
    state = inference.patch_state(model, node)
    info = inference.layered_latent_info(latent, node, "picture_latent")
    picture = info.get(PICTURE_KEY)
    if picture is None:
        raise LayoutError(f"{node}: 'picture_latent' carries no picture; connect 'LayerDiff Picture to Layered "
                          "Latent' (the latent you sample from).")
    rows = latent["samples"].shape[0] // num_slots(int(info["num_foregrounds"]))
    if picture.shape[0] not in (1, rows):
        raise LayoutError(f"{node}: the picture latent has {picture.shape[0]} pictures for {rows} layered images.")
    return inference.with_post_cfg_guidance(
        model, strength, start_percent, lambda sigma_start: CompositeGuidance(state, picture, strength, sigma_start))
