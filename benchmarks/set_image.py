"""Per-query cost with and without ``set_image``, for 1, 4 and 16 queries on one image, on the shipped models.

Three ways to ask n queries about one image:

* ``separate``: n calls ``pipe(image, query)``; every call redoes the image's frozen work;
* ``one call``: ``pipe(image, [n queries])``; the image's work is shared inside the call;
* ``set_image``: ``pipe.set_image(image)`` once (its time included), then n calls ``pipe(query)``;
* ``set_image + list``: ``pipe.set_image(image)`` once, then one call ``pipe([n queries])``.

Each is timed ``--repeats`` times (median reported, after one warm-up) on synthetic test scene 0.

    python benchmarks/set_image.py --threads 1
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Annotated

import torch
import typer

from lens.data.synthetic import SyntheticWorld
from lens.pipeline import LensPipeline


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(
    counts: Annotated[str, typer.Option(help="comma-separated query counts")] = "1,4,16",
    repeats: int = 5,
    threads: int = 1,
    checkpoint: str = "lens:synthetic/lens",
) -> None:
    torch.set_num_threads(threads)
    pipe = LensPipeline.from_pretrained(checkpoint, device="cpu")
    scene = SyntheticWorld(seed=0).scene("test", 0)
    pool = [q.sample.query for q in scene.segmentation_queries()]
    rows = []
    for n in (int(c) for c in counts.split(",")):
        queries = [pool[i % len(pool)] for i in range(n)]

        def separate(queries=queries):
            for q in queries:
                pipe(scene.image, q)

        def one_call(queries=queries):
            pipe(scene.image, queries)

        def cached(queries=queries):
            pipe.set_image(scene.image)
            for q in queries:
                pipe(q)

        def cached_list(queries=queries):
            pipe.set_image(scene.image)
            pipe(queries)

        row = {"queries": n}
        modes = (
            ("separate", separate),
            ("one_call", one_call),
            ("set_image", cached),
            ("set_image_list", cached_list),
        )
        for name, fn in modes:
            row[f"{name}_ms_per_query"] = round(1000 * _time(fn, repeats) / n, 1)
        rows.append(row)
    set_image_ms = round(1000 * _time(lambda: pipe.set_image(scene.image), repeats), 1)
    report = {"threads": threads, "repeats": repeats, "set_image_ms": set_image_ms, "rows": rows}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    typer.run(main)
