"""The transformers dataset backends on tiny random-weight models built here (no weights are downloaded):
OWLv2, Grounding DINO, SAM, Depth Anything, BLIP-2, InstructBLIP and CLIP are saved with save_pretrained and
loaded back through the load_* functions, so the real loading, pre/post-processing and batching paths run."""
import json

import numpy as np
import pytest
import torch

from comfy_headless.product import product_module, product_names

backends = product_module("layerdiff_model.data.construction.transformers_backends")
stages = product_module("layerdiff_model.data.construction.stages")
DatasetError = product_names("layerdiff_model.errors", "DatasetError")

transformers = pytest.importorskip("transformers")

WIDE, SQUARE = (24, 40), (32, 32)  # (H, W) of the two test pictures


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for size in (WIDE, SQUARE)]


# ---------------------------------------------------------------- tiny tokenizers, configs and models


def _bpe_files(folder, extra, clip=False) -> tuple[str, str]:
    """A byte-level BPE vocabulary with no merges (every byte is a token); special tokens last, so no id is 0
    (OWLv2 masks a query whose first token id is 0)."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = chars + ([c + "</w>" for c in chars] if clip else []) + list(extra)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def _clip_tokenizer(folder):
    return transformers.CLIPTokenizer(*_bpe_files(folder, ["<|startoftext|>", "<|endoftext|>"], clip=True),
                                      model_max_length=16)


def _opt_tokenizer(folder):
    tok = transformers.GPT2Tokenizer(*_bpe_files(folder, ["<pad>", "</s>", "<unk>"]), bos_token="</s>",
                                     eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.add_tokens([transformers.AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    return tok


def _bert_tokenizer(folder):
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "the", *letters, *("##" + c for c in letters)]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return transformers.BertTokenizer(str(folder / "vocab.txt"))


def _clip_parts(tok):
    n = len(tok)
    text = dict(vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    return text, vision


def _owlv2(root):
    tok = _clip_tokenizer(root / "clip_tok")
    text, vision = _clip_parts(tok)
    model = transformers.Owlv2ForObjectDetection(
        transformers.Owlv2Config(text_config=text, vision_config=vision, projection_dim=16))
    with torch.no_grad():  # boxes = the box bias alone: a grid of square patch-sized boxes over the padded square
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.zero_()
    return model, transformers.Owlv2Processor(transformers.Owlv2ImageProcessor(size={"height": 32, "width": 32}), tok)


def _clip(root):
    tok = _clip_tokenizer(root / "clip_tok")
    text, vision = _clip_parts(tok)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    ip = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, transformers.CLIPProcessor(ip, tok)


def _grounding_dino(root):
    tok = _bert_tokenizer(root / "bert_tok")
    swin = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                   window_size=2, out_indices=[1, 2])
    bert = transformers.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=64)
    config = transformers.GroundingDinoConfig(
        backbone_config=swin, text_config=bert, d_model=32, num_queries=8, encoder_layers=1, decoder_layers=1,
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        num_feature_levels=2, encoder_n_points=2, decoder_n_points=2)
    ip = transformers.GroundingDinoImageProcessor(size={"shortest_edge": 32, "longest_edge": 48})
    return transformers.GroundingDinoForObjectDetection(config), transformers.GroundingDinoProcessor(ip, tok)


def _sam(root):
    config = transformers.SamConfig(
        vision_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, window_size=2, global_attn_indexes=[0], mlp_dim=32,
                           num_pos_feats=4),
        prompt_encoder_config=dict(hidden_size=8, image_size=32, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=8, mlp_dim=16, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=8))
    ip = transformers.SamImageProcessor(size={"longest_edge": 32}, pad_size={"height": 32, "width": 32},
                                        mask_size={"longest_edge": 8}, mask_pad_size={"height": 8, "width": 8})
    return transformers.SamModel(config), transformers.SamProcessor(ip)


def _depth_anything(root):
    dinov2 = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=32, image_size=28, patch_size=14,
                                       out_features=["stage1", "stage2"], reshape_hidden_states=False)
    config = transformers.DepthAnythingConfig(backbone_config=dinov2, reassemble_hidden_size=16,
                                              neck_hidden_sizes=[8, 16], fusion_hidden_size=8, head_hidden_size=8,
                                              reassemble_factors=[2, 1])
    ip = transformers.DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=True,
                                        ensure_multiple_of=14)
    model = transformers.DepthAnythingForDepthEstimation(config)
    with torch.no_grad():
        model.head.conv3.bias.fill_(1.0)  # keep the relative head's final ReLU from zeroing the random map
    return model, ip


def _blip(root, instruct: bool):
    tok = _opt_tokenizer(root / "opt_tok")
    opt = transformers.OPTConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                 num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16,
                                 pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    qformer = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                   encoder_hidden_size=16, max_position_embeddings=64)
    common = dict(vision_config=vision, text_config=opt.to_dict(), num_query_tokens=4,
                  image_token_index=tok.convert_tokens_to_ids("<image>"))
    ip = transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    if not instruct:
        config = transformers.Blip2Config(qformer_config=dict(qformer, vocab_size=8), **common)
        return (transformers.Blip2ForConditionalGeneration(config),
                transformers.Blip2Processor(ip, tok, num_query_tokens=4))
    qtok = _bert_tokenizer(root / "qformer_tok")
    config = transformers.InstructBlipConfig(qformer_config=dict(qformer, vocab_size=len(qtok)), **common)
    return (transformers.InstructBlipForConditionalGeneration(config),
            transformers.InstructBlipProcessor(ip, tok, qtok, num_query_tokens=4))


BUILDERS = {"owlv2": _owlv2, "clip": _clip, "grounding_dino": _grounding_dino, "sam": _sam,
            "depth_anything": _depth_anything, "blip2": lambda root: _blip(root, False),
            "instructblip": lambda root: _blip(root, True)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    """Each tiny model + processor saved to its own folder: name -> folder."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("transformers_backends")
    folders = {}
    for name, build in BUILDERS.items():
        model, processor = build(root / "parts")
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        folders[name] = str(root / name)
    return folders


def _count_runs(module) -> list[int]:
    """A forward hook counting how often ``module`` runs."""
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _assert_detections(found, pictures, phrases):
    assert len(found) == len(pictures)
    for detections, pixels, queries in zip(found, pictures, phrases):
        h, w = pixels.shape[:2]
        assert detections, "threshold 0 must keep at least one box per picture"
        for d in detections:
            assert isinstance(d, stages.Detection) and d.phrase in queries
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (d.box, (h, w))
            assert 0.0 <= d.score <= 1.0


# ---------------------------------------------------------------- detection


def test_owlv2_box_conversion_known_case():
    """A 100 x 200 picture is padded to a 200-pixel square: fractions scale by 200 on both axes, then clip."""
    boxes = np.array([[0.25, 0.25, 0.75, 0.75], [0.1, 0.6, 0.2, 0.9]])
    out = backends.owlv2_boxes_to_pixels(boxes, height=100, width=200)
    np.testing.assert_allclose(out, [[50, 50, 150, 100], [20, 100, 40, 100]])
    stretched = backends.owlv2_boxes_to_pixels(boxes[:1], height=100, width=200, padded=False)
    np.testing.assert_allclose(stretched, [[50, 25, 150, 75]])


def test_owlv2_detects_given_phrases_in_picture_pixels(saved, pictures):
    detector = backends.load_detector(saved["owlv2"], score_threshold=0.0, nms_iou=None)
    assert isinstance(detector, stages.Detector)
    phrases = [["a cat", "A Dog"], ["tree"]]
    found = detector.detect(pictures, phrases)
    _assert_detections(found, pictures, phrases)
    # the tiny model's boxes are square patch cells of the padded square: they stay square in picture pixels
    # (a conversion scaling y by H instead of max(H, W) would make them 24/40 as tall as wide)
    for detections, (h, w) in zip(found, (WIDE, SQUARE)):
        inner = [d.box for d in detections if d.box[2] < w and d.box[3] < h and min(d.box[:2]) > 0]
        assert inner
        for x0, y0, x1, y1 in inner:
            assert x1 - x0 == pytest.approx(y1 - y0, rel=1e-3)
    # one picture at a time gives the same as both in one batch (the second's query list is padded in a batch)
    one_by_one = backends.load_detector(saved["owlv2"], score_threshold=0.0, nms_iou=None, batch_size=1)
    alone = one_by_one.detect(pictures, phrases)
    assert [[d.phrase for d in ds] for ds in alone] == [[d.phrase for d in ds] for ds in found]
    np.testing.assert_allclose([d.box for d in alone[1]], [d.box for d in found[1]], atol=1e-4)


def test_detector_skips_pictures_without_phrases_and_threshold_one_keeps_nothing(saved, pictures):
    detector = backends.load_detector(saved["owlv2"], score_threshold=0.0)
    runs = _count_runs(detector.model)
    assert detector.detect(pictures, [[], []]) == [[], []]
    assert runs[0] == 0
    found = detector.detect(pictures, [[], ["tree"]])
    assert found[0] == [] and found[1] and runs[0] == 1
    for name in ("owlv2", "grounding_dino"):
        strict = backends.load_detector(saved[name], score_threshold=1.0)
        assert strict.detect(pictures, [["a cat"], ["tree", "a dog"]]) == [[], []]


def test_grounding_dino_detects_given_phrases_in_picture_pixels(saved, pictures):
    detector = backends.load_detector(saved["grounding_dino"], score_threshold=0.0)
    phrases = [["a cat", "A Dog."], ["tree"]]
    _assert_detections(detector.detect(pictures, phrases), pictures, phrases)


def test_grounding_dino_runs_in_bfloat16(saved, pictures):
    """transformers builds part of Grounding DINO in float32 whatever the model dtype; the detector still runs."""
    detector = backends.load_detector(saved["grounding_dino"], score_threshold=0.0, dtype="bfloat16")
    assert next(detector.model.parameters()).dtype == torch.bfloat16
    phrases = [["a cat"], ["tree", "a dog"]]
    _assert_detections(detector.detect(pictures, phrases), pictures, phrases)
    with pytest.raises(DatasetError, match="'float17' is not a torch dtype"):
        backends.load_detector(saved["grounding_dino"], dtype="float17")


def test_grounding_dino_phrase_token_spans(saved):
    """Each phrase's tokens in "a cat. a big dog." are found, with the fast and the slow tokenizer."""
    fast = transformers.AutoTokenizer.from_pretrained(saved["grounding_dino"])
    slow = transformers.BertTokenizer.from_pretrained(saved["grounding_dino"])
    phrases = ["a cat", "A big Dog."]
    assert backends.grounding_text(phrases) == "a cat. a big dog."
    for tokenizer in (fast, slow):
        ids = tokenizer(backends.grounding_text(phrases))["input_ids"]
        spans = backends.phrase_token_spans(tokenizer, phrases)
        assert [tokenizer.decode([ids[t] for t in span]) for span in spans] == ["a cat", "a big dog"]


# ---------------------------------------------------------------- segmentation, depth, scoring, captions


def test_sam_gives_one_picture_sized_bool_mask_per_box(saved, pictures):
    segmenter = backends.load_segmenter(saved["sam"])
    assert isinstance(segmenter, stages.Segmenter)
    boxes = [[(0, 0, 10, 10), (5, 5, 38, 20)], [(1, 2, 30, 30)]]
    masks = segmenter.segment(pictures, boxes)
    assert [len(m) for m in masks] == [2, 1]
    for picture_masks, pixels in zip(masks, pictures):
        for mask in picture_masks:
            assert mask.dtype == bool and mask.shape == pixels.shape[:2]
    runs = _count_runs(segmenter.model)
    assert segmenter.segment(pictures, [[], []]) == [[], []] and runs[0] == 0


def test_depth_anything_nearness_is_finite_picture_sized_and_metric_is_negated(saved, pictures):
    estimator = backends.load_depth_estimator(saved["depth_anything"], batch_size=1)
    assert isinstance(estimator, stages.DepthEstimator)
    maps = estimator.nearness(pictures)
    for nearness, pixels in zip(maps, pictures):
        assert nearness.dtype == np.float32 and nearness.shape == pixels.shape[:2]
        assert np.isfinite(nearness).all() and np.ptp(nearness) > 0
    estimator.model.config.depth_estimation_type = "metric"  # metric depth: larger = farther, so negated
    metric = backends.DepthNearness(estimator.model, estimator.processor)
    np.testing.assert_allclose(metric.nearness(pictures[:1])[0], -maps[0], rtol=1e-5, atol=1e-6)


def test_clip_similarity_per_pair_in_a_batch_matches_alone(saved, pictures):
    scorer = backends.load_image_text_scorer(saved["clip"])
    assert isinstance(scorer, stages.ImageTextScorer)
    texts = ["a cat", "a long caption of a tree " * 10]  # different lengths (padded), the second truncated
    scores = scorer.similarity(pictures, texts)
    assert len(scores) == 2 and all(-1.0 <= s <= 1.0 for s in scores)
    alone = [scorer.similarity([p], [t])[0] for p, t in zip(pictures, texts)]
    np.testing.assert_allclose(scores, alone, atol=1e-5)


@pytest.mark.parametrize("name", ["blip2", "instructblip"])
def test_captioner_gives_one_caption_per_picture_without_prompt_echo(saved, pictures, name):
    captioner = backends.load_captioner(saved[name], prompt="a photo of", max_new_tokens=4)
    assert isinstance(captioner, stages.Captioner)
    captions = captioner.caption(pictures)
    assert len(captions) == 2
    for caption in captions:
        assert isinstance(caption, str) and caption == caption.strip()
        assert not caption.startswith("a photo of")
    default = backends.load_captioner(saved[name], max_new_tokens=2)
    assert default.prompt == ("" if name == "blip2" else backends.DEFAULT_INSTRUCTION)
    assert len(default.caption(pictures[:1])) == 1


# ---------------------------------------------------------------- loading errors


def test_unsupported_model_type_names_it_and_the_supported_ones(saved, tmp_path):
    transformers.BertConfig(hidden_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(DatasetError, match=r"'bert'.*'owlv2', 'grounding-dino'"):
        backends.load_detector(tmp_path / "bert")
    with pytest.raises(DatasetError, match=r"'owlv2'.*'blip-2', 'instructblip'"):
        backends.load_captioner(saved["owlv2"])
    with pytest.raises(DatasetError, match="no config.json"):
        backends.load_segmenter(tmp_path)


def test_missing_model_says_to_give_a_local_folder_or_a_downloadable_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for missing in (str(tmp_path / "no_such_folder"), "no-such-user/no-such-model"):
        with pytest.raises(DatasetError, match="local folder.*hub name this machine can download") as info:
            backends.load_segmenter(missing, local_files_only=True)
        assert missing in str(info.value) and isinstance(info.value.__cause__, OSError)


def test_build_dataset_runs_every_model_stage_through_the_command_line(saved, tmp_path):
    """scripts/build_dataset.py with the tiny models for every stage: OWLv2 + SAM + Depth Anything + CLIP
    filter + BLIP-2 layer captions (filters opened wide: random weights find random objects)."""
    from PIL import Image

    from scripts import build_dataset

    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text("a red circle and a blue square on a plain green background")
    out = tmp_path / "out"
    assert build_dataset.main([
        "pictures", str(folder), "--out", str(out), "--detector", saved["owlv2"], "--segmenter", saved["sam"],
        "--depth", saved["depth_anything"], "--clip", saved["clip"], "--captioner", saved["blip2"],
        "--layer-prompts", "caption", "--local-files-only", "--device", "cpu", "--no-progress", "--batch-size", "2",
        "--min-detection-score", "0", "--min-mask-fraction", "0", "--max-mask-fraction", "1", "--max-overlap",
        "1", "--min-clip-similarity", "-1", "--max-residue-score", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pictures"] == 3 and report["samples"] == 3, report
    assert set(report["stage_items"]) == {"detect", "segment", "depth order", "layer prompts", "clip agreement",
                                          "inpaint", "residue check"}, report
    samples = list(product_module("layerdiff_model.data.shards").iter_shard_samples(sorted(out.glob("*.tar"))))
    assert sorted(s.key for s in samples) == ["p0", "p1", "p2"]
    for s in samples:
        assert 1 <= s.num_foregrounds <= 2 and all(p.strip() for p in s.foreground_prompts)
        objects = s.meta["construction"]["objects"]
        assert [o["phrase"] for o in objects] != [] and all(-1 <= o["clip_similarity"] <= 1 for o in objects)
        assert all(o["phrase"] in ("a red circle", "a blue square") for o in objects)
