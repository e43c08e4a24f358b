"""Layer-specific prompt enhancer (LayerDiff paper, Sec. 3.3; docs/DESIGN.md 2.3).

Refines each layer prompt's token embeddings with context from the global prompt: pre-LN transformer layers
with self-attention over the layer tokens, cross-attention to the global tokens and an MLP. Every residual
output projection is zero-initialised, so an untrained enhancer is the identity.
Shapes: layer tokens ``[L, t, d]`` (one row per layer prompt), global tokens ``[L or 1, g, d]``.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import multi_head_attention


class EnhancerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.heads = heads
        kw = dict(dtype=dtype, device=device)
        self.norm_self = operations.LayerNorm(dim, **kw)
        self.self_qkv = operations.Linear(dim, 3 * dim, bias=False, **kw)
        self.self_out = operations.Linear(dim, dim, **kw)
        self.norm_cross = operations.LayerNorm(dim, **kw)
        self.norm_global = operations.LayerNorm(dim, **kw)
        self.cross_q = operations.Linear(dim, dim, bias=False, **kw)
        self.cross_kv = operations.Linear(dim, 2 * dim, bias=False, **kw)
        self.cross_out = operations.Linear(dim, dim, **kw)
        self.norm_mlp = operations.LayerNorm(dim, **kw)
        self.mlp_in = operations.Linear(dim, 4 * dim, **kw)
        self.mlp_out = operations.Linear(4 * dim, dim, **kw)

    def forward(self, x: torch.Tensor, global_tokens: torch.Tensor) -> torch.Tensor:
        """x [L, t, d], global_tokens [L, g, d] -> [L, t, d]."""
        q, k, v = self.self_qkv(self.norm_self(x)).chunk(3, dim=-1)
        x = x + self.self_out(multi_head_attention(q, k, v, self.heads))
        k, v = self.cross_kv(self.norm_global(global_tokens)).chunk(2, dim=-1)
        x = x + self.cross_out(multi_head_attention(self.cross_q(self.norm_cross(x)), k, v, self.heads))
        return x + self.mlp_out(torch.nn.functional.gelu(self.mlp_in(self.norm_mlp(x))))


class LayerPromptEnhancer(nn.Module):
    """``width`` < ``dim`` runs the layers in a narrower space (down-projection in, zero-initialised up-projection
    out, as a residual); ``width == dim`` (the default, CLIP width) works on the embeddings directly."""

    def __init__(self, dim: int, depth: int, heads: int, width: int | None = None, dtype=None, device=None,
                 operations=nn):
        super().__init__()
        width = width or dim
        kw = dict(dtype=dtype, device=device)
        self.project = width != dim
        if self.project:
            self.proj_in = operations.Linear(dim, width, **kw)
            self.proj_global = operations.Linear(dim, width, **kw)
            self.proj_out = operations.Linear(width, dim, **kw)
        self.layers = nn.ModuleList(EnhancerLayer(width, heads, dtype, device, operations) for _ in range(depth))

    def forward(self, layer_tokens: torch.Tensor, global_tokens: torch.Tensor) -> torch.Tensor:
        """layer_tokens [L, t, d], global_tokens [L or 1, g, d] -> enhanced [L, t, d]."""
        dtype = layer_tokens.dtype
        x = layer_tokens
        g = global_tokens.to(dtype).expand(x.shape[0], -1, -1)  # [L, g, d]
        if self.project:
            x, g = self.proj_in(x), self.proj_global(g)  # [L, t, w], [L, g, w]
        for layer in self.layers:
            x = layer(x, g)
        return layer_tokens + self.proj_out(x) if self.project else x
