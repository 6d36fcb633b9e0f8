"""Median time of one ``predict`` call on the shipped synthetic models (CPU), and of a query on an
``EmbeddedImage`` where the checkout has ``embed_image``: wall time, and this process's CPU time (steadier on a
shared machine; with ``OMP_NUM_THREADS=1`` the two agree on an idle one).

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


def median_ms(call, repeats: int) -> str:
    call()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return f"{1000 * statistics.median(wall):.1f} ms wall, {1000 * statistics.median(cpu):.1f} ms CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_lens(SYNTHETIC_LENS).eval()
    image = Image.fromarray(SyntheticWorld(seed=0).scene("test", 0).image)
    text = "What is the red ring in this image? Please respond with segmentation mask."
    print(f"predict(image, text): {median_ms(lambda: model.predict(image, text), args.repeats)}")
    if hasattr(model, "embed_image"):
        embedded = model.embed_image(image)
        print(f"predict(embedded, text): {median_ms(lambda: model.predict(embedded, text), args.repeats)}")


if __name__ == "__main__":
    main()
