"""The automatic pipeline: a batch of pictures -> layered samples or reject reasons (docs/DATASET.md).

caption -> object phrases -> detection -> segmentation -> filters -> depth order -> layer prompts -> CLIP
agreement -> background completion -> residue check -> sample. Each stage is one call on the whole batch of its
backend (:mod:`.stages`), timed in the :class:`~.run_report.RunReport`.

A sample made from a flat picture: fg_k is the picture inside object k's mask (grey outside), mask_k is the
object's *visible* extent (a flat picture does not show what is hidden behind a nearer object), the background
is the picture with every kept object removed and filled in, and the global prompt is the caption. Its composite
is therefore the picture inside the masks and the completed background outside them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..layered_sample import LayeredSample, check_sample
from .depth_order import order_by_nearness, order_by_occlusion
from .light_backends import PhrasePrompter, object_crop
from .phrases import RulePhraseFinder
from .quality_filters import FilterSettings, box_iou, drop_overlapping, mask_problem
from .run_report import RunReport
from .stages import (Captioner, DepthEstimator, Detector, FoundObject, ImageTextScorer, Inpainter, LayerPrompter,
                     PhraseFinder, Picture, Segmenter)

FOREGROUND_GREY = 0.5  # pixels of a foreground layer outside its mask (ignored by training)
DEFAULT_BACKGROUND_PROMPT = "a background"


@dataclass
class Backends:
    """One backend per stage. ``captioner`` None: pictures must come with captions. ``depth`` None: the
    occlusion heuristic orders the objects. ``scorer`` None: no CLIP agreement filter."""

    detector: Detector
    segmenter: Segmenter
    inpainter: Inpainter
    captioner: Captioner | None = None
    phrases: PhraseFinder = field(default_factory=RulePhraseFinder)
    depth: DepthEstimator | None = None
    layer_prompter: LayerPrompter = field(default_factory=PhrasePrompter)
    scorer: ImageTextScorer | None = None


@dataclass
class Outcome:
    picture: Picture
    sample: LayeredSample | None
    reason: str | None = None


@dataclass
class _Work:
    picture: Picture
    caption: str = ""
    background_phrase: str | None = None
    phrases: list[str] = field(default_factory=list)
    objects: list[FoundObject] = field(default_factory=list)
    background: np.ndarray | None = None
    reason: str | None = None


class LayeringPipeline:
    """Runs :class:`Backends` over batches; ``recaption`` ignores the captions the pictures came with."""

    def __init__(self, backends: Backends, filters: FilterSettings = FilterSettings(), *, recaption: bool = False,
                 max_per_phrase: int = 1, nms_iou: float = 0.7, check_residue: bool = True):
        filters.check()
        self.backends, self.filters, self.recaption = backends, filters, recaption
        self.max_per_phrase, self.nms_iou, self.check_residue = max_per_phrase, nms_iou, check_residue

    def run(self, pictures: Sequence[Picture], report: RunReport) -> list[Outcome]:
        work = [_Work(p) for p in pictures]
        report.pictures += len(work)
        self._caption(work, report)
        self._detect(_live(work), report)
        self._segment(_live(work), report)
        self._order(_live(work), report)
        self._prompt(_live(work), report)
        self._complete_background(_live(work), report)
        outcomes = []
        for w in work:
            sample = None if w.reason else self._sample(w)
            if sample is not None:
                report.samples += 1
            else:
                report.reject(w.reason)
            outcomes.append(Outcome(w.picture, sample, w.reason))
        return outcomes

    # --------------------------------------------------------------------------------------------- stages
    def _caption(self, work: list[_Work], report: RunReport) -> None:
        need = [w for w in work if self.recaption or not (w.picture.caption or "").strip()]
        if need and self.backends.captioner is None:
            for w in need:
                w.reason = "no caption (give one, or a captioning model)"
        elif need:
            with report.stage("caption", len(need)):
                captions = self.backends.captioner.caption([w.picture.pixels for w in need])
            for w, caption in zip(need, captions):
                w.picture.caption = caption
        for w in _live(work):
            w.caption = " ".join(w.picture.caption.split())
            parts = self.backends.phrases.parts(w.caption)
            w.phrases, w.background_phrase = parts.objects, parts.background
            if not w.phrases:
                w.reason = "caption names no object"

    def _detect(self, work: list[_Work], report: RunReport) -> None:
        if not work:
            return
        with report.stage("detect", len(work)):
            found = self.backends.detector.detect([w.picture.pixels for w in work], [w.phrases for w in work])
        for w, detections in zip(work, found):
            good = [d for d in detections if d.score >= self.filters.min_detection_score]
            report.dropped_objects["detection score below min_detection_score"] += len(detections) - len(good)
            per_phrase: dict[str, int] = {}
            kept = []
            for d in sorted(good, key=lambda d: -d.score):
                if per_phrase.get(d.phrase, 0) >= self.max_per_phrase:
                    continue
                if any(box_iou(d.box, k.box) > self.nms_iou for k in kept):
                    report.dropped_objects["box overlaps a better-scoring detection"] += 1
                    continue
                per_phrase[d.phrase] = per_phrase.get(d.phrase, 0) + 1
                kept.append(d)
            w.objects = [FoundObject(d.phrase, d.box, d.score, mask=np.zeros(0, bool)) for d in kept]
            if not kept:
                w.reason = "no object found for the caption's phrases"

    def _segment(self, work: list[_Work], report: RunReport) -> None:
        if not work:
            return
        with report.stage("segment", len(work)):
            masks = self.backends.segmenter.segment([w.picture.pixels for w in work],
                                                    [[o.box for o in w.objects] for w in work])
        for w, object_masks in zip(work, masks):
            usable = []
            for obj, mask in zip(w.objects, object_masks):
                obj.mask = np.asarray(mask, bool)
                problem = mask_problem(obj, self.filters)
                if problem:
                    report.dropped_objects[problem] += 1
                else:
                    usable.append(obj)
            w.objects, dropped = drop_overlapping(usable, self.filters)
            for reason in dropped:
                report.dropped_objects[reason] += 1
            if not w.objects:
                w.reason = "no object passed the mask filters"

    def _order(self, work: list[_Work], report: RunReport) -> None:
        if not work:
            return
        with report.stage("depth order", len(work)):
            if self.backends.depth is not None:
                maps = self.backends.depth.nearness([w.picture.pixels for w in work])
                for w, nearness in zip(work, maps):
                    w.objects = order_by_nearness(w.objects, np.asarray(nearness, np.float64))
            else:
                for w in work:
                    w.objects = order_by_occlusion(w.objects)

    def _prompt(self, work: list[_Work], report: RunReport) -> None:
        if not work:
            return
        with report.stage("layer prompts", len(work)):
            prompts = self.backends.layer_prompter.prompts([w.picture.pixels for w in work],
                                                           [w.objects for w in work])
        for w, layer_prompts in zip(work, prompts):
            for obj, prompt in zip(w.objects, layer_prompts):
                obj.prompt = " ".join(str(prompt).split()) or obj.phrase
        if self.backends.scorer is None:
            return
        pairs = [(w, o) for w in work for o in w.objects]
        with report.stage("clip agreement", len(work)):
            scores = self.backends.scorer.similarity([object_crop(w.picture.pixels, o.mask) for w, o in pairs],
                                                     [o.prompt for _, o in pairs])
        low = {id(o) for (_, o), s in zip(pairs, scores) if s < self.filters.min_clip_similarity}
        for (_, o), s in zip(pairs, scores):
            o.info["clip_similarity"] = round(float(s), 4)
        for w in work:
            before = len(w.objects)
            w.objects = [o for o in w.objects if id(o) not in low]
            report.dropped_objects["CLIP similarity below min_clip_similarity"] += before - len(w.objects)
            if not w.objects:
                w.reason = "no layer agrees with its prompt (CLIP)"

    def _complete_background(self, work: list[_Work], report: RunReport) -> None:
        if not work:
            return
        holes = [np.logical_or.reduce([o.mask for o in w.objects]) for w in work]
        with report.stage("inpaint", len(work)):
            filled = self.backends.inpainter.inpaint([w.picture.pixels for w in work], holes)
        for w, background in zip(work, filled):
            w.background = np.asarray(background, np.uint8)
        if not self.check_residue:
            return
        with report.stage("residue check", len(work)):
            found = self.backends.detector.detect([w.background for w in work],
                                                  [[o.phrase for o in w.objects] for w in work])
        for w, detections in zip(work, found):
            for obj in w.objects:
                residue = max((d.score for d in detections if d.phrase == obj.phrase and
                               box_iou(d.box, obj.box) >= 0.5), default=0.0)
                obj.info["residue_score"] = round(float(residue), 4)
                if residue >= self.filters.max_residue_score:
                    w.reason = "inpainting residue (the object is still found in the background)"

    # ---------------------------------------------------------------------------------------------- output
    def _sample(self, w: _Work) -> LayeredSample | None:
        pixels = torch.from_numpy(np.ascontiguousarray(w.picture.pixels)).permute(2, 0, 1).float() / 255
        masks = torch.stack([torch.from_numpy(o.mask).float()[None] for o in w.objects])  # [N, 1, H, W]
        foregrounds = torch.where(masks.bool(), pixels[None], torch.tensor(FOREGROUND_GREY))  # [N, 3, H, W]
        background = torch.from_numpy(np.ascontiguousarray(w.background)).permute(2, 0, 1).float() / 255
        meta = {"construction": {
            "source": w.picture.source, "caption": w.caption,
            "objects": [{"phrase": o.phrase, "box": [round(float(v), 1) for v in o.box],
                         "score": round(float(o.score), 4), "nearness": o.nearness, **o.info} for o in w.objects]}}
        sample = LayeredSample(global_prompt=w.caption, background_prompt=w.background_phrase or
                               DEFAULT_BACKGROUND_PROMPT, foreground_prompts=[o.prompt for o in w.objects],
                               background=background, foregrounds=foregrounds, masks=masks, meta=meta,
                               key=w.picture.key)
        problems = check_sample(sample)
        if problems:
            w.reason = "bad sample: " + "; ".join(problems)
            return None
        return sample


def _live(work: list[_Work]) -> list[_Work]:
    return [w for w in work if w.reason is None]

