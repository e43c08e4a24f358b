"""Every bad input gets a clear error that names the node and the fix, and leaves the loaded model unpatched."""
import json

import pytest

import comfy_host
from layerdiff_host import (adapter, empty_latent, encode, node, package_module, sample, save_tiny_weights,
                            tiny_model, tiny_modules)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def errors():
    return package_module("layerdiff_model.errors")


@pytest.fixture(scope="module")
def patched(tiny):
    return adapter().apply_patch(tiny[0], tiny_modules(tiny[0]), "test")


def _assert_unpatched(model):
    to = model.model_options.get("transformer_options", {})
    assert not to.get("patches") and "apply_model" not in model.object_patches
    assert not adapter().is_patched(model)


def test_non_sd15_model_is_refused(tiny, errors):
    sdxl = comfy_host.make_tiny_sdxl_like_unet_model()
    with pytest.raises(errors.ModelFamilyError, match=r"LayerDiff Apply.*SD1.5.*Load Checkpoint") as info:
        node("LayerDiffApply").apply(sdxl, tiny_modules(tiny[0]))
    assert "SDXL" in str(info.value)
    _assert_unpatched(sdxl)


def test_weights_for_another_width_are_refused(tiny, errors):
    model = tiny[0]
    a = adapter()
    config = a.config_for_model(model)
    wider = config.replace(sites=tuple(s.__class__(s.block, s.block_id, s.index, s.width * 2, s.heads)
                                       for s in config.sites))
    name = save_tiny_weights("wider.safetensors", a.build_modules(wider))
    modules = node("LayerDiffLoadWeights").load(name)[0]
    with pytest.raises(errors.WeightsFileError,
                       match=r"LayerDiff Apply.*: the LayerDiff weights 'wider.safetensors' were made for another UNet"
                             r".*width 64, UNet width 32"):
        node("LayerDiffApply").apply(model, modules)
    _assert_unpatched(model)


def test_missing_and_corrupted_weights_files(tiny, errors):
    loader = node("LayerDiffLoadWeights")
    with pytest.raises(errors.WeightsFileError, match=r"LayerDiff Load Weights.*not found.*models/layerdiff"):
        loader.load("does_not_exist.safetensors")
    good = comfy_host.host().model_path("layerdiff", save_tiny_weights("good.safetensors", tiny_modules(tiny[0])))
    broken = good.with_name("broken.safetensors")
    broken.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    import folder_paths
    getattr(folder_paths, "filename_list_cache", {}).pop("layerdiff", None)
    with pytest.raises(errors.WeightsFileError, match=r"LayerDiff Load Weights.*truncated or corrupted"):
        loader.load("broken.safetensors")


def test_weights_of_a_newer_format_version_ask_for_an_update(tiny, errors):
    path = comfy_host.host().model_path("layerdiff", save_tiny_weights("future.safetensors", tiny_modules(tiny[0])))
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    header["__metadata__"]["format_version"] = "9"
    new_header = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    assert len(new_header) == header_len
    path.write_bytes(bytes(data[:8]) + new_header + bytes(data[8 + header_len:]))
    with pytest.raises(errors.WeightsFileError, match="version 9.*update ComfyUI-LayerDiff"):
        node("LayerDiffLoadWeights").load("future.safetensors")


def test_foreground_count_mismatch_between_latent_and_conditioning(tiny, patched, errors):
    pos, neg, _ = encode(tiny[1], ["a red circle", "a blue square"])
    with pytest.raises(errors.LayoutError, match=r"LayerDiff SMG KSampler.*latent has 1 foreground.*'positive' has 2"):
        sample(patched, pos, neg, empty_latent(1))


def test_zero_foreground_prompts(tiny, errors):
    with pytest.raises(errors.LayoutError, match=r"LayerDiff Layer Prompt Encode.*'foreground_prompts' is empty"):
        encode(tiny[1], ["", "   "])


def test_latent_that_is_not_layered(tiny, patched, errors):
    import nodes
    pos, neg, _ = encode(tiny[1], ["a red circle"])
    plain = nodes.EmptyLatentImage().generate(64, 64, 3)[0]
    with pytest.raises(errors.LayoutError, match=r"SMG KSampler.*not a layered latent.*Empty Layered Latent"):
        sample(patched, pos, neg, plain)


def test_latent_cut_by_a_batch_node(tiny, patched, errors):
    import nodes
    pos, neg, _ = encode(tiny[1], ["a red circle"])
    cut = nodes.LatentFromBatch().frombatch(empty_latent(1, batch=2), 1, 4)[0]
    with pytest.raises(errors.LayoutError, match=r"4 rows, not a multiple of 3 slots"):
        sample(patched, pos, neg, cut)


def test_plain_negative_conditioning(tiny, patched, errors):
    import nodes
    pos, _, _ = encode(tiny[1], ["a red circle"])
    plain_neg = nodes.CLIPTextEncode().encode(tiny[1], "bad")[0]
    with pytest.raises(errors.LayoutError, match=r"'negative' has an entry without layer prompts.*Layer Prompt Encode"):
        sample(patched, pos, plain_neg, empty_latent(1))


def test_unpatched_model_in_the_smg_sampler(tiny, errors):
    pos, neg, _ = encode(tiny[1], ["a red circle"])
    with pytest.raises(errors.LayerDiffError, match=r"SMG KSampler.*not LayerDiff-patched.*LayerDiff Apply"):
        sample(tiny[0], pos, neg, empty_latent(1))


def test_more_foregrounds_than_the_weights_support(tiny, errors):
    model = tiny[0]
    two = adapter().apply_patch(model, tiny_modules(model, max_foregrounds=2), "test")
    pos, neg, n = encode(tiny[1], ["a", "b", "c"])
    with pytest.raises(errors.LayoutError, match="3 foregrounds requested.*at most 2"):
        sample(two, pos, neg, empty_latent(n))


def test_applying_twice_is_refused(patched, errors, tiny):
    with pytest.raises(errors.LayerDiffError, match="already has LayerDiff applied"):
        node("LayerDiffApply").apply(patched, tiny_modules(tiny[0]))


def test_error_reaches_the_user_through_comfyui_executor(tiny):
    """Through ComfyUI's executor the error is reported for our node with our message."""
    name = comfy_host.ensure_tiny_sd15_checkpoint()
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
        "2": {"class_type": "LayerDiffPromptEncode", "inputs": {
            "clip": ["1", 1], "global_prompt": "x", "background_prompt": "y", "foreground_prompts": "\n",
            "negative_prompt": ""}},
        "3": {"class_type": "PreviewAny" if False else "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    with pytest.raises(comfy_host.NodeExecutionError, match="foreground_prompts' is empty"):
        comfy_host.run_prompt(prompt)
