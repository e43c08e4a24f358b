"""Errors meant for users: each message says what is wrong, which input, expected vs found, and the fix."""


class LayerDiffError(Exception):
    """Base class of every error LayerDiff raises on purpose (bad input, incompatible files or models)."""


class ModelFamilyError(LayerDiffError):
    """The loaded model is not an SD1.5-family UNet, or does not match the weights file."""


class WeightsFileError(LayerDiffError):
    """A LayerDiff weights file is missing, corrupted, or made for another model."""


class LayoutError(LayerDiffError):
    """A latent, image batch or conditioning does not follow the layered slot layout."""


class DatasetError(LayerDiffError):
    """A layered dataset sample or shard is malformed."""
