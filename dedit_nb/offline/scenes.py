"""Procedural scenes: a background with 1-3 coloured shapes, a caption, and each item's own phrase.

Every scene comes with its label map (0 = background, 1.. = objects in drawing order), so it can train
the model on captions and on grouped item prompts, and it is what the quality benchmark draws from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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

    @property
    def caption(self) -> str:
        return "".join(text for text, _ in self.caption_parts)

    @property
    def caption_parts(self) -> list[tuple[str, int | None]]:
        """The caption as pieces of text, each with the item (label) its words name, or None for the glue:
        "a " None, "red circle" 1, ", a " None, ..., "yellow background" 0."""
        parts: list[tuple[str, int | None]] = []
        for k, obj in enumerate(self.objects, start=1):
            glue = "" if k == 1 else " and " if k == len(self.objects) else ", "
            parts += [(f"{glue}{article(obj.colour)} ", None), (f"{obj.colour} {obj.shape}", k)]
        return parts + [(f" on {article(self.background)} ", None), (f"{self.background} background", 0)]

    @property
    def item_phrases(self) -> list[str]:
        """Phrase of each item in label order: the background first, then each object."""
        return [background_phrase(self.background)] + [o.phrase for o in self.objects]


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
