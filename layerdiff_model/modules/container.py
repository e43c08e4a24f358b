"""All trainable LayerDiff modules in one container (paper Sec. 3.2-3.4; docs/DESIGN.md 2.2-2.5).

``LayerDiffModules`` holds what LayerDiff adds to SD1.5: one :class:`LayerCollaborativeBlock` per UNet
transformer site (inter- and intra-layer attention), the layer-specific prompt enhancer and the mask read-out
that self-mask guidance uses. It knows nothing about how it is hooked into a UNet: the host adapter looks up each
site's block with :meth:`site_module` and runs it on that block's residual stream ``[(b s), h*w, c]``;
:meth:`enhance` maps layer prompt tokens ``[L, t, d]`` to enhanced tokens of the same shape.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import LayerCollaborativeBlock
from .config import LayerDiffConfig, Site
from .enhancer import LayerPromptEnhancer
from .mask_readout import MaskReadout
from ..slots import num_roles


class LayerDiffModules(nn.Module):
    def __init__(self, config: LayerDiffConfig, dtype=None, device=None, operations=nn):
        super().__init__()
        self.config = config
        self.source_name = ""  # the weights file these were loaded from (set by weights.load_modules), for errors
        roles = num_roles(config.max_foregrounds)
        self.blocks = nn.ModuleDict({
            site.name: LayerCollaborativeBlock(site.width, site.heads, config.context_dim, roles,
                                               config.use_inter_layer, config.use_intra_layer,
                                               dtype, device, operations, config.use_role_modulation)
            for site in config.sites
        })
        self.enhancer = (LayerPromptEnhancer(config.context_dim, config.enhancer_depth, config.enhancer_heads,
                                             config.enhancer_width or None, dtype, device, operations)
                         if config.use_enhancer and config.enhancer_depth > 0 else None)
        self.mask_readout = MaskReadout(config.latent_channels, dtype, device, operations)

    @torch.no_grad()
    def initialize(self, seed: int = 0, zero_outputs: bool = True, std: float = 0.02) -> "LayerDiffModules":
        """Deterministic init. With ``zero_outputs`` every residual branch is zero, so the base UNet and the
        prompt embeddings are reproduced exactly; without it all weights are random (used by tests)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                continue
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p) * std)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
                module.bias.zero_()
        if zero_outputs:
            for name, p in self.named_parameters():
                if _is_output_projection(name):
                    p.zero_()
        self.mask_readout.reset_parameters_from_preview_factors()
        return self

    def site_module(self, site: Site) -> LayerCollaborativeBlock:
        return self.blocks[site.name]

    def enhance(self, layer_tokens: torch.Tensor, global_tokens: torch.Tensor) -> torch.Tensor:
        """[L, t, d] layer prompt tokens, [1 or L, g, d] global tokens -> enhanced [L, t, d]."""
        if self.enhancer is None:
            return layer_tokens
        weight = next(self.enhancer.parameters())
        out = self.enhancer(layer_tokens.to(weight.device, weight.dtype), global_tokens.to(weight.device, weight.dtype))
        return out.to(layer_tokens.device, layer_tokens.dtype)


_OUTPUT_PROJECTIONS = ("role.scale", "role.shift", "inter.role_bias", "inter.to_out.", "intra.to_out.", "self_out.",
                       "cross_out.", "mlp_out.", "enhancer.proj_out.")


def _is_output_projection(param_name: str) -> bool:
    return any(tag in param_name for tag in _OUTPUT_PROJECTIONS)
