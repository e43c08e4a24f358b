"""Object phrases from a caption, by rule: split at conjunctions and relations, keep the noun phrases.

"a dog sitting on a couch next to a cat" -> objects ["a dog", "a cat"], background "a couch";
"a red circle and a blue square on a plain green background" -> ["a red circle", "a blue square"],
"a plain green background". No language model: the split words and scene nouns below are the whole rule, so the
result is predictable and a detector that finds nothing for a phrase simply drops it.
"""
from __future__ import annotations

import re

from .stages import CaptionParts

# Words and word groups that separate one thing from the next in a caption.
_SEPARATORS = (
    r",", r";", r"\band\b", r"\bwith\b", r"\bnext to\b", r"\bin front of\b", r"\bbehind\b", r"\bbeside\b",
    r"\bnear\b", r"\bon top of\b", r"\bon\b", r"\bin\b", r"\bat\b", r"\bunder\b", r"\bover\b", r"\babove\b",
    r"\bbelow\b", r"\bby\b", r"\bagainst\b", r"\binside\b", r"\bof\b", r"\bthat\b", r"\bwhile\b", r"\bis\b",
    r"\bare\b", r"\bholding\b", r"\bwearing\b",
)
_SPLIT = re.compile("|".join(_SEPARATORS))
# A phrase naming one of these is the scene behind the objects, not an object.
SCENE_NOUNS = frozenset((
    "background", "backdrop", "sky", "wall", "walls", "floor", "ground", "street", "road", "field", "grass",
    "beach", "room", "water", "sea", "ocean", "lake", "forest", "woods", "city", "desert", "snow", "table",
    "couch", "sofa", "bed", "park", "mountain", "mountains", "landscape", "scene", "kitchen", "bathroom",
    "living", "stage", "sidewalk", "shore", "river", "garden", "yard",
))
_DETERMINERS = frozenset(("a", "an", "the", "some", "two", "three", "four", "several", "many", "this", "that"))
_FILLER = frozenset(("there", "it", "image", "picture", "photo", "photograph", "close", "up", "view", "shot",
                     "top", "side", "front", "middle", "left", "right", "it's", "its", "who", "which"))
# Nouns that end in -ing (every other -ing word is taken for a verb: "a dog sitting" -> "a dog").
_ING_NOUNS = frozenset(("building", "painting", "clothing", "ring", "king", "thing", "string", "wing", "ceiling",
                        "pudding", "wedding", "swing", "spring", "earring", "icing", "dumpling", "railing"))


def _is_verb(word: str) -> bool:
    return word.endswith("ing") and word not in _ING_NOUNS


def _clean(chunk: str) -> str:
    words = chunk.strip(" .!?:'\"").split()
    while words and (_is_verb(words[0]) or words[0] in _FILLER):  # "sitting", "standing", "there"
        words = words[1:]
    verb = next((i for i, w in enumerate(words) if _is_verb(w)), len(words))
    return " ".join(words[:verb])  # "a dog sitting" -> "a dog"


class RulePhraseFinder:
    """:class:`~.stages.PhraseFinder` by rule; at most ``max_objects`` object phrases, in caption order."""

    def __init__(self, max_objects: int = 4):
        self.max_objects = max_objects

    def parts(self, caption: str) -> CaptionParts:
        text = " ".join(caption.lower().split())
        objects, background = [], None
        for chunk in _SPLIT.split(text):
            phrase = _clean(chunk)
            words = phrase.split()
            content = [w for w in words if w not in _DETERMINERS and w not in _FILLER]
            if not content:
                continue
            if SCENE_NOUNS.intersection(content):
                background = background or phrase
            elif phrase not in objects:
                objects.append(phrase)
        return CaptionParts(objects=objects[: self.max_objects], background=background)
