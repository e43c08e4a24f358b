"""Unit tests of the model package, which imports no ComfyUI (its modules come from the copy ComfyUI loaded)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from comfy_headless.product import product_module, product_names

slots = product_module("layerdiff_model.slots")
smg = product_module("layerdiff_model.sampling.smg")
multi_head_attention = product_names("layerdiff_model.modules.attention", "multi_head_attention")
LayerPrompts, slot_context_rows, stack_layer_embeds = product_names(
    "layerdiff_model.sampling.conditioning", "LayerPrompts", "slot_context_rows", "stack_layer_embeds")
LayerDiffConfig, Site = product_names("layerdiff_model.modules.config", "LayerDiffConfig", "Site")
LayoutError, WeightsFileError = product_names("layerdiff_model.errors", "LayoutError", "WeightsFileError")
LayerDiffModules = product_names("layerdiff_model.modules.container", "LayerDiffModules")
load_config, load_modules, save_weights = product_names(
    "layerdiff_model.modules.weights", "load_config", "load_modules", "save_weights")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITES = (Site("input", 1, 0, 32, 4), Site("middle", 0, 0, 64, 8))


def make_modules(zero=True, seed=0, **kw):
    return LayerDiffModules(LayerDiffConfig(sites=SITES, max_foregrounds=3, **kw)).initialize(seed, zero_outputs=zero)


def test_model_package_imports_without_comfyui():
    """Every module of layerdiff_model imports in a process where ComfyUI cannot be imported."""
    code = ("import sys, pkgutil, importlib; sys.modules['comfy'] = None; sys.modules['folder_paths'] = None; "
            "import layerdiff_model as p; "
            "names = [m.name for m in pkgutil.walk_packages(p.__path__, 'layerdiff_model.')]; "
            "[importlib.import_module(n) for n in names]; assert len(names) >= 30, names; "
            "assert not any(k == 'comfy' or k.startswith('comfy.') for k in sys.modules if sys.modules[k] is not None)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_pack_unpack_round_trip_and_order():
    b, n = 2, 3
    bg = torch.arange(b).float().view(b, 1) * 100
    fg = bg.view(b, 1, 1) + torch.arange(1, n + 1).float().view(1, n, 1)
    mk = bg.view(b, 1, 1) + 10 + torch.arange(1, n + 1).float().view(1, n, 1)
    rows = slots.pack(bg, fg, mk)
    assert rows.shape == (b * 7, 1)
    assert rows[:7, 0].tolist() == [0, 1, 2, 3, 11, 12, 13]
    assert rows[7, 0].item() == 100
    bg2, fg2, mk2 = slots.unpack(rows, n)
    assert torch.equal(bg2, bg) and torch.equal(fg2, fg) and torch.equal(mk2, mk)
    with pytest.raises(LayoutError, match="cannot be split"):
        slots.unpack(rows[:-1], n)


def test_roles_and_row_layout():
    info = slots.slot_info_table(2).repeat(3, 1)  # ComfyUI tiles r % S
    assert slots.rows_layout(info) == (2, 5)
    assert slots.roles_for_rows(info, 4)[:5].tolist() == [0, 1, 2, 5, 6]
    with pytest.raises(LayoutError, match="not whole layered samples"):
        slots.rows_layout(info[1:])
    with pytest.raises(LayoutError, match="at most 3"):
        slots.slot_roles(4, 3)


def test_zero_initialised_modules_are_identity():
    m = make_modules(zero=True)
    x = torch.randn(10, 16, 32)
    info = slots.slot_info_table(2).repeat(2, 1)
    delta = m.blocks["input_1_0"](x, slots.roles_for_rows(info, 3), 5, torch.randn(10, 7, 768))
    assert torch.count_nonzero(delta) == 0
    tokens = torch.randn(3, 7, 768)
    assert torch.equal(m.enhance(tokens, torch.randn(1, 9, 768)), tokens)


def test_inter_layer_attention_mixes_only_within_a_sample():
    m = make_modules(zero=False, seed=1)
    block = m.blocks["input_1_0"]
    info = slots.slot_info_table(1).repeat(2, 1)  # 2 samples x 3 slots
    roles = slots.roles_for_rows(info, 3)
    x = torch.randn(6, 4, 32)
    ctx = torch.randn(6, 5, 768)
    base = block(x, roles, 3, ctx, intra=False)
    x2 = x.clone()
    x2[1] += torch.randn(4, 32)  # change sample 0's foreground
    out = block(x2, roles, 3, ctx, intra=False)
    assert not torch.allclose(out[0], base[0])  # sample 0's background sees it (inter-layer exchange)
    assert torch.allclose(out[3:], base[3:])  # sample 1 untouched
    no_inter = block(x2, roles, 3, ctx, inter=False, intra=True)
    ref = block(x, roles, 3, ctx, inter=False, intra=True)
    assert torch.allclose(no_inter[0], ref[0])  # without inter-layer attention slots are independent


def test_inter_layer_attention_in_position_chunks_equals_one_pass():
    """Large inputs run in runs of positions (bounded temporaries): the output is the one-pass output, chunks
    that do not divide the positions included, and a changed position changes only its own output."""
    m = make_modules(zero=False, seed=1)  # role modulation on: the role bias is included
    inter = m.blocks["input_1_0"].inter
    roles = slots.roles_for_rows(slots.slot_info_table(2).repeat(2, 1), 3)  # 2 samples x 5 slots
    x = torch.randn(10, 37, 32)
    whole = inter(x, roles, 5)
    for elements in (10 * 32, 10 * 32 * 5, 10 * 32 * 36):  # 1, 5 and 36 positions per run
        assert torch.allclose(inter(x, roles, 5, chunk_elements=elements), whole, atol=1e-6, rtol=1e-5)
    x2 = x.clone()
    x2[:, 20] += torch.randn(10, 32)  # (a constant shift would vanish in the layer norm)
    moved = (inter(x2, roles, 5, chunk_elements=10 * 32 * 3) - whole).abs().amax(dim=(0, 2))
    assert moved[20] > 1e-3 and moved[torch.arange(37) != 20].max() < 1e-5


def test_role_modulation_tells_a_mask_slot_from_its_foreground():
    """fg_1 and mask_1 read the same prompt; with identical inputs only the role can make them differ."""
    info = slots.slot_info_table(1)  # [background, fg_1, mask_1]
    roles = slots.roles_for_rows(info, 3)
    x = torch.randn(1, 4, 32).repeat(3, 1, 1)  # the same hidden state in every slot
    ctx = torch.randn(1, 5, 768).repeat(3, 1, 1)
    for use_role, differs in ((False, False), (True, True)):
        block = make_modules(zero=False, seed=2, use_role_modulation=use_role).blocks["input_1_0"]
        with torch.no_grad():
            for name, p in block.named_parameters():
                if name.startswith("role.") and name != "role.norm.weight":
                    p.normal_()  # a trained role table (zero at init)
        delta = block(x, roles, 3, ctx, inter=False, intra=True)
        assert (not torch.allclose(delta[1], delta[2])) is differs


def test_weights_written_before_role_modulation_still_load():
    old = LayerDiffConfig(sites=SITES, use_role_modulation=False)
    raw = json.loads(old.to_json())
    del raw["use_role_modulation"]  # a file of format version 1 from before the option existed
    assert LayerDiffConfig.from_json(json.dumps(raw)) == old
    assert LayerDiffConfig.from_json(LayerDiffConfig(sites=SITES).to_json()).use_role_modulation


def test_token_repetition_leaves_attention_unchanged():
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    a = multi_head_attention(q, k, v, 4)
    b = multi_head_attention(q, k.repeat(1, 3, 1), v.repeat(1, 3, 1), 4)
    assert torch.allclose(a, b, atol=1e-5)
    embeds = (torch.randn(1, 77, 8), torch.randn(1, 154, 8))
    stacked = stack_layer_embeds(embeds)
    assert stacked.shape == (2, 154, 9)  # 8 channels + the token validity
    assert torch.equal(stacked[0, :, :8], embeds[0].repeat(1, 2, 1)[0]) and bool((stacked[..., 8] == 1).all())
    rows = slot_context_rows(LayerPrompts(("bg", "fg"), embeds))
    assert rows.shape == (3, 154, 9)
    assert torch.equal(rows[1], rows[2])  # the mask slot reads its foreground's prompt


def test_layer_prompt_lengths_cost_linear_memory_and_padding_is_masked_exactly():
    """Prompts of 1, 5, 7, 8 and 9 CLIP windows: their lcm is 2,520 windows (194,040 tokens per row); the layer
    context is now as long as the longest prompt, and each row's attention equals attention over its own tokens."""
    split_token_validity = product_names("layerdiff_model.sampling.conditioning", "split_token_validity")
    IntraLayerCrossAttention = product_names("layerdiff_model.modules.attention", "IntraLayerCrossAttention")
    g = torch.Generator().manual_seed(0)
    windows = (1, 5, 7, 8, 9)
    embeds = tuple(torch.randn(1, 77 * w, 16, generator=g) for w in windows)
    stacked = stack_layer_embeds(embeds)
    assert stacked.shape == (5, 77 * 9, 17)  # was [5, 194040, 16]: 280x smaller here
    tokens, valid = split_token_validity(stacked)
    # 1 window divides 9: repeated (all tokens valid); 5, 7 and 8 windows are zero-padded and masked
    assert valid is not None and valid.sum(dim=1).tolist() == [693, 385, 539, 616, 693]
    torch.manual_seed(1)
    attn = IntraLayerCrossAttention(32, 4, 16)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(5, 12, 32, generator=g)
    with torch.no_grad():
        masked = attn(x, tokens, token_valid=valid)
        alone = torch.cat([attn(x[i:i + 1], e) for i, e in enumerate(embeds)])
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-6)
    # within ComfyUI's bound (lcm <= 4x the longest) prompts are repeated as before: no padding, no mask
    repeated = stack_layer_embeds((embeds[0], torch.randn(1, 154, 16), torch.randn(1, 231, 16)))
    assert repeated.shape[1] == 462 and split_token_validity(repeated)[1] is None


def test_weights_round_trip_and_metadata(tmp_path):
    m = make_modules(zero=False, seed=2)
    path = save_weights(tmp_path / "w.safetensors", m)
    assert load_config(path) == m.config
    loaded = load_modules(path)
    for (k, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left


def test_weights_errors(tmp_path):
    with pytest.raises(WeightsFileError, match="not found"):
        load_modules(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(WeightsFileError, match="corrupted"):
        load_modules(bad)
    good = save_weights(tmp_path / "good.safetensors", make_modules())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(WeightsFileError, match="truncated or corrupted"):
        load_modules(truncated)
    from safetensors.torch import save_file
    other = tmp_path / "lora.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(WeightsFileError, match="not a LayerDiff weights file"):
        load_modules(other)


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    w = product_module("layerdiff_model.modules.weights")
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(product_module("layerdiff_model.safetensors_file"), "save_file", boom)
    with pytest.raises(OSError):
        w.save_weights(target, make_modules())
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_smg_blurs_foregrounds_inside_their_masks_only():
    n, b = 2, 1
    x0 = torch.randn(b * 5, 4, 16, 16)
    masks = torch.zeros(b, n, 1, 16, 16)
    masks[0, 0, :, 4:12, 4:12] = 1
    out = smg.degrade_foregrounds(x0, masks, n, 2.0)
    changed = (out - x0).abs().sum(1) > 1e-6  # [rows, h, w]
    assert not changed[0].any() and not changed[2].any() and not changed[3:].any()  # bg, fg2, masks untouched
    assert changed[1, 4:12, 4:12].all() and not changed[1, :4].any()
    cfg = torch.randn(5, 4, 16, 16)
    assert torch.equal(smg.apply_guidance(cfg, x0, out, 0.0), cfg)


def test_mask_readout_reads_grey_levels():
    m = make_modules()
    white = torch.tensor([0.3012, 0.3525, 0.0551, -0.3971]).view(1, 4, 1, 1) * 2  # ~ latent of a white image
    readout = m.mask_readout
    assert readout(white * 0 - white).mean() < 0.3 < 0.7 < readout(white).mean()


def test_narrow_enhancer_is_identity_at_init_and_small():
    narrow = make_modules(zero=True, enhancer_width=64, enhancer_heads=4)
    tokens = torch.randn(2, 7, 768)
    assert torch.equal(narrow.enhance(tokens, torch.randn(1, 9, 768)), tokens)
    full = make_modules(zero=True)
    assert sum(p.numel() for p in narrow.enhancer.parameters()) < sum(p.numel() for p in full.enhancer.parameters()) / 10
    changed = make_modules(zero=False, enhancer_width=64, enhancer_heads=4).enhance(tokens, torch.randn(1, 9, 768))
    assert not torch.allclose(changed, tokens)


def test_distinct_context_rows_give_the_same_layer_block_output():
    """Projecting keys/values once per distinct layer prompt (the speed path the UNet patch takes) changes
    nothing: same residual as attending to the full per-row context."""
    LayerCollaborativeBlock = product_names("layerdiff_model.modules.attention", "LayerCollaborativeBlock")
    distinct_rows = product_names("layerdiff_model.sampling.conditioning", "distinct_rows")

    torch.manual_seed(0)
    block = LayerCollaborativeBlock(32, 4, 48, num_roles=7)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    prompts = torch.randn(3, 5, 48)
    rows = prompts[torch.tensor([0, 1, 2, 1, 2] * 2)]  # 2 samples x (bg, fg1, fg2, mask1, mask2)
    x = torch.randn(10, 16, 32)
    roles = torch.tensor([0, 1, 2, 4, 5] * 2)
    distinct, index = distinct_rows(rows)
    assert distinct.shape[0] == 3 and torch.equal(distinct[index], rows)
    full = block(x, roles, 5, rows)
    fast = block(x, roles, 5, distinct, context_index=index)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    trainable = rows.clone().requires_grad_(True)
    kept, identity = distinct_rows(trainable)
    assert kept is trainable and torch.equal(identity, torch.arange(10))


def test_prompt_keys_and_values_are_reused_across_calls_only_while_valid():
    """Sampling reuses the layer prompts' keys/values across steps: same output, projected once; a weight
    update (training) or recorded gradients never see stale ones."""
    IntraLayerCrossAttention = product_names("layerdiff_model.modules.attention", "IntraLayerCrossAttention")
    PromptKVCache = product_names("layerdiff_model.sampling.prompt_kv_cache", "PromptKVCache")

    torch.manual_seed(0)
    attn = IntraLayerCrossAttention(32, 4, 48)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.1)
    calls = []
    attn.to_k.register_forward_hook(lambda *a: calls.append(1))
    context, x = torch.randn(3, 5, 48), torch.randn(3, 16, 32)
    cache = PromptKVCache(max_entries=2)
    with torch.no_grad():
        reference = attn(x, context)
        calls.clear()
        outs = [attn(x, context, kv_store=cache.lookup(context.clone(), x.dtype)) for _ in range(3)]
        assert len(calls) == 1 and all(torch.equal(o, reference) for o in outs)
        attn.to_k.weight.add_(0.5)  # an optimizer step
        updated = attn(x, context, kv_store=cache.lookup(context, x.dtype))
        assert len(calls) == 2 and torch.equal(updated, attn(x, context))
        for other in (torch.randn(3, 5, 48), torch.randn(3, 5, 48)):
            cache.lookup(other, x.dtype)
        assert len(cache) == 2  # bounded
    assert cache.lookup(context, x.dtype) is None  # gradients recorded: never cached


def test_prompt_kv_cache_works_with_weights_loaded_in_inference_mode():
    """ComfyUI's executor loads weights under torch.inference_mode: those tensors have no version counter."""
    IntraLayerCrossAttention = product_names("layerdiff_model.modules.attention", "IntraLayerCrossAttention")
    PromptKVCache = product_names("layerdiff_model.sampling.prompt_kv_cache", "PromptKVCache")

    with torch.inference_mode():
        attn = IntraLayerCrossAttention(32, 4, 48)
    context, x, cache = torch.randn(3, 5, 48), torch.randn(3, 16, 32), PromptKVCache()
    with torch.inference_mode():
        first = attn(x, context, kv_store=cache.lookup(context, x.dtype))
        assert torch.equal(attn(x, context, kv_store=cache.lookup(context, x.dtype)), first)
