"""Median wall time of one ``predict`` call on the shipped synthetic models (CPU), and of a query on an
``EmbeddedImage`` where the checkout has ``embed_image``.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/predict_time.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from lens.assets import SYNTHETIC_LENS
from lens.data.synthetic import SyntheticWorld
from lens.weights import load_lens


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_lens(SYNTHETIC_LENS).eval()
    image = Image.fromarray(SyntheticWorld(seed=0).scene("test", 0).image)
    text = "What is the red ring in this image? Please respond with segmentation mask."
    print(
        f"predict(image, text): {1000 * median_seconds(lambda: model.predict(image, text), args.repeats):.1f} ms"
    )
    if hasattr(model, "embed_image"):
        embedded = model.embed_image(image)
        ms = 1000 * median_seconds(lambda: model.predict(embedded, text), args.repeats)
        print(f"predict(embedded, text): {ms:.1f} ms")


if __name__ == "__main__":
    main()
