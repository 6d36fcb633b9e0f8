"""Seconds per step of the real training loop (``lens.training.train``) from a feature cache against on the fly.

Unlike ``train_step.py`` (one step, split into phases), this runs the whole loop as ``lens train`` does, data-loader
workers included, over the first ``(warmup + steps) x batch_size`` training scenes of the shipped world: on the fly
(MLLM and SAM's encoder run every step) and from a cache of those same scenes (built first, untimed), each with
0 and with 1 worker. A step's time is the gap between two consecutive log records; the first ``warmup`` steps
(worker start-up, allocator warm-up) are not counted.

    OMP_NUM_THREADS=2 python benchmarks/train_loop.py --steps 30 --warmup 5
    python benchmarks/train_loop.py --steps 0 --warmup 12 --modes cached   # what a worker pickles per row
    python benchmarks/train_loop.py --workers 0 --modes cached
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lens.training
from lens.cache import CachedDataset, CacheKey, build_cache
from lens.config import LensConfig
from lens.data.loader import ItemSource, Row
from lens.training import TrainData, build_train_data, train
from lens.weights import build_lens

logger = logging.getLogger("train_loop")
MODES = ("on_the_fly", "cached")


class _FirstItems:
    """The first ``n`` items of a dataset (an ``ItemSource``): what the timed run draws from."""

    def __init__(self, source: ItemSource, n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def rows(self, index: int, epoch: int = 0) -> list[Row]:
        return self.source.rows(index, epoch)


def _timed_train(config: LensConfig, data: TrainData, out_dir: Path, cache_root: Path | None) -> list[float]:
    """Run ``train`` and return the wall-clock time at each optimizer step (when its log record is written)."""
    stamps: list[float] = []
    write_log = lens.training._write_log

    def stamped(path, records, mode="a"):
        stamps.extend(time.perf_counter() for _ in records)
        write_log(path, records, mode)

    lens.training._write_log = stamped
    try:
        train(config, out_dir, data=data, cache_root=cache_root)
    finally:
        lens.training._write_log = write_log
    return stamps


def _report_pickling(cached: CachedDataset, items: int) -> None:
    """What a data-loader worker sends the main process for one step: the pickled rows of ``items`` items."""
    rows = [row for i in range(items) for row in cached.rows(i)]
    start = time.perf_counter()
    size = sum(len(pickle.dumps(row)) for row in rows)
    logger.info(
        "a cached row pickles to %.2f MiB; one step's %d rows take %.3f s to pickle",
        size / len(rows) / 2**20, len(rows), time.perf_counter() - start,
    )  # fmt: skip


def seconds_per_step(config: LensConfig, steps: int, warmup: int, workers: list[int], modes: list[str]):
    """Median seconds a step for each (mode, workers)."""
    total = warmup + steps
    config.train = dataclasses.replace(
        config.train, max_steps=total, save_every=total, eval_every=0, warmup_steps=0, lr_schedule="linear"
    )
    full = build_train_data(config)
    name = next(iter(full.train))
    source = _FirstItems(full.train[name], total * config.train.batch_size)
    results: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "cached" in modes:
            key = CacheKey.from_config(config, name, "train", train=True, seed=config.train.seed)
            model = build_lens(config).eval()
            start = time.perf_counter()
            build_cache(model, source, root / "cache" / name / "train", key, shard_size=256, batch_size=24)
            logger.info(
                "cache of %d items built in %.0f s (untimed below)", len(source), time.perf_counter() - start
            )
            del model
            _report_pickling(CachedDataset(root / "cache" / name / "train", key), config.train.batch_size)
        for mode in modes if steps else []:
            for n in workers:
                config.data.num_workers = n
                cached = mode == "cached"
                items = CachedDataset(root / "cache" / name / "train", key) if cached else source
                data = TrainData({name: items}, full.ratios, None)
                stamps = _timed_train(
                    config, data, root / f"run-{mode}-{n}", root / "cache" if cached else None
                )
                gaps = [b - a for a, b in zip(stamps[warmup - 1 :], stamps[warmup:], strict=False)]
                results[mode, n] = statistics.median(gaps)
                logger.info(
                    "%-10s %d worker(s): %.3f s a step (median of %d steps; mean %.3f)",
                    mode, n, results[mode, n], len(gaps), statistics.mean(gaps),
                )  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/synthetic.yaml")
    parser.add_argument(
        "--steps", type=int, default=30, help="timed steps (0: only build the cache, time pickling)"
    )
    parser.add_argument("--warmup", type=int, default=5, help="uncounted steps first")
    parser.add_argument("--workers", default="0,1", help="comma-separated data-loader worker counts")
    parser.add_argument("--modes", default=",".join(MODES), help="on_the_fly, cached or both")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step's gap has no start)")
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = [int(n) for n in args.workers.split(",")]
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    config = LensConfig.from_yaml(args.config)
    logger.info(
        "%d threads, %d scenes a step, %d timed steps after %d",
        torch.get_num_threads(), config.train.batch_size, args.steps, args.warmup,
    )  # fmt: skip
    seconds_per_step(config, args.steps, args.warmup, workers, modes)


if __name__ == "__main__":
    main()
