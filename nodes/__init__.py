"""ComfyUI node classes of ComfyUI-LayerDiff (thin: check inputs, call the host adapter, return)."""
from .host import inference
from .nodes_conditioning import LayerDiffEnhancePrompts, LayerDiffPromptEncode
from .nodes_layer_edit import (LayerDiffCompositeGuidance, LayerDiffLayerControlNet, LayerDiffPictureToLatent,
                               LayerDiffRegenerateLayers)
from .nodes_layer_input import LayerDiffEncodeLayers, LayerDiffLoadLayeredFile
from .nodes_layers import LayerDiffComposeLayers, LayerDiffSaveLayers, LayerDiffSplitLayers
from .nodes_model import LayerDiffApply, LayerDiffLoadWeights
from .nodes_sampling import LayerDiffEmptyLatent, LayerDiffSelfMaskGuidance, LayerDiffSMGSampler

# Node ids are public API (saved in workflows): never rename them. Display names may change.
_NODES = (
    LayerDiffLoadWeights,
    LayerDiffApply,
    LayerDiffPromptEncode,
    LayerDiffEnhancePrompts,
    LayerDiffEmptyLatent,
    LayerDiffSMGSampler,
    LayerDiffSelfMaskGuidance,
    LayerDiffSplitLayers,
    LayerDiffComposeLayers,
    LayerDiffSaveLayers,
    LayerDiffEncodeLayers,
    LayerDiffLoadLayeredFile,
    LayerDiffRegenerateLayers,
    LayerDiffLayerControlNet,
    LayerDiffPictureToLatent,
    LayerDiffCompositeGuidance,
)

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: cls.DISPLAY_NAME for cls in _NODES}

inference.register_folders()
