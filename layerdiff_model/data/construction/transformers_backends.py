"""The real dataset-construction backends (stages.py interfaces), each a Hugging Face ``transformers`` model.

| stage | class | model types |
|---|---|---|
| Captioner | :class:`VisionLanguageCaptioner` | BLIP-2 (``blip-2``), InstructBLIP (``instructblip``) |
| Detector | :class:`OpenVocabularyDetector` | OWLv2 (``owlv2``), Grounding DINO (``grounding-dino``) |
| Segmenter | :class:`BoxPromptedSegmenter` | SAM (``sam``) |
| DepthEstimator | :class:`DepthNearness` | Depth Anything (``depth_anything``) |
| ImageTextScorer | :class:`ClipImageTextScorer` | CLIP (``clip``) |

Each class wraps an already loaded model + processor; the ``load_*`` functions read the config's ``model_type``,
pick the class and load both with ``from_pretrained``. Models run in eval mode under ``torch.inference_mode``, in
batches of ``batch_size`` pictures. ``transformers`` is imported only by the loaders, so importing this module
costs nothing when the dataset dependencies (requirements-dataset.txt) are absent.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...errors import DatasetError
from .stages import Box, Detection, check_picture

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "A short image description:"

CAPTIONER_CLASSES = {"blip-2": "Blip2ForConditionalGeneration", "instructblip": "InstructBlipForConditionalGeneration"}
DETECTOR_CLASSES = {"owlv2": "Owlv2ForObjectDetection", "grounding-dino": "GroundingDinoForObjectDetection"}
SEGMENTER_CLASSES = {"sam": "SamModel"}
DEPTH_CLASSES = {"depth_anything": "DepthAnythingForDepthEstimation"}
SCORER_CLASSES = {"clip": "CLIPModel"}


# ---------------------------------------------------------------- pure helpers


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, a torch dtype, or its name (``"float16"``, ``"torch.bfloat16"``) -> torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype):
        raise DatasetError(f"dtype {dtype!r} is not a torch dtype; give e.g. 'float32', 'float16' or 'bfloat16'")
    return found


def owlv2_boxes_to_pixels(boxes: np.ndarray, height: int, width: int, padded: bool = True) -> np.ndarray:
    """OWLv2 boxes (x0, y0, x1, y1) in [0, 1] -> pixels of a ``height`` x ``width`` picture, clipped to it.

    OWLv2's image processor pads a picture at the bottom/right to a square of side max(H, W) before resizing, so
    its boxes are fractions of that square (both axes scale by max(H, W)); with ``padded=False`` (``do_pad``
    off: the picture was stretched to the square) x scales by W and y by H. ``boxes``: [N, 4] -> [N, 4] float32.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    side = max(height, width)
    scale = np.array([side, side, side, side] if padded else [width, height, width, height], dtype=np.float32)
    return clip_boxes(boxes * scale, height, width)


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel boxes [N, 4] clipped to a ``height`` x ``width`` picture (x in [0, W], y in [0, H])."""
    limits = np.array([width, height, width, height], dtype=np.float32)
    return np.clip(np.asarray(boxes, dtype=np.float32), 0.0, limits)


def center_to_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x0, y0, x1, y1), any leading shape."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, max(1, size))]


def _pil(pixels: np.ndarray) -> Image.Image:
    """A checked uint8 [H, W, 3] picture as PIL (processors guess the channel axis of arrays; a PIL image is never
    ambiguous)."""
    check_picture(pixels)
    return Image.fromarray(pixels)


def _same_length(images: Sequence, other: Sequence, what: str) -> None:
    if len(images) != len(other):
        raise ValueError(f"{len(images)} pictures but {len(other)} {what}: give one entry per picture")


class _Backend:
    """A model + processor moved to ``device``/``dtype`` in eval mode; float inputs are cast to the model dtype."""

    def __init__(self, model, processor, device: str | torch.device = "cpu", dtype=None, batch_size: int = 8):
        dtype = resolve_dtype(dtype)
        self.model = model.eval().to(device=device, dtype=dtype)
        self.processor = processor
        self.device = torch.device(device)
        self.dtype = dtype or next(model.parameters()).dtype
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size}")

    def _inputs(self, batch) -> dict[str, Any]:
        """Processor output as model kwargs on the device; floating tensors in the model dtype."""
        moved = {}
        for key, value in dict(batch).items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, dtype=self.dtype if value.is_floating_point() else None)
            moved[key] = value
        return moved


# ---------------------------------------------------------------- captioning


class VisionLanguageCaptioner(_Backend):
    """Captioner with BLIP-2 or InstructBLIP; ``prompt`` is the text prefix (BLIP-2) or instruction (InstructBLIP,
    default :data:`DEFAULT_INSTRUCTION`). The prompt echo and surrounding whitespace are stripped."""

    def __init__(self, model, processor, *, prompt: str | None = None, max_new_tokens: int = 30,
                 device: str | torch.device = "cpu", dtype=None, batch_size: int = 8):
        super().__init__(model, processor, device, dtype, batch_size)
        kind = model.config.model_type
        if kind not in CAPTIONER_CLASSES:
            raise DatasetError(_unsupported("captioner", type(model).__name__, kind, CAPTIONER_CLASSES))
        self.prompt = prompt if prompt else (DEFAULT_INSTRUCTION if kind == "instructblip" else "")
        self.max_new_tokens = int(max_new_tokens)
        self._decoder_only = not getattr(model.config.text_config, "is_encoder_decoder", False)

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        captions: list[str] = []
        for chunk in _batches(len(images), self.batch_size):
            pictures = [_pil(images[i]) for i in chunk]
            batch = self.processor(images=pictures, text=[self.prompt] * len(pictures), return_tensors="pt",
                                   padding=True)
            inputs = self._inputs(batch)
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
            if self._decoder_only and out.shape[1] >= inputs["input_ids"].shape[1]:
                out = out[:, inputs["input_ids"].shape[1]:]  # decoder-only generate returns prompt + new tokens
            texts = self.processor.batch_decode(out, skip_special_tokens=True)
            captions.extend(self._strip(t) for t in texts)
        return captions

    def _strip(self, text: str) -> str:
        text = text.strip()
        prompt = self.prompt.strip()
        if prompt and text.lower().startswith(prompt.lower()):
            text = text[len(prompt):].strip()
        return text


# ---------------------------------------------------------------- detection


class OpenVocabularyDetector(_Backend):
    """Detector with OWLv2 or Grounding DINO: for each picture, the boxes whose best-matching query phrase scores
    above ``score_threshold`` (sigmoid score in [0, 1]). ``Detection.phrase`` is that phrase exactly as given;
    boxes are pixels of the picture, clipped to it. Overlapping boxes of one phrase are merged by non-maximum
    suppression at IoU ``nms_iou`` (OWLv2 predicts one box per image patch, so one object gives many); None
    keeps them all. Boxes wholly outside the picture (in OWLv2's padding) are dropped."""

    def __init__(self, model, processor, *, score_threshold: float = 0.1, nms_iou: float | None = 0.5,
                 device: str | torch.device = "cpu", dtype=None, batch_size: int = 8):
        super().__init__(model, processor, device, dtype, batch_size)
        self.kind = model.config.model_type
        if self.kind not in DETECTOR_CLASSES:
            raise DatasetError(_unsupported("detector", type(model).__name__, self.kind, DETECTOR_CLASSES))
        self.score_threshold = float(score_threshold)
        self.nms_iou = nms_iou

    def detect(self, images: Sequence[np.ndarray], phrases: Sequence[Sequence[str]]) -> list[list[Detection]]:
        _same_length(images, phrases, "phrase lists")
        results: list[list[Detection]] = [[] for _ in images]
        todo = [i for i, p in enumerate(phrases) if len(p) > 0]  # no phrases: nothing to look for, no model run
        run = self._owlv2 if self.kind == "owlv2" else self._grounding_dino
        for chunk in _batches(len(todo), self.batch_size):
            index = [todo[k] for k in chunk]
            found = run([images[i] for i in index], [list(phrases[i]) for i in index])
            for i, detections in zip(index, found):
                results[i] = detections
        return results

    def _owlv2(self, images, phrases) -> list[list[Detection]]:
        batch = self.processor(text=phrases, images=[_pil(p) for p in images], return_tensors="pt")
        with torch.inference_mode():
            out = self.model(**self._inputs(batch))
        padded = bool(getattr(self.processor.image_processor, "do_pad", True))
        found = []
        for b, (pixels, queries) in enumerate(zip(images, phrases)):
            # logits [patches, max queries]: queries past this picture's own are the processor's " " padding
            probs = torch.sigmoid(out.logits[b, :, : len(queries)].float())
            boxes = owlv2_boxes_to_pixels(center_to_corners(out.pred_boxes[b].float()).cpu().numpy(),
                                          *pixels.shape[:2], padded=padded)
            found.append(self._select(probs, torch.from_numpy(boxes), queries))
        return found

    def _grounding_dino(self, images, phrases) -> list[list[Detection]]:
        texts = [grounding_text(p) for p in phrases]
        batch = self.processor(images=[_pil(p) for p in images], text=texts, return_tensors="pt", padding="longest")
        # transformers 4.57 builds Grounding DINO's text position embedding in float32 whatever the model dtype,
        # so a float16/bfloat16 model fails in a Linear; autocast casts those inputs
        half = self.dtype in (torch.float16, torch.bfloat16)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=half):
            out = self.model(**self._inputs(batch))
        found = []
        for b, (pixels, queries) in enumerate(zip(images, phrases)):
            spans = phrase_token_spans(self.processor.tokenizer, queries)
            token_probs = torch.sigmoid(out.logits[b].float())  # [queries, max_text_len], -inf past the text
            # a phrase's score is its best token's score (what the grounded post-processing thresholds)
            probs = torch.stack([token_probs[:, span].max(dim=-1).values for span in spans], dim=-1)
            h, w = pixels.shape[:2]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            boxes = center_to_corners(out.pred_boxes[b].float().cpu()) * scale  # boxes are fractions of the picture
            found.append(self._select(probs, torch.from_numpy(clip_boxes(boxes.numpy(), h, w)), queries))
        return found

    def _select(self, probs: torch.Tensor, boxes: torch.Tensor, queries: list[str]) -> list[Detection]:
        """probs [N, Q] (box x phrase), boxes [N, 4] pixels -> detections above the threshold, best first."""
        scores, labels = probs.cpu().max(dim=-1)
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # clipping emptied boxes off the picture
        keep = (scores > self.score_threshold) & inside
        scores, labels, boxes = scores[keep], labels[keep], boxes[keep]
        if self.nms_iou is not None and len(scores):
            from torchvision.ops import batched_nms

            kept = batched_nms(boxes, scores, labels, float(self.nms_iou))
        else:
            kept = torch.argsort(scores, descending=True)
        return [Detection(phrase=queries[int(labels[k])], box=tuple(float(v) for v in boxes[k]),
                          score=float(scores[k])) for k in kept]


def grounding_text(phrases: Sequence[str]) -> str:
    """Grounding DINO's query text: ``["a cat", "A dog."]`` -> ``"a cat. a dog."`` (lowercase, '.'-separated)."""
    return " ".join(_grounding_phrase(p) + "." for p in phrases)


def _grounding_phrase(phrase: str) -> str:
    return phrase.strip().rstrip(".").strip().lower()


def phrase_token_spans(tokenizer, phrases: Sequence[str]) -> list[list[int]]:
    """Token positions of each phrase in the encoding of :func:`grounding_text` (``[CLS] p1 . p2 . [SEP]``)."""
    text = grounding_text(phrases)
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        spans, start = [], 0
        for phrase in phrases:
            piece = _grounding_phrase(phrase)
            end = start + len(piece)
            spans.append([t for t, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end])
            start = end + 2  # ". "
    else:  # slow tokenizer: count the tokens of each phrase and of its '.'
        spans, position = [], 1 if tokenizer.cls_token_id is not None else 0
        for phrase in phrases:
            n = len(tokenizer.tokenize(_grounding_phrase(phrase)))
            spans.append(list(range(position, position + n)))
            position += n + len(tokenizer.tokenize("."))
    empty = [p for p, s in zip(phrases, spans) if not s]
    if empty:
        raise DatasetError(f"detector phrases {empty!r} have no words (the tokenizer gives them no tokens); "
                           "give phrases with at least one word, e.g. 'a cat'")
    return spans


# ---------------------------------------------------------------- segmentation


class BoxPromptedSegmenter(_Backend):
    """Segmenter with SAM: each box prompts one mask, the best of SAM's multimask outputs by predicted IoU,
    upscaled to the picture size (bool [H, W])."""

    def __init__(self, model, processor, *, device: str | torch.device = "cpu", dtype=None, batch_size: int = 8):
        super().__init__(model, processor, device, dtype, batch_size)
        if model.config.model_type not in SEGMENTER_CLASSES:
            raise DatasetError(_unsupported("segmenter", type(model).__name__, model.config.model_type,
                                            SEGMENTER_CLASSES))

    def segment(self, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Box]]) -> list[list[np.ndarray]]:
        _same_length(images, boxes, "box lists")
        results: list[list[np.ndarray]] = [[] for _ in images]
        todo = [i for i, b in enumerate(boxes) if len(b) > 0]  # no boxes: no masks, no model run
        for chunk in _batches(len(todo), self.batch_size):
            index = [todo[k] for k in chunk]
            for i, masks in zip(index, self._run([images[i] for i in index], [list(boxes[i]) for i in index])):
                results[i] = masks
        return results

    def _run(self, images, boxes) -> list[list[np.ndarray]]:
        # SamProcessor needs as many boxes per picture: pad with copies of the last box, drop their masks after
        most = max(len(b) for b in boxes)
        prompts = [[[float(v) for v in box] for box in b + [b[-1]] * (most - len(b))] for b in boxes]
        batch = self.processor(images=[_pil(p) for p in images], input_boxes=prompts, return_tensors="pt")
        inputs = self._inputs(batch)
        original, reshaped = inputs.pop("original_sizes"), inputs.pop("reshaped_input_sizes")
        with torch.inference_mode():
            out = self.model(**inputs, multimask_output=True)
        masks = self.processor.image_processor.post_process_masks(out.pred_masks.float().cpu(), original.cpu(),
                                                                  reshaped.cpu())  # each [boxes, 3, H, W] bool
        found = []
        for b, own in enumerate(boxes):
            best = out.iou_scores[b].float().argmax(dim=-1).cpu()  # [boxes]
            found.append([masks[b][k, int(best[k])].numpy().astype(bool) for k in range(len(own))])
        return found


# ---------------------------------------------------------------- depth


class DepthNearness(_Backend):
    """DepthEstimator with Depth Anything: the predicted map resized (bicubic) to the picture, as nearness.

    Depth Anything's relative models predict relative inverse depth (disparity), which already is nearness
    (larger = nearer) and is returned as is; a metric model (``config.depth_estimation_type == "metric"``)
    predicts distance in metres (larger = farther), so it is negated. Only the order matters downstream.
    Pictures whose processed sizes agree (same aspect ratio) share one model run.
    """

    def __init__(self, model, processor, *, device: str | torch.device = "cpu", dtype=None, batch_size: int = 8):
        super().__init__(model, processor, device, dtype, batch_size)
        if model.config.model_type not in DEPTH_CLASSES:
            raise DatasetError(_unsupported("depth estimator", type(model).__name__, model.config.model_type,
                                            DEPTH_CLASSES))
        self.metric = getattr(model.config, "depth_estimation_type", "relative") == "metric"

    def nearness(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(images)
        for chunk in _batches(len(images), self.batch_size):
            # keep_aspect_ratio gives each aspect ratio its own tensor size: one model run per size
            groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
            for i in chunk:
                pixel_values = self.processor(images=_pil(images[i]), return_tensors="pt")["pixel_values"]
                groups.setdefault(tuple(pixel_values.shape), []).append((i, pixel_values))
            for members in groups.values():
                pixel_values = torch.cat([pv for _, pv in members]).to(self.device, self.dtype)
                with torch.inference_mode():
                    depth = self.model(pixel_values=pixel_values).predicted_depth.float()  # [B, h, w]
                for (i, _), d in zip(members, depth):
                    size = images[i].shape[:2]
                    d = F.interpolate(d[None, None], size=size, mode="bicubic", align_corners=False)[0, 0]
                    results[i] = (-d if self.metric else d).cpu().numpy().astype(np.float32)
        return results  # type: ignore[return-value]


# ---------------------------------------------------------------- image-text agreement


class ClipImageTextScorer(_Backend):
    """ImageTextScorer with CLIP: cosine similarity of the image and text embeddings of each pair, in [-1, 1].
    Texts longer than the tokenizer's limit (77 tokens for CLIP) are truncated."""

    def __init__(self, model, processor, *, device: str | torch.device = "cpu", dtype=None, batch_size: int = 8):
        super().__init__(model, processor, device, dtype, batch_size)
        if model.config.model_type not in SCORER_CLASSES:
            raise DatasetError(_unsupported("image-text scorer", type(model).__name__, model.config.model_type,
                                            SCORER_CLASSES))

    def similarity(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> list[float]:
        _same_length(images, texts, "texts")
        scores: list[float] = []
        for chunk in _batches(len(images), self.batch_size):
            batch = self.processor(text=[texts[i] for i in chunk], images=[_pil(images[i]) for i in chunk],
                                   return_tensors="pt", padding=True, truncation=True)
            inputs = self._inputs(batch)
            with torch.inference_mode():
                image = self.model.get_image_features(pixel_values=inputs["pixel_values"])
                text = self.model.get_text_features(input_ids=inputs["input_ids"],
                                                    attention_mask=inputs.get("attention_mask"))
            scores.extend(F.cosine_similarity(image.float(), text.float(), dim=-1).cpu().tolist())
        return scores


# ---------------------------------------------------------------- loading


def load_captioner(name_or_path: str | Path, *, device: str | torch.device = "cpu", dtype=None,
                   prompt: str | None = None, max_new_tokens: int = 30, batch_size: int = 8,
                   local_files_only: bool = False) -> VisionLanguageCaptioner:
    """A BLIP-2 / InstructBLIP captioner from a local folder or hub name."""
    model, processor = _load("captioner", name_or_path, CAPTIONER_CLASSES, local_files_only)
    return VisionLanguageCaptioner(model, processor, prompt=prompt, max_new_tokens=max_new_tokens, device=device,
                                   dtype=dtype, batch_size=batch_size)


def load_detector(name_or_path: str | Path, *, device: str | torch.device = "cpu", dtype=None,
                  score_threshold: float = 0.1, nms_iou: float | None = 0.5, batch_size: int = 8,
                  local_files_only: bool = False) -> OpenVocabularyDetector:
    """An OWLv2 / Grounding DINO detector from a local folder or hub name."""
    model, processor = _load("detector", name_or_path, DETECTOR_CLASSES, local_files_only)
    return OpenVocabularyDetector(model, processor, score_threshold=score_threshold, nms_iou=nms_iou,
                                  device=device, dtype=dtype, batch_size=batch_size)


def load_segmenter(name_or_path: str | Path, *, device: str | torch.device = "cpu", dtype=None,
                   batch_size: int = 8, local_files_only: bool = False) -> BoxPromptedSegmenter:
    """A SAM box-prompted segmenter from a local folder or hub name."""
    model, processor = _load("segmenter", name_or_path, SEGMENTER_CLASSES, local_files_only)
    return BoxPromptedSegmenter(model, processor, device=device, dtype=dtype, batch_size=batch_size)


def load_depth_estimator(name_or_path: str | Path, *, device: str | torch.device = "cpu", dtype=None,
                         batch_size: int = 8, local_files_only: bool = False) -> DepthNearness:
    """A Depth Anything nearness estimator from a local folder or hub name."""
    model, processor = _load("depth estimator", name_or_path, DEPTH_CLASSES, local_files_only)
    return DepthNearness(model, processor, device=device, dtype=dtype, batch_size=batch_size)


def load_image_text_scorer(name_or_path: str | Path, *, device: str | torch.device = "cpu", dtype=None,
                           batch_size: int = 8, local_files_only: bool = False) -> ClipImageTextScorer:
    """A CLIP image-text scorer from a local folder or hub name."""
    model, processor = _load("image-text scorer", name_or_path, SCORER_CLASSES, local_files_only)
    return ClipImageTextScorer(model, processor, device=device, dtype=dtype, batch_size=batch_size)


def _load(role: str, name_or_path: str | Path, classes: dict[str, str], local_files_only: bool):
    """(model, processor) of a supported model type, or a DatasetError saying what to give instead."""
    try:
        import transformers
    except ImportError as e:
        raise DatasetError(f"the {role} needs the 'transformers' package, which is not installed; "
                           "install the dataset dependencies: pip install -r requirements-dataset.txt") from e
    name = str(name_or_path)
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise DatasetError(f"{role} model folder {name!r} has no config.json; give a folder a model and its "
                           "processor were saved to with save_pretrained, or a Hugging Face hub name")
    try:
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=local_files_only)
    except OSError as e:
        raise DatasetError(_missing(role, name, e)) from e
    except ValueError as e:  # a config.json whose model_type this transformers does not know
        raise DatasetError(f"{role} model {name!r}: transformers {transformers.__version__} cannot read its "
                           f"config ({e}); give a model of type {_names(classes)} or upgrade transformers") from e
    kind = config.model_type
    if kind not in classes:
        raise DatasetError(_unsupported(role, name, kind, classes))
    try:
        model = getattr(transformers, classes[kind]).from_pretrained(name, local_files_only=local_files_only)
        processor = transformers.AutoProcessor.from_pretrained(name, local_files_only=local_files_only)
    except OSError as e:
        raise DatasetError(_missing(role, name, e)) from e
    logger.info("loaded %s %s (%s)", role, name, kind)
    return model, processor


def _names(classes: dict[str, str]) -> str:
    return ", ".join(repr(k) for k in classes)


def _unsupported(role: str, name: str, kind: str, classes: dict[str, str]) -> str:
    return (f"{role} model {name!r} is of model type {kind!r}, which the {role} does not support; supported "
            f"model types: {_names(classes)}; give a model of one of those types")


def _missing(role: str, name: str, error: Exception) -> str:
    return (f"{role} model {name!r} could not be loaded: it is not a local folder holding a saved model and "
            f"processor, and it could not be downloaded ({error}); give a local folder (saved with "
            "save_pretrained) or a Hugging Face hub name this machine can download (network on, HF_HUB_OFFLINE "
            "unset)")
