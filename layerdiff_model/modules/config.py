"""Configuration of the LayerDiff modules (docs/DESIGN.md 2.2, 2.3, 2.5).

Everything that shapes a weight tensor lives here, is derived from the loaded UNet (never hard-coded to SD1.5's
320/640/1280) and is stored as JSON in the weights file's metadata, so a file can be checked against a model
before any tensor is loaded. A :class:`Site` names one transformer block (where, its channel width ``c`` and head
count), so its attention block works on ``[(b s), h*w, c]`` rows; ``context_dim`` (d) is the prompt token width.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

FORMAT_NAME = "layerdiff"
FORMAT_VERSION = 1
BASE_FAMILY_SD15 = "sd15"
SD15_CONTEXT_DIM = 768  # width of SD1.5's CLIP-L text context: what the cross-attention keys are made from


@dataclass(frozen=True)
class Site:
    """One transformer block of the UNet where a layer-collaborative block is inserted.

    ``key`` is ComfyUI's block identity ``(block name, block id, index in the SpatialTransformer)``,
    e.g. ``("input", 1, 0)``; ``width`` is the block's hidden size, ``heads`` its attention head count.
    """

    block: str
    block_id: int
    index: int
    width: int
    heads: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.block, self.block_id, self.index)

    @property
    def name(self) -> str:
        """Module-safe name, e.g. ``input_1_0`` (used in state-dict keys)."""
        return f"{self.block}_{self.block_id}_{self.index}"


@dataclass(frozen=True)
class LayerDiffConfig:
    sites: tuple[Site, ...]
    context_dim: int = SD15_CONTEXT_DIM
    max_foregrounds: int = 3
    latent_channels: int = 4
    enhancer_depth: int = 2
    enhancer_heads: int = 8
    enhancer_width: int = 0  # 0 = CLIP width (context_dim); smaller = bottleneck (e.g. small test/toy weights)
    use_inter_layer: bool = True
    use_intra_layer: bool = True
    use_enhancer: bool = True
    use_role_modulation: bool = True  # per-role scale/shift per block + per-role inter-layer attention bias
    base_family: str = BASE_FAMILY_SD15
    format_version: int = FORMAT_VERSION
    notes: dict = field(default_factory=dict)

    def site(self, key: tuple[str, int, int]) -> Site:
        for s in self.sites:
            if s.key == key:
                return s
        raise KeyError(key)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LayerDiffConfig":
        raw = json.loads(text)
        raw["sites"] = tuple(Site(**s) for s in raw["sites"])
        raw.setdefault("use_role_modulation", False)  # files written before role modulation existed
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def with_sites(self, sites) -> "LayerDiffConfig":
        return dataclasses.replace(self, sites=tuple(sites))

    def replace(self, **changes) -> "LayerDiffConfig":
        return dataclasses.replace(self, **changes)
