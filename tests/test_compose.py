"""Layered images <-> decoded slots <-> composite (layerdiff_model.layers.compose; pure torch, no ComfyUI)."""
import pytest
import torch

from comfy_headless.product import product_module, product_names

C = product_module("layerdiff_model.layers.compose")
LayerDiffError, LayoutError = product_names("layerdiff_model.errors", "LayerDiffError", "LayoutError")
pack = product_names("layerdiff_model.slots", "pack")


def known_layers(b=2, n=2, h=6, w=5, seed=0, soft=False):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(b, n, h, w, generator=g)
    masks = masks if soft else (masks > 0.5).float()
    return C.LayeredImages(torch.rand(b, h, w, 3, generator=g), torch.rand(b, n, h, w, 3, generator=g), masks,
                           ["a wall"] + [f"object {i}" for i in range(1, n + 1)])


def reference_composite(layers):
    """The paper's equation, one pixel term at a time (independent of the vectorised implementation)."""
    out = torch.zeros_like(layers.background)
    uncovered = torch.ones_like(layers.masks[:, 0])  # prod_{j<k} (1 - M_j), [B, H, W]
    for k in range(layers.num_foregrounds):
        m = layers.masks[:, k]
        out += (m * uncovered).unsqueeze(-1) * layers.foregrounds[:, k]
        uncovered = uncovered * (1 - m)
    return out + uncovered.unsqueeze(-1) * layers.background


def decoded_slots(layers):
    """What VAE Decode returns for a layered latent: [B*S, H, W, 3], masks as grey RGB images."""
    return pack(layers.background, layers.foregrounds, layers.masks.unsqueeze(-1).expand(*layers.masks.shape, 3))


def test_hand_computed_two_foregrounds_with_partial_overlap():
    # one row of 4 pixels: top only | both (overlap) | second only | none
    background = torch.tensor([0.1, 0.2, 0.3]).expand(1, 1, 4, 3)  # [B, H, W, 3]
    top = torch.tensor([0.9, 0.0, 0.0]).expand(1, 4, 3)  # red, [H, W, 3]
    second = torch.tensor([0.0, 0.0, 0.8]).expand(1, 4, 3)  # blue
    foregrounds = torch.stack([top, second]).unsqueeze(0)  # [1, 2, 1, 4, 3]
    masks = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]], [[0.0, 1.0, 1.0, 0.0]]]])  # [1, 2, 1, 4]
    out = C.compose(C.LayeredImages(background, foregrounds, masks))
    expected = torch.tensor([[0.9, 0.0, 0.0], [0.9, 0.0, 0.0], [0.0, 0.0, 0.8], [0.1, 0.2, 0.3]])
    assert out.shape == (1, 1, 4, 3)
    assert torch.allclose(out[0, 0], expected)  # pixel 1: the top layer wins where masks overlap

    half = C.compose(C.LayeredImages(background, foregrounds, masks * 0.5))
    # overlap pixel: 0.5*top + 0.5*(1-0.5)*second + (1-0.5)(1-0.5)*background
    overlap = 0.5 * torch.tensor([0.9, 0.0, 0.0]) + 0.25 * torch.tensor([0.0, 0.0, 0.8]) \
        + 0.25 * torch.tensor([0.1, 0.2, 0.3])
    assert torch.allclose(half[0, 0, 1], overlap)
    assert torch.allclose(half[0, 0, 3], torch.tensor([0.1, 0.2, 0.3]))


def test_vectorised_compose_equals_the_equation_for_soft_masks():
    layers = known_layers(b=3, n=3, soft=True, seed=1)
    assert torch.allclose(C.compose(layers), reference_composite(layers), atol=1e-6)
    weights, bg_weight = C.visibility(layers.masks)
    assert torch.allclose(weights.sum(1) + bg_weight, torch.ones_like(bg_weight), atol=1e-6)  # a partition of 1


def test_split_of_packed_slots_composes_to_the_known_composite():
    layers = known_layers(b=2, n=3)
    slots = decoded_slots(layers)
    assert slots.shape == (2 * 7, 6, 5, 3)
    split = C.split_decoded_slots(slots, 3)
    assert torch.equal(C.compose(split), reference_composite(layers))
    assert torch.equal(split.background, layers.background)
    assert torch.equal(split.foregrounds, layers.foregrounds)
    assert torch.equal(split.masks, layers.masks)
    assert torch.equal(split.background[1], slots[7])  # (b s) order: sample 1 starts at row S
    assert split.names == ["background", "layer 1", "layer 2", "layer 3"]
    assert C.split_decoded_slots(slots, 3, names=layers.names).names == layers.names


def test_layers_to_slot_images_is_the_inverse_of_split():
    layers = known_layers()
    slots = C.layers_to_slot_images(layers)
    assert torch.equal(slots, decoded_slots(layers))
    mask_rows = slots.reshape(2, 5, 6, 5, 3)[:, 3:]  # [B, N, H, W, 3]: the mask slots
    assert torch.equal(mask_rows[..., 0], mask_rows[..., 2])  # grey: RGB-replicated
    back = C.split_decoded_slots(slots, 2)
    assert torch.equal(C.layers_to_slot_images(back), slots)


def test_decoded_masks_are_binarized_at_the_threshold():
    layers = known_layers(b=1, n=2)
    slots = decoded_slots(layers) * 0.8 + 0.1  # a VAE never returns exact 0/1: grey levels 0.1 / 0.9
    slots[3, 0, 0] = torch.tensor([0.9, 0.1, 0.45])  # mask 1 pixel with mean 0.4833 -> 0
    split = C.split_decoded_slots(slots, 2)
    assert set(split.masks.unique().tolist()) <= {0.0, 1.0}
    expected = layers.masks.clone()
    expected[0, 0, 0, 0] = 0.0
    assert torch.equal(split.masks, expected)
    assert C.split_decoded_slots(slots, 2, threshold=0.45).masks[0, 0, 0, 0] == 1.0
    soft = C.split_decoded_slots(slots, 2, binarize=False).masks
    assert torch.allclose(soft, (slots[3:5].mean(-1)).unsqueeze(0))
    assert 0.05 < float(soft.min()) and float(soft.max()) < 0.95


def test_wrong_row_count_or_shape_is_a_clear_layout_error():
    slots = decoded_slots(known_layers(b=2, n=2))  # 10 rows
    with pytest.raises(LayoutError, match=r"9 decoded images are not whole layered images of 5 slots"):
        C.split_decoded_slots(slots[:-1], 2)
    with pytest.raises(LayoutError, match="not whole layered images of 7 slots"):
        C.split_decoded_slots(slots, 3)
    with pytest.raises(LayoutError, match=r"\[B\*S, H, W, 3\]"):
        C.split_decoded_slots(slots[..., 0], 2)
    with pytest.raises(LayoutError, match="at least one foreground"):
        C.split_decoded_slots(slots, 0)
    assert issubclass(LayoutError, LayerDiffError)


def test_layered_images_checks_shapes_and_names():
    layers = known_layers()
    with pytest.raises(LayoutError, match="do not fit together"):
        C.LayeredImages(layers.background, layers.foregrounds, layers.masks[:, :1])
    with pytest.raises(LayoutError, match="do not fit together"):
        C.LayeredImages(layers.background[:, :3], layers.foregrounds, layers.masks)
    with pytest.raises(LayoutError, match="3 layer names given"):
        C.LayeredImages(layers.background, layers.foregrounds[:, :1], layers.masks[:, :1], ["a", "b", "c"])
    assert C.LayeredImages(layers.background, layers.foregrounds, layers.masks).names == \
        ["background", "layer 1", "layer 2"]


def test_rgba_round_trip():
    layers = known_layers(soft=True)
    rgba = C.to_rgba(layers)
    assert rgba.shape == (2, 2, 6, 5, 4)
    rgb, alpha = C.rgba_to_layer(rgba)
    assert torch.equal(rgb, layers.foregrounds) and torch.equal(alpha, layers.masks)
    rebuilt = C.layers_from_rgba(layers.background, rgba, layers.names)
    assert torch.equal(C.compose(rebuilt), C.compose(layers)) and rebuilt.names == layers.names
    with pytest.raises(LayoutError, match="4 channels"):
        C.rgba_to_layer(rgba[..., :3])
