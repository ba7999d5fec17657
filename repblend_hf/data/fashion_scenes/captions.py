"""Five different captions per scene from a small grammar of sentence templates (:func:`describe_scene`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._writer import _cap, _Writer
from .scenes import Scene, SceneObject
from .vocabulary import (
    _COL_IN_ROW,
    _COL_NAMES,
    _KIND,
    _KIND_WORDS,
    _NUMBER,
    _ROW_IN_COL,
    _ROW_NAMES,
    _ROW_PHRASES,
    CAPTIONS_PER_SCENE,
    GRID,
)

# Each template: (name, mentions every object with colour and position?, function).
# A function returns None when the scene does not fit it (e.g. no two objects share a row).
_Template = Callable[[_Writer], "str | None"]


def _t_list(w: _Writer) -> str:
    return w.join([f"{w.np_any(o)} {w.pos(o)}" for o in w.shuffled()])


def _t_there_are(w: _Writer) -> str:
    k = len(w.objects)
    lead = w.pick(
        (
            f"there are {_NUMBER[k]} {w.items(k)}",
            f"{_NUMBER[k]} {w.items(k)} are shown",
            f"the image holds {_NUMBER[k]} {w.items(k)}",
        )
    )
    return f"{lead}: " + w.join([f"{w.np_any(o)} {w.pos(o)}" for o in w.reading_order()])


def _t_intro(w: _Writer) -> str:
    intro = w.pick(
        (
            "the picture shows",
            "this image shows",
            "we can see",
            "shown here are",
            "the scene contains",
            "here we have",
            "a photo of",
        )
    )
    return f"{intro} " + w.join([f"{w.np_any(o)} {w.pos(o)}" for o in w.shuffled()])


def _t_labelled(w: _Writer) -> str:
    sep, end = w.pick(((": ", ". "), (" - ", "; "), (": ", "; ")))
    parts = [f"{_cap(w.label(o))[:-1]}{sep}{w.np(o, det=w.pick(('', 'a')))}" for o in w.reading_order()]
    return end.join(parts)


def _t_verbs(w: _Writer) -> str:
    clauses = []
    for o in w.shuffled():
        text, plural = w.noun(o, colour=w.pick(("pre", "pre", "post")))
        verb = w.pick(
            (
                ("sits", "sit"),
                ("lies", "lie"),
                ("rests", "rest"),
                ("is placed", "are placed"),
                ("can be seen", "can be seen"),
                ("appears", "appear"),
            )
        )[plural]
        clauses.append(f"{text} {verb} {w.pos(o)}")
    return w.join(clauses)


def _t_position_first(w: _Writer) -> str:
    order = w.shuffled()
    first_text, first_plural = w.noun(order[0])
    parts = [f"{w.pos(order[0])} there {w.be(first_plural)} {first_text}"]
    parts += [f"{w.pos(o)} {w.np_any(o)}" for o in order[1:]]
    return w.join(parts)


def _t_rows(w: _Writer) -> str:
    sentences = []
    for row in range(GRID):
        in_row = sorted((o for o in w.objects if o.row == row), key=lambda o: o.col)
        if in_row:
            items = w.join([f"{w.np(o)} {_COL_IN_ROW[o.col]}" for o in in_row])
            sentences.append(w.pick((f"{_ROW_NAMES[row]} row: {items}", f"in the {_ROW_NAMES[row]} row, {items}")))
    return ". ".join(_cap(s)[:-1] for s in sentences)


def _t_columns(w: _Writer) -> str:
    parts = []
    for col in range(GRID):
        in_col = sorted((o for o in w.objects if o.col == col), key=lambda o: o.row)
        if in_col:
            verb = w.pick(("holds", "has", "contains"))
            parts.append(
                f"the {_COL_NAMES[col]} column {verb} " + w.join([f"{w.np(o)} {_ROW_IN_COL[o.row]}" for o in in_col])
            )
    return "; ".join(parts)


def _t_count_background(w: _Writer) -> str:
    k = len(w.objects)
    return f"{_NUMBER[k]} {w.items(k)} {w.background()}: " + w.join(
        [f"{w.np_any(o)} {w.pos(o)}" for o in w.shuffled()]
    )


def _t_left_to_right(w: _Writer) -> str | None:
    if len({o.col for o in w.objects}) < len(w.objects):
        return None
    order = sorted(w.objects, key=lambda o: o.col)
    return w.pick(("from left to right: ", "left to right, there are ", "reading left to right: ")) + w.join(
        [w.np_any(o) for o in order]
    )


def _t_top_to_bottom(w: _Writer) -> str | None:
    if len({o.row for o in w.objects}) < len(w.objects):
        return None
    order = sorted(w.objects, key=lambda o: o.row)
    return w.pick(("from top to bottom: ", "top to bottom: ", "going down the image: ")) + w.join(
        [w.np_any(o) for o in order]
    )


def _t_single(w: _Writer) -> str:
    o = w.pick(w.objects)
    text, plural = w.noun(o, colour=w.pick(("pre", "post")))
    return w.pick(
        (
            f"{text} {w.pos(o)}",
            f"{w.pos(o)}, {text}",
            f"{text} can be seen {w.pos(o)}",
            f"there {w.be(plural)} {text} {w.pos(o)}",
        )
    )


def _t_item_at(w: _Writer) -> str:
    o = w.pick(w.objects)
    return w.pick(
        (f"the item {w.pos(o)} is {w.np(o)}", f"what sits {w.pos(o)} is {w.np(o)}", f"look {w.pos(o)}: {w.np(o)}")
    )


def _t_colour_lookup(w: _Writer) -> str:
    o = w.pick(w.objects)
    thing = w.pick(("item", "thing", "object", "piece"))
    return f"the {w.colour(o)} {thing} {w.pos(o)} is {w.np(o, colour=None)}"


def _pair(w: _Writer) -> tuple[SceneObject, SceneObject, str] | None:
    a, b = w.shuffled()[:2]
    relation = w.relation(a, b)
    return None if relation is None else (a, b, relation)


def _t_relation(w: _Writer) -> str | None:
    pair = _pair(w)
    if pair is None:
        return None
    a, b, relation = pair
    if w.rng.random() < 0.5:
        return f"{w.np_any(a)} {relation} {w.np_any(b)}"
    text, plural = w.noun(a, det="the")
    return f"{text} {w.be(plural)} {relation} {w.np(b, det='the')}"


def _t_relation_position(w: _Writer) -> str | None:
    pair = _pair(w)
    if pair is None:
        return None
    a, b, relation = pair
    return f"{w.np_any(a)} {w.pos(a)}, {relation} {w.np_any(b)}"


def _t_with(w: _Writer) -> str | None:
    pair = _pair(w)
    if pair is None:
        return None
    b, a, relation = pair  # b relative to a
    text, plural = w.noun(a)
    return f"{text} {w.pos(a)} with {w.np_any(b)} {relation} {'them' if plural else 'it'}"


def _t_relation_and_third(w: _Writer) -> str | None:
    if len(w.objects) < 3:
        return None
    pair = _pair(w)
    if pair is None:
        return None
    a, b, relation = pair
    c = next(o for o in w.shuffled() if o not in (a, b))
    text, plural = w.noun(a, det="the")
    c_text, c_plural = w.noun(c)
    return f"{text} {w.be(plural)} {relation} {w.np(b, det='the')}, and {c_text} {w.be(c_plural)} {w.pos(c)}"


def _t_contrast(w: _Writer) -> str:
    a, b = w.shuffled()[:2]
    a_text, a_plural = w.noun(a, det="the")
    b_text, b_plural = w.noun(b, det="the")
    link = w.pick((", while", ", whereas", "; meanwhile"))
    return f"{a_text} {w.be(a_plural)} {w.pos(a)}{link} {b_text} {w.be(b_plural)} {w.pos(b)}"


def _t_colour_positions(w: _Writer) -> str:
    some = w.pick(("something", "an item", "a piece"))
    return w.join(
        [
            f"{some} {w.colour(o)} {w.pos(o)}" if some == "something" else f"{some} in {w.colour(o)} {w.pos(o)}"
            for o in w.shuffled()
        ]
    )


def _t_items_positions(w: _Writer) -> str:
    return w.join([f"{w.np(o, colour=None)} {w.pos(o)}" for o in w.shuffled()])


def _t_colour_list(w: _Writer) -> str:
    return w.join([w.np_any(o) for o in w.shuffled()]) + " " + w.background()


def _t_flat_lay(w: _Writer) -> str:
    lead = w.pick(("a flat lay of", "a collection of", "an arrangement of", "a neat layout with"))
    return f"{lead} " + w.join([w.np_any(o) for o in w.shuffled()])


def _t_kind_count(w: _Writer) -> str:
    o = w.pick(w.objects)
    return f"{w.kind_counts()}, with {w.np(o, det='the')} {w.pos(o)}"


def _t_only_kind(w: _Writer) -> str | None:
    kinds = [_KIND[o.category] for o in w.objects]
    unique = [o for o in w.objects if kinds.count(_KIND[o.category]) == 1]
    if not unique:
        return None
    o = w.pick(unique)
    singular = w.pick(_KIND_WORDS[_KIND[o.category]])[0]
    return w.pick(
        (
            f"the only {singular} is {w.np_any(o)} {w.pos(o)}",
            f"{w.np_any(o)} {w.pos(o)} is the only {singular} in the picture",
        )
    )


def _t_empty_centre(w: _Writer) -> str | None:
    if any(o.cell == 4 for o in w.objects):
        return None
    lead = w.pick(("the centre is empty; there is", "nothing in the middle, just", "an empty middle surrounded by"))
    return f"{lead} " + w.join([f"{w.np_any(o)} {w.pos(o)}" for o in w.shuffled()])


def _t_side_by_side(w: _Writer) -> str | None:
    rows = [r for r in range(GRID) if sum(o.row == r for o in w.objects) >= 2]
    if not rows:
        return None
    row = w.pick(rows)
    a, b = sorted((o for o in w.objects if o.row == row), key=lambda o: o.col)[:2]
    # Name the left one by what tells it apart: its colour, or its noun when both share a colour.
    left = w.np(a, det="", colour=None) if a.colour == b.colour else f"{w.colour(a)} one"
    return f"{w.np_any(a)} and {w.np_any(b)} side by side {w.pick(_ROW_PHRASES[row])}, the {left} on the left"


def _t_stacked(w: _Writer) -> str | None:
    cols = [c for c in range(GRID) if sum(o.col == c for o in w.objects) >= 2]
    if not cols:
        return None
    col = w.pick(cols)
    a, b = sorted((o for o in w.objects if o.col == col), key=lambda o: o.row)[:2]
    return f"{w.np_any(a)} above {w.np_any(b)} in the {_COL_NAMES[col]} column"


def _t_one_of(w: _Writer) -> str:
    k, o = len(w.objects), w.pick(w.objects)
    return w.pick(
        (
            f"{_NUMBER[k]} {w.items(k)}, one of them {w.np_any(o)} {w.pos(o)}",
            f"among the {_NUMBER[k]} {w.items(k)} is {w.np_any(o)} {w.pos(o)}",
        )
    )


def _t_includes(w: _Writer) -> str:
    chosen = w.shuffled()[:2]
    lead = w.pick(("the arrangement includes", "the set includes", "among other things there is"))
    return f"{lead} " + w.join([f"{w.np_any(o)} {w.pos(o)}" for o in chosen])


TEMPLATES: tuple[tuple[str, bool, _Template], ...] = (
    ("list", True, _t_list),
    ("there_are", True, _t_there_are),
    ("intro", True, _t_intro),
    ("labelled", True, _t_labelled),
    ("verbs", True, _t_verbs),
    ("position_first", True, _t_position_first),
    ("rows", True, _t_rows),
    ("columns", True, _t_columns),
    ("count_background", True, _t_count_background),
    ("empty_centre", True, _t_empty_centre),
    ("left_to_right", False, _t_left_to_right),
    ("top_to_bottom", False, _t_top_to_bottom),
    ("single", False, _t_single),
    ("item_at", False, _t_item_at),
    ("colour_lookup", False, _t_colour_lookup),
    ("relation", False, _t_relation),
    ("relation_position", False, _t_relation_position),
    ("with", False, _t_with),
    ("relation_and_third", False, _t_relation_and_third),
    ("contrast", False, _t_contrast),
    ("colour_positions", False, _t_colour_positions),
    ("items_positions", False, _t_items_positions),
    ("colour_list", False, _t_colour_list),
    ("flat_lay", False, _t_flat_lay),
    ("kind_count", False, _t_kind_count),
    ("only_kind", False, _t_only_kind),
    ("side_by_side", False, _t_side_by_side),
    ("stacked", False, _t_stacked),
    ("one_of", False, _t_one_of),
    ("includes", False, _t_includes),
)


def describe_scene(scene: Scene, rng: np.random.Generator, n: int = CAPTIONS_PER_SCENE) -> list[tuple[str, str]]:
    """``n`` different captions of ``scene`` as (template name, caption) pairs.

    The first caption mentions every object with its colour and position; the others come from
    distinct templates drawn at random among those that fit the scene (a template may describe a
    subset, a relation, counts, colours only, ...).
    """
    writer = _Writer(scene, rng)
    full = [t for t in TEMPLATES if t[1]]
    first = [full[i] for i in rng.permutation(len(full))]
    rest = [TEMPLATES[i] for i in rng.permutation(len(TEMPLATES))]
    captions: list[tuple[str, str]] = []

    def add(name: str, template: _Template) -> bool:
        if any(name == used for used, _ in captions):
            return False
        text = template(writer)
        if text is None or _cap(text) in (c for _, c in captions):
            return False
        captions.append((name, _cap(text)))
        return True

    next(name for name, _, template in first if add(name, template))  # "list" always fits
    for name, _, template in rest:
        if len(captions) == n:
            break
        add(name, template)
    return captions
