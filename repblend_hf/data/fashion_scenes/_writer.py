"""The words of one scene's captions (noun phrases, positions, relations, counts): the grammar's plumbing."""

from __future__ import annotations

import numpy as np

from .scenes import Scene, SceneObject
from .vocabulary import (
    _ITEM_WORDS,
    _KIND,
    _KIND_WORDS,
    _NOUNS,
    _NUMBER,
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    TEXTURES,
)


class _Writer:
    """Words for one scene: noun phrases, positions, relations, drawn from one generator."""

    def __init__(self, scene: Scene, rng: np.random.Generator):
        self.scene, self.rng = scene, rng
        self.objects = list(scene.objects)

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def shuffled(self, objects=None) -> list[SceneObject]:
        objects = list(self.objects if objects is None else objects)
        return [objects[i] for i in self.rng.permutation(len(objects))]

    def reading_order(self, objects=None) -> list[SceneObject]:
        return sorted(self.objects if objects is None else objects, key=lambda o: o.cell)

    def colour(self, obj: SceneObject) -> str:
        return self.pick(COLOURS[obj.colour][1])

    def noun(self, obj: SceneObject, det: str = "a", colour: str | None = "pre") -> tuple[str, bool]:
        """A noun phrase for ``obj`` and whether it is grammatically plural.

        ``det``: "a" (a/an, nothing for plurals), "the", or "" (bare); ``colour``: "pre" ("a red
        tee"), "post" ("a tee in red") or None (no colour).
        """
        template, plural = self.pick(_NOUNS[obj.category])
        if colour == "pre":
            text = template.format(c=self.colour(obj) + " ")
        elif colour == "post":
            text = template.format(c="") + " in " + self.colour(obj)
        else:
            text = template.format(c="")
        if det == "the":
            text = "the " + text
        elif det == "a" and not plural:
            text = ("an " if text[0] in "aeiou" else "a ") + text
        return text, plural

    def np(self, obj: SceneObject, det: str = "a", colour: str | None = "pre") -> str:
        return self.noun(obj, det, colour)[0]

    def np_any(self, obj: SceneObject, det: str = "a") -> str:
        """A coloured noun phrase, the colour before the noun most of the time."""
        return self.np(obj, det, "post" if self.rng.random() < 0.2 else "pre")

    def pos(self, obj: SceneObject) -> str:
        return self.pick(POSITIONS[obj.cell][2])

    def label(self, obj: SceneObject) -> str:
        return self.pick(POSITIONS[obj.cell][1])

    def be(self, plural: bool) -> str:
        return "are" if plural else "is"

    def items(self, k: int) -> str:
        return self.pick(_ITEM_WORDS) if k > 1 else "item"

    def background(self) -> str:
        name = BACKGROUNDS[self.scene.background][0]
        texture = TEXTURES[self.scene.texture]
        article = "an" if texture[0] in "aeiou" else "a"
        return self.pick(
            (f"on a {name} background", f"against a {name} backdrop", f"on {article} {texture} {name} background")
        )

    def join(self, parts: list[str]) -> str:
        if len(parts) == 1:
            return parts[0]
        last = ", and " if len(parts) > 2 and self.rng.random() < 0.3 else " and "
        return ", ".join(parts[:-1]) + last + parts[-1]

    def relation(self, a: SceneObject, b: SceneObject) -> str | None:
        """A phrase true of ``a`` relative to ``b`` ("to the left of", "above", ...), or None."""
        options = []
        if a.col < b.col:
            options += ["to the left of", "left of"]
        if a.col > b.col:
            options += ["to the right of", "right of"]
        if a.row < b.row:
            options += ["directly above" if a.col == b.col else "above", "higher up than"]
        if a.row > b.row:
            options += ["directly below" if a.col == b.col else "below", "beneath"]
        if abs(a.row - b.row) + abs(a.col - b.col) == 1:
            options += ["next to", "beside"]
        return self.pick(options) if options else None

    def kind_counts(self) -> str:
        counts: dict[str, int] = {}
        for obj in self.objects:
            counts[_KIND[obj.category]] = counts.get(_KIND[obj.category], 0) + 1
        parts = []
        for kind, n in counts.items():
            singular, plural = self.pick(_KIND_WORDS[kind])
            parts.append(
                f"{_NUMBER[n] if n > 1 else ('an' if singular[0] in 'aeiou' else 'a')} {plural if n > 1 else singular}"
            )
        return self.join(parts)


def _cap(text: str) -> str:
    text = text.strip()
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."
