"""How responsive the mask editor is on a 1024x1024 image.

    python benchmarks/editor_stroke.py

A brush stroke is a mouse-down, 40 moves and a mouse-up. While the button is down the editor only draws
client-side previews; on release it applies the whole stroke to the label map once and renders the overlay
once. The baseline, in the same run, is one render of the overlay (what any change costs at least).
"""
import time

import numpy as np
from PIL import Image
from skimage import data

from widgets import ItemState, MaskEditor


def main() -> None:
    image = np.asarray(Image.fromarray(data.astronaut()).resize((1024, 1024)))
    labels = np.zeros((1024, 1024), np.int32)
    labels[:, 512:] = 1
    labels[:300] = 2
    editor = MaskEditor(ItemState(image, labels, ["left", "right", "top"]))
    editor.size.value = 12
    t0 = time.perf_counter()
    for _ in range(5):
        editor.render()
    render = (time.perf_counter() - t0) / 5
    moves, strokes = [], []
    for k in range(5):
        editor.state.selected = k % 3
        t0 = time.perf_counter()
        editor.mouse_down(100, 400 + 20 * k)
        for x in range(120, 920, 20):
            t1 = time.perf_counter()
            editor.mouse_move(x, 400 + 20 * k + (x % 60))
            moves.append(time.perf_counter() - t1)
        editor.mouse_up(920, 400 + 20 * k)
        strokes.append(time.perf_counter() - t0)
    print(f"1024x1024: one overlay render {render * 1000:.0f} ms; a mouse move while drawing "
          f"{np.median(moves) * 1000:.2f} ms ({np.median(moves) / render:.3f}x a render); a whole 40-move stroke "
          f"{np.median(strokes) * 1000:.0f} ms ({np.median(strokes) / render:.1f}x a render)")


if __name__ == "__main__":
    main()
