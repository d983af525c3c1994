"""Procedural scenes: a background with 1-3 coloured shapes, a caption, and each item's own phrase.

Every scene comes with its label map (0 = background, 1.. = objects in drawing order), so it can train
the model on captions and on grouped item prompts, and it is what the quality benchmark draws from.

A scene's words are plain ("a red circle and a blue square on a yellow background") until :func:`reword`
draws them from a vocabulary: synonyms of every colour and shape, sentence templates, the objects in any
order, truthful size adjectives and D-Edit's item phrasings ("a photo of a square in gold"). ``HELD_OUT_WORDS``
and ``HELD_OUT_TEMPLATE`` never appear in training; the benchmark measures them as their own column.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

OBJECT_COLOURS = {
    "red": (220, 30, 30), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "purple": (150, 50, 190), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUND_COLOURS = {
    "black": (15, 15, 15), "gray": (128, 128, 128), "white": (240, 240, 240), "yellow": (235, 215, 90),
    "blue": (60, 90, 200), "green": (60, 150, 70),
}
SHAPES = ("circle", "square", "triangle", "cross")
# colour-shape pairs never drawn in training: the benchmark asks for them
HELD_OUT = {("purple", "triangle"), ("orange", "square")}

# the words for every colour (objects' and backgrounds') and shape; the first is the plain one
COLOUR_WORDS = {
    "red": ("red", "crimson", "cherry", "ruby", "scarlet"),
    "green": ("green", "emerald", "jade", "lime", "grass green"),
    "blue": ("blue", "cobalt", "sapphire", "royal blue", "azure"),
    "yellow": ("yellow", "golden", "gold", "lemon", "canary"),
    "purple": ("purple", "plum", "amethyst", "magenta", "violet"),
    "orange": ("orange", "tangerine", "amber", "pumpkin"),
    "white": ("white", "snowy", "snow white", "chalk", "ivory"),
    "black": ("black", "jet black", "ebony", "inky"),
    "gray": ("gray", "grey", "silver", "slate"),
}
SHAPE_WORDS = {
    "circle": ("circle", "disc", "dot", "orb", "round shape", "ball"),
    "square": ("square", "box", "block", "tile", "cube"),
    "triangle": ("triangle", "pyramid", "wedge", "triangular shape"),
    "cross": ("cross", "plus sign", "plus shape", "plus"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large")}
BACKGROUND_NOUNS = ("background", "backdrop")
# sentence templates of a caption; {objects} is the list of object phrases
CAPTION_TEMPLATES = ("{objects} on {background}", "{background} with {objects}", "a photo of {objects} on {background}",
                     "{objects} in front of {background}", "an image of {objects} over {background}",
                     "{objects}, {background}")
# never in training: the benchmark's held-out-words column uses them
HELD_OUT_WORDS = frozenset({"scarlet", "azure", "violet", "ivory", "ball", "cube"})
HELD_OUT_TEMPLATE = "a picture of {objects} against {background}"
PLAIN, TRAINED, HELD_OUT_VOCABULARY = "plain", "trained", "held-out"
Parts = list[tuple[str, "int | None"]]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def background_phrase(colour: str) -> str:
    return f"{article(colour)} {colour} background"


@dataclass
class SceneObject:
    colour: str
    shape: str
    cx: float
    cy: float
    radius: float

    @property
    def phrase(self) -> str:
        return f"{article(self.colour)} {self.colour} {self.shape}"


@dataclass
class Scene:
    image: np.ndarray               # uint8 (S, S, 3)
    labels: np.ndarray              # int32 (S, S): 0 background, k = objects[k - 1]
    background: str
    objects: list[SceneObject] = field(default_factory=list)
    # the caption as pieces of text, each with the item (label) its words name, or None for the glue:
    # "a " None, "red circle" 1, ", a " None, ..., "yellow background" 0 (plain words unless reworded)
    caption_parts: Parts | None = None
    # the phrase of each item in label order: the background first, then each object
    item_phrases: list[str] | None = None

    def __post_init__(self):
        if self.caption_parts is None:
            self.caption_parts = plain_caption_parts(self.background, self.objects)
        if self.item_phrases is None:
            self.item_phrases = [background_phrase(self.background)] + [o.phrase for o in self.objects]

    @property
    def caption(self) -> str:
        return "".join(text for text, _ in self.caption_parts)


def plain_caption_parts(background: str, objects: list[SceneObject]) -> Parts:
    parts: Parts = []
    for k, obj in enumerate(objects, start=1):
        glue = "" if k == 1 else " and " if k == len(objects) else ", "
        parts += [(f"{glue}{article(obj.colour)} ", None), (f"{obj.colour} {obj.shape}", k)]
    return parts + [(f" on {article(background)} ", None), (f"{background} background", 0)]


def vocabulary_words(words: tuple[str, ...], vocabulary: str) -> tuple[str, ...]:
    """The words a vocabulary may use of ``words`` (a colour's or a shape's): plain, the trained ones, or the
    held-out ones where there are any (else the trained ones)."""
    if vocabulary == PLAIN:
        return words[:1]
    trained = tuple(w for w in words if w not in HELD_OUT_WORDS)
    if vocabulary == TRAINED:
        return trained
    if vocabulary == HELD_OUT_VOCABULARY:
        return tuple(w for w in words if w in HELD_OUT_WORDS) or trained
    raise ValueError(f"unknown vocabulary {vocabulary!r}; use {PLAIN!r}, {TRAINED!r} or {HELD_OUT_VOCABULARY!r}")


def size_class(obj: SceneObject, size: int, num_objects: int) -> str | None:
    """"small" or "big" where the object's radius is in the lower or upper fifth of random_scene's range."""
    share = obj.radius * (1 + 0.25 * (num_objects - 1)) / size       # uniform in [0.16, 0.3]
    return "small" if share < 0.188 else "big" if share > 0.272 else None


def object_parts(obj: SceneObject, item: int, rng: np.random.Generator, vocabulary: str,
                 size_word: str | None = None) -> Parts:
    """An object's words in one of three orders: "a (small) crimson disc", "a (small) disc in crimson",
    "a (small) disc that is crimson"; its own words (size, colour, shape) belong to ``item``."""
    colour = str(rng.choice(vocabulary_words(COLOUR_WORDS[obj.colour], vocabulary)))
    shape = str(rng.choice(vocabulary_words(SHAPE_WORDS[obj.shape], vocabulary)))
    size = [(size_word, item), (" ", None)] if size_word else []
    form = int(rng.integers(3)) if vocabulary != PLAIN else 0
    if form == 0:
        first = size_word or colour
        body = size + [(colour, item), (" ", None), (shape, item)]
    else:
        first = size_word or shape
        body = size + [(shape, item), (" in " if form == 1 else " that is ", None), (colour, item)]
    return [(f"{article(first)} ", None)] + body


def background_parts(colour_name: str, rng: np.random.Generator, vocabulary: str) -> Parts:
    colour = str(rng.choice(vocabulary_words(COLOUR_WORDS[colour_name], vocabulary)))
    noun = BACKGROUND_NOUNS[int(rng.integers(len(BACKGROUND_NOUNS)))] if vocabulary != PLAIN else "background"
    return [(f"{article(colour)} ", None), (colour, 0), (" ", None), (noun, 0)]


def reword(scene: Scene, rng: np.random.Generator, vocabulary: str = TRAINED,
           fits: Callable[[str], bool] | None = None, tries: int = 20, template: str | None = None) -> Scene:
    """The scene with its caption and item phrases drawn from ``vocabulary``: a template (the held-out one
    only, and always, for the held-out vocabulary), the objects in a random order, each in a random order of
    its words with a truthful size adjective a third of the time; item phrases the same way, a third of them
    as D-Edit writes them ("a photo of ..."). A draw whose caption ``fits`` rejects (too many tokens) is
    drawn again; after ``tries`` the plain words are kept. ``template`` fixes the template (for tests)."""
    n = len(scene.objects)
    sizes = [size_class(o, scene.image.shape[0], n) for o in scene.objects]

    def size_word(k: int) -> str | None:
        if vocabulary == PLAIN or sizes[k] is None or rng.random() >= 1 / 3:
            return None
        return str(rng.choice(SIZE_WORDS[sizes[k]]))

    for _ in range(tries):
        if template is not None:
            chosen = template
        elif vocabulary == HELD_OUT_VOCABULARY:
            chosen = HELD_OUT_TEMPLATE
        else:
            chosen = CAPTION_TEMPLATES[0 if vocabulary == PLAIN else int(rng.integers(len(CAPTION_TEMPLATES)))]
        order = rng.permutation(n) if vocabulary != PLAIN else np.arange(n)
        listed: Parts = []
        for position, k in enumerate(order):
            glue = "" if position == 0 else " and " if position == n - 1 else ", "
            listed += [(glue, None)] + object_parts(scene.objects[k], int(k) + 1, rng, vocabulary, size_word(k))
        slots = {"objects": listed, "background": background_parts(scene.background, rng, vocabulary), None: []}
        parts: Parts = []
        for piece, slot in zip(*_split_template(chosen)):
            parts += [(piece, None)] + slots[slot]
        parts = [(text, item) for text, item in parts if text]
        if fits is None or fits("".join(text for text, _ in parts)):
            break
    else:
        parts = plain_caption_parts(scene.background, scene.objects)
    phrases = ["".join(t for t, _ in background_parts(scene.background, rng, vocabulary))]
    phrases += ["".join(t for t, _ in object_parts(o, k + 1, rng, vocabulary, size_word(k)))
                for k, o in enumerate(scene.objects)]
    if vocabulary != PLAIN:
        phrases = [f"a photo of {p}" if rng.random() < 1 / 3 else p for p in phrases]
    return replace(scene, caption_parts=parts, item_phrases=phrases)


def _split_template(template: str) -> tuple[list[str], list[str | None]]:
    """"{objects} on {background}" -> (["", " on ", ""], ["objects", "background", None])."""
    pieces, slots, rest = [], [], template
    while "{" in rest:
        before, _, after = rest.partition("{")
        slot, _, rest = after.partition("}")
        pieces.append(before)
        slots.append(slot)
    return pieces + [rest], slots + [None]


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        s = r * 0.9
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # apex up, base at cy + r * 0.8
        h = 1.8 * r
        top = cy - r
        rel = (yy - top) / h
        return (rel >= 0) & (rel <= 1) & (np.abs(dx) <= rel * r * 1.05)
    if shape == "cross":
        arm = r * 0.38
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")


def render(background: str, objects: list[SceneObject], size: int, gradient: float = 0.0,
           gradient_angle: float = 0.0) -> Scene:
    base = np.array(BACKGROUND_COLOURS[background], dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1) - 0.5
    ramp = (np.cos(gradient_angle) * xx + np.sin(gradient_angle) * yy)[..., None]
    image = np.clip(base * (1.0 + gradient * ramp), 0, 255)
    labels = np.zeros((size, size), np.int32)
    for k, obj in enumerate(objects, start=1):
        mask = shape_mask(obj.shape, size, obj.cx, obj.cy, obj.radius)
        image[mask] = OBJECT_COLOURS[obj.colour]
        labels[mask] = k
    return Scene(image.round().astype(np.uint8), labels, background, list(objects))


def random_scene(rng: np.random.Generator, size: int = 32, max_objects: int = 3, held_out: bool = False,
                 num_objects: int | None = None) -> Scene:
    """A random scene. ``held_out=False`` never draws a HELD_OUT pair; ``True`` makes the first object one."""
    background = rng.choice(list(BACKGROUND_COLOURS))
    n = num_objects or int(rng.integers(1, max_objects + 1))
    for _ in range(100):
        objects = []
        for k in range(n):
            while True:
                colour = str(rng.choice(list(OBJECT_COLOURS)))
                shape = str(rng.choice(SHAPES))
                if held_out and k == 0:
                    colour, shape = sorted(HELD_OUT)[int(rng.integers(len(HELD_OUT)))]
                if colour == background:
                    continue
                if (colour, shape) in HELD_OUT and not (held_out and k == 0):
                    continue
                if any(o.colour == colour for o in objects):
                    continue
                break
            r = rng.uniform(0.16, 0.3) * size / (1 + 0.25 * (n - 1))
            objects.append(SceneObject(colour, shape, rng.uniform(r, size - r), rng.uniform(r, size - r), r))
        gradient = float(rng.uniform(0.0, 0.4)) if rng.random() < 0.5 else 0.0
        scene = render(background, objects, size, gradient, float(rng.uniform(0, 2 * np.pi)))
        # every object must stay mostly visible (overlaps hide at most 40%)
        visible = [(scene.labels == k).sum() / shape_mask(o.shape, size, o.cx, o.cy, o.radius).sum()
                   for k, o in enumerate(objects, start=1)]
        if min(visible) >= 0.6:
            return scene
    return scene


def demo_scenes(size: int = 32) -> dict[str, Scene]:
    """The bundled example pair: scene_a is edited; scene_b lends an item for the image edit."""
    return {
        "scene_a": render("yellow", [SceneObject("red", "circle", 0.30 * size, 0.62 * size, 0.2 * size),
                                     SceneObject("blue", "square", 0.72 * size, 0.35 * size, 0.17 * size)], size),
        "scene_b": render("white", [SceneObject("green", "triangle", 0.5 * size, 0.55 * size, 0.28 * size)], size),
    }
