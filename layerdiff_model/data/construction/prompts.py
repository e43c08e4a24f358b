"""Prompt text helpers shared by the dataset importers (layered files, cut-outs).

Layer prompts are short noun phrases ("red car", "a tree"); the global prompt joins them into one sentence:
``global_prompt_from_layers(["red car", "tree"], "city street")`` -> ``"a red car and a tree in front of a city
street"``. Articles are only added to phrases that look like a bare singular noun phrase (no determiner, number,
plural ending or capitalised name), so "two dogs", "the moon" and "Eiffel Tower" stay as they are.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

_SPACE = re.compile(r"\s+")
_DETERMINERS = {
    "a", "an", "the", "some", "this", "that", "these", "those", "my", "your", "his", "her", "its", "our", "their",
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "many", "several", "few", "no",
    "each", "every", "any", "all", "both", "lots", "plenty", "much", "more", "most",
}
_AN_EXCEPTIONS = ("uni", "use", "usu", "uti", "ute", "eu", "one", "once")  # vowel letter, consonant sound
_AN_SILENT_H = ("hour", "honest", "honour", "honor", "heir")
_TRAILING_NUMBER = re.compile(r"(?:[\s_-]*\(?\d+\)?)+$")


def clean_prompt(text) -> str:
    """Whitespace (tabs, newlines, runs of spaces) collapsed to single spaces, stripped; trailing '.' dropped."""
    return _SPACE.sub(" ", str(text)).strip().rstrip(".").strip()


def prompt_from_file_name(path) -> str:
    """A prompt from a file name: ``red_sports-car_03.png`` -> ``"red sports car"`` (underscores and dashes ->
    spaces, a trailing number dropped)."""
    stem = Path(path).stem
    stem = _TRAILING_NUMBER.sub("", stem) or stem
    return clean_prompt(stem.replace("_", " ").replace("-", " "))


def _needs_article(phrase: str) -> bool:
    first = phrase.split(" ", 1)[0]
    if first.lower() in _DETERMINERS or first[:1].isdigit() or first[:1].isupper():
        return False
    last = phrase.rsplit(" ", 1)[-1].lower()
    plural = last.endswith("s") and not last.endswith(("ss", "us", "is", "ous"))
    return not plural


def with_article(phrase: str) -> str:
    """``"red car"`` -> ``"a red car"``, ``"apple"`` -> ``"an apple"``; phrases that already start with a
    determiner or number, plurals and names are returned unchanged (cleaned)."""
    phrase = clean_prompt(phrase)
    if not phrase or not _needs_article(phrase):
        return phrase
    low = phrase.lower()
    vowel = low[0] in "aeiou" and not low.startswith(_AN_EXCEPTIONS)
    return ("an " if vowel or low.startswith(_AN_SILENT_H) else "a ") + phrase


def join_phrases(phrases: Sequence[str]) -> str:
    """``[x]`` -> ``"x"``, ``[x, y]`` -> ``"x and y"``, ``[x, y, z]`` -> ``"x, y and z"``."""
    phrases = [p for p in phrases if p]
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def global_prompt_from_layers(foreground_prompts: Sequence[str], background_prompt: str) -> str:
    """One sentence for the whole picture: the foregrounds (top first) in front of the background.

    ``(["red car", "tree"], "city street")`` -> ``"a red car and a tree in front of a city street"``;
    ``([], "beach")`` -> ``"a beach"``; ``(["cat"], "")`` -> ``"a cat"``.
    """
    things = join_phrases([with_article(p) for p in foreground_prompts])
    background = with_article(background_prompt or "")
    if things and background:
        return f"{things} in front of {background}"
    return things or background
