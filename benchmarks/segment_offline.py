"""Time the offline segmenter on a 2048x1536 photo worked at resolution 512 (target: under 10 s on 2 cores).

    python benchmarks/segment_offline.py

The photo is scikit-image's ``chelsea`` (CC0) upscaled to 2048x1536; the time covers what a user waits for:
resizing to the working size and segmenting. The baseline in the same run is one SLIC pass alone.
"""
import time

import numpy as np
from PIL import Image
from skimage import data
from skimage.segmentation import slic

from dedit_nb.images import resize_rgb, to_rgb_array, working_size
from dedit_nb.segment import segment


def main() -> None:
    photo = np.asarray(Image.fromarray(data.chelsea()).resize((2048, 1536), Image.BICUBIC))
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        rgb = to_rgb_array(photo)
        size = working_size(rgb.shape[1], rgb.shape[0], 512, 64)
        part = segment(resize_rgb(rgb, size))
        runs.append(time.perf_counter() - t0)
    work = resize_rgb(photo, size)
    t0 = time.perf_counter()
    slic(work, n_segments=200, compactness=10.0, start_label=0)
    baseline = time.perf_counter() - t0
    print(f"2048x1536 -> {size[0]}x{size[1]}: {part.num_items} items; best of 3: {min(runs):.2f} s "
          f"(target < 10 s); one SLIC pass alone: {baseline:.2f} s; ratio {min(runs) / baseline:.1f}x")


if __name__ == "__main__":
    main()
