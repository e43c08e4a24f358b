"""Layer-collaborative attention (LayerDiff paper, Sec. 3.2; docs/DESIGN.md 2.2).

Inserted in every SD1.5 transformer block after the global-prompt cross-attention (attn2):

1. inter-layer attention: at each spatial position the S slots of one sample attend to each other
   (``(b s) n c -> (b n) s c``), with a learned slot-role embedding added to the keys/queries so a slot knows
   whether it is the background, foreground i or mask i;
2. intra-layer cross-attention: each slot attends to its own layer prompt embedding (mask i reads foreground i's).

Both are residual branches whose output projections are zero-initialised: untrained modules leave the UNet
exactly unchanged. Shapes: x ``[(b s), n, c]`` with n = h*w tokens, layer context ``[(b s), t, d]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Lq, C], k/v [B, Lk, C] -> [B, Lq, C]; ``bias`` (added to the attention logits) broadcasts to
    [B, heads, Lq, Lk]."""
    q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
    return rearrange(out, "b h l d -> b l (h d)")


CHUNK_ELEMENTS = 1 << 23  # inter-layer attention works on runs of positions holding at most this many values


def _weight_version(weight: torch.Tensor) -> int:
    """In-place update counter of a weight. Inference tensors (weights loaded under torch.inference_mode, as
    ComfyUI's executor does) have none and are never trained, so they count as unchanged."""
    return -1 if weight.is_inference() else weight._version


class InterLayerAttention(nn.Module):
    """Attention across the S slots of one sample at each spatial position.

    Besides the role embedding on its input, a learned per-head bias ``role_bias[h, role_q, role_k]`` on the
    logits lets a slot learn directly which slots to read (mask i its foreground i, say); it is zero at init
    (uniform attention, as without it) and learns first-order, where role-dependent queries and keys need the
    product of two projections to move."""

    def __init__(self, width: int, heads: int, num_roles: int, dtype=None, device=None, operations=nn,
                 use_role_bias: bool = False):
        super().__init__()
        self.heads = heads
        self.norm = operations.LayerNorm(width, dtype=dtype, device=device)
        self.role_embedding = nn.Parameter(torch.empty(num_roles, width, dtype=dtype, device=device))
        self.role_bias = (nn.Parameter(torch.zeros(heads, num_roles, num_roles, dtype=dtype, device=device))
                          if use_role_bias else None)
        self.to_qkv = operations.Linear(width, 3 * width, bias=False, dtype=dtype, device=device)
        self.to_out = operations.Linear(width, width, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, roles: torch.Tensor, slots: int,
                chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
        """x [(b s), n, c], roles [(b s)] long -> residual [(b s), n, c].

        Positions attend independently, so when x holds more than ``chunk_elements`` values the positions are
        processed in runs that hold at most that many: the temporaries (normed input, q/k/v, attention output)
        are then chunk-sized instead of several copies of x. Same result, up to float rounding."""
        role = self.role_embedding.to(dtype=x.dtype)[roles][:, None, :]  # [(b s), 1, c]
        bias = None
        if self.role_bias is not None:
            sample_roles = roles[:slots]  # every sample of a call has the same slot layout (rows_layout)
            bias = self.role_bias[:, sample_roles][:, :, sample_roles]  # [heads, s, s]
        rows, n, c = x.shape
        step = max(1, chunk_elements // max(1, rows * c))
        if step >= n:
            return self._attend(x, role, bias, slots)
        out = torch.empty_like(x)
        for start in range(0, n, step):
            out[:, start:start + step] = self._attend(x[:, start:start + step], role, bias, slots)
        return out

    def _attend(self, x: torch.Tensor, role: torch.Tensor, bias: torch.Tensor | None, slots: int) -> torch.Tensor:
        h = rearrange(self.norm(x) + role, "(b s) n c -> (b n) s c", s=slots)
        q, k, v = self.to_qkv(h).chunk(3, dim=-1)
        out = multi_head_attention(q, k, v, self.heads, bias)  # [(b n), s, c]
        return self.to_out(rearrange(out, "(b n) s c -> (b s) n c", n=x.shape[1]))


class IntraLayerCrossAttention(nn.Module):
    """Cross-attention of each slot to its own layer prompt embedding."""

    def __init__(self, width: int, heads: int, context_dim: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.heads = heads
        self.norm = operations.LayerNorm(width, dtype=dtype, device=device)
        self.to_q = operations.Linear(width, width, bias=False, dtype=dtype, device=device)
        self.to_k = operations.Linear(context_dim, width, bias=False, dtype=dtype, device=device)
        self.to_v = operations.Linear(context_dim, width, bias=False, dtype=dtype, device=device)
        self.to_out = operations.Linear(width, width, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, layer_context: torch.Tensor,
                context_index: torch.Tensor | None = None, kv_store: dict | None = None,
                token_valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [(b s), n, c], layer_context [(b s), t, d] -> residual [(b s), n, c].

        ``token_valid`` (bool, one row per ``layer_context`` row, [*, t]) masks padding tokens out of the
        attention; None = every token is a prompt token.

        With ``context_index`` [(b s)], ``layer_context`` holds only the distinct rows [U, t, d] and row r reads
        ``layer_context[context_index[r]]``: keys/values are projected once per distinct prompt (a batch repeats
        the same layer prompts for every sample, and mask i reads foreground i's prompt), same result.
        ``kv_store`` (a :class:`PromptKVCache` entry for this exact context) keeps this module's keys/values
        across calls.
        """
        h = self.norm(x)
        # a stored entry is valid for these exact weights (in-place updates bump _version), dtype and device
        stamp = (_weight_version(self.to_k.weight), _weight_version(self.to_v.weight), h.dtype, h.device)
        cached = kv_store.get(self) if kv_store is not None else None
        if cached is not None and cached[0] == stamp:
            k, v = cached[1]
        else:
            ctx = layer_context.to(dtype=h.dtype)
            k, v = self.to_k(ctx), self.to_v(ctx)
            if kv_store is not None:
                kv_store[self] = (stamp, (k, v))
        if context_index is not None:
            k, v = k[context_index], v[context_index]
            token_valid = token_valid[context_index] if token_valid is not None else None
        bias = None
        if token_valid is not None:  # [(b s), t] -> additive [(b s), 1, 1, t]: 0 for tokens, -inf for padding
            bias = torch.zeros(token_valid.shape, dtype=h.dtype, device=h.device)
            bias = bias.masked_fill(~token_valid.to(h.device), float("-inf"))[:, None, None, :]
        out = multi_head_attention(self.to_q(h), k, v, self.heads, bias)
        return self.to_out(out)


class RoleModulation(nn.Module):
    """Slot-role conditioning of the residual stream: ``norm(x) * scale[role] + shift[role]`` per row.

    Attention alone gives a slot its role only second-order (at init the inter-layer attention is uniform over
    the slots, so every slot receives the same average, and a mask slot reads the same prompt as its
    foreground); this branch tells each slot directly whether it is the background, foreground i or mask i.
    Both tables are zero-initialised. x [(b s), n, c], roles [(b s)] -> residual [(b s), n, c].
    """

    def __init__(self, width: int, num_roles: int, dtype=None, device=None, operations=nn):
        super().__init__()
        self.norm = operations.LayerNorm(width, dtype=dtype, device=device)
        self.scale = nn.Parameter(torch.zeros(num_roles, width, dtype=dtype, device=device))
        self.shift = nn.Parameter(torch.zeros(num_roles, width, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(dtype=x.dtype)[roles][:, None, :]  # [(b s), 1, c]
        shift = self.shift.to(dtype=x.dtype)[roles][:, None, :]
        return self.norm(x) * scale + shift


class LayerCollaborativeBlock(nn.Module):
    """Inter-layer attention followed by intra-layer cross-attention; returns the sum of both residuals."""

    def __init__(self, width: int, heads: int, context_dim: int, num_roles: int, use_inter: bool = True,
                 use_intra: bool = True, dtype=None, device=None, operations=nn, use_role: bool = False):
        super().__init__()
        self.role = RoleModulation(width, num_roles, dtype, device, operations) if use_role else None
        self.inter = (InterLayerAttention(width, heads, num_roles, dtype, device, operations, use_role)
                      if use_inter else None)
        self.intra = (IntraLayerCrossAttention(width, heads, context_dim, dtype, device, operations)
                      if use_intra else None)

    def forward(self, x: torch.Tensor, roles: torch.Tensor, slots: int, layer_context: torch.Tensor,
                inter: bool = True, intra: bool = True, context_index: torch.Tensor | None = None,
                kv_store: dict | None = None, token_valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [(b s), n, c] -> residual delta [(b s), n, c] (0 for disabled branches).

        ``layer_context`` is [(b s), t, d], or the distinct rows [U, t, d] with ``context_index`` [(b s)];
        ``token_valid`` [same rows, t] marks prompt tokens (None: all)."""
        delta = torch.zeros_like(x) if self.role is None else self.role(x, roles)
        if self.inter is not None and inter:
            delta = delta + self.inter(x, roles, slots)
        if self.intra is not None and intra:
            delta = delta + self.intra(x + delta, layer_context, context_index, kv_store, token_valid)
        return delta
