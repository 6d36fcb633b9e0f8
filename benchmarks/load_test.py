"""A bounded load test of ``lens serve`` from a second process on localhost.

Starts the service in a subprocess (``python -m lens.cli serve``; or ``--url`` for one already running), then
sends ``--requests`` requests, ``--concurrency`` at a time: a mix of valid segment requests (synthetic test
scenes, one to three of their queries) and invalid ones (not base64, not an image, over the pixel limit, empty
query, no queries, unknown conversation). Checks, per response: the status is the one expected (a 503 is
allowed for any segment request while the queue is full: it is refused before its body is read), the body and
header carry the request's id, and a valid answer's masks match the reference masks computed beforehand in
this process for that image and query (at most 1 % of the union, or 2 pixels, differ), so a mixed-up response
cannot pass. The server's RSS is sampled from ``/healthz`` every 50 responses. Exit code 1 on any problem.

    python benchmarks/load_test.py --requests 300 --concurrency 16 --max-pending 64   # steady
    python benchmarks/load_test.py --requests 300 --concurrency 16 --max-pending 4    # over the bound
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import httpx
import numpy as np
import typer
from PIL import Image
from pycocotools import mask as mask_utils

logger = logging.getLogger("load_test")


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_requests(count: int, scenes: int, seed: int) -> tuple[list[dict], dict]:
    """``count`` requests (about 80 % valid) and the reference masks of every valid (scene, query)."""
    import torch

    from lens.data.synthetic import SyntheticWorld
    from lens.pipeline import LensPipeline

    torch.set_num_threads(1)
    world = SyntheticWorld(seed=0)
    pipe = LensPipeline.from_pretrained(device="cpu")
    pool = []
    for i in range(scenes):
        scene = world.scene("test", i)
        queries = [q.sample.query for q in scene.segmentation_queries()]
        masks = {r.query: r.mask for r in pipe(scene.image, queries)}
        pool.append((scene, _png(scene.image), queries, masks))
    rng = random.Random(seed)
    big = _png(np.zeros((2100, 2100, 3), np.uint8))  # over the --max-pixels the server is started with
    invalid = [
        ("segment", {"image": "%%% not base64", "queries": ["x"]}, 400),
        ("segment", {"image": base64.b64encode(b"GIF89a garbage").decode(), "queries": ["x"]}, 400),
        ("segment", {"image": big, "queries": ["the ring"]}, 400),
        ("segment", {"image": pool[0][1], "queries": ["   "]}, 400),
        ("segment", {"image": pool[0][1], "queries": []}, 422),
        ("chat", {"message": "hello", "conversation_id": "does-not-exist"}, 404),
    ]
    requests = []
    for k in range(count):
        if rng.random() < 0.2:
            kind, body, status = rng.choice(invalid)
            requests.append({"id": f"req-{k}", "kind": kind, "body": body, "expect": status})
        else:
            s = rng.randrange(len(pool))
            queries = rng.sample(pool[s][2], min(len(pool[s][2]), rng.randint(1, 3)))
            requests.append(
                {
                    "id": f"req-{k}",
                    "kind": "segment",
                    "body": {"image": pool[s][1], "queries": queries},
                    "expect": 200,
                    "scene": s,
                }
            )
    references = {(s, q): m for s, (_, _, _, masks) in enumerate(pool) for q, m in masks.items()}
    return requests, references


async def run_load(url: str, requests: list[dict], references: dict, concurrency: int) -> dict:
    semaphore = asyncio.Semaphore(concurrency)
    latencies: dict[int, list[float]] = {}
    problems: list[str] = []
    rss: list[int] = []
    done = 0

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(request: dict) -> None:
            nonlocal done
            async with semaphore:
                start = time.perf_counter()
                path = "/v1/segment" if request["kind"] == "segment" else "/v1/chat"
                r = await client.post(path, json=request["body"], headers={"X-Request-ID": request["id"]})
                latencies.setdefault(r.status_code, []).append(time.perf_counter() - start)
            body = r.json()
            if body.get("request_id") != request["id"] or r.headers.get("x-request-id") != request["id"]:
                problems.append(f"{request['id']}: answered as {body.get('request_id')}")
            if r.status_code == 503 and request["kind"] == "segment":
                pass  # the queue was full: refused before the body is read, valid or not
            elif r.status_code != request["expect"]:
                problems.append(f"{request['id']}: status {r.status_code}, expected {request['expect']}")
            elif r.status_code == 200:
                got = [x["query"] for x in body["results"]]
                if got != request["body"]["queries"]:
                    problems.append(f"{request['id']}: queries {got} != {request['body']['queries']}")
                for result in body["results"]:
                    rle = result["mask_rle"]
                    mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(
                        bool
                    )
                    truth = references[(request["scene"], result["query"])]
                    # Float noise of a different batch may flip a pixel on the threshold; a mix-up flips many.
                    if (mask ^ truth).sum() > max(2, 0.01 * (mask | truth).sum()):
                        problems.append(
                            f"{request['id']}: mask of {result['query']!r} differs from its reference"
                        )
            done += 1
            if done % 50 == 0:
                rss.append((await client.get("/healthz")).json()["rss_bytes"])

        rss.append((await client.get("/healthz")).json()["rss_bytes"])
        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in requests))
        wall = time.perf_counter() - start
        health = (await client.get("/healthz")).json()
    rss.append(health["rss_bytes"])
    every = [t for ts in latencies.values() for t in ts]

    def pct(values: list[float], q: float) -> float | None:
        return None if not values else float(np.percentile(values, q) * 1000)

    return {
        "requests": len(requests),
        "wall_s": wall,
        "status_counts": {str(k): len(v) for k, v in sorted(latencies.items())},
        "problems": problems,
        "latency_ms": {
            "all": {"p50": pct(every, 50), "p99": pct(every, 99)},
            **{
                str(k): {"p50": pct(v, 50), "p99": pct(v, 99), "max": pct(v, 100)}
                for k, v in latencies.items()
            },
        },
        "rss_mb": [round(v / 2**20, 1) for v in rss],
        "queue": health["queue"],
    }


def main(
    requests: int = 300,
    concurrency: int = 16,
    scenes: Annotated[int, typer.Option(help="distinct test scenes the valid requests use")] = 20,
    max_pending: Annotated[int, typer.Option(help="the server's queue bound (started here)")] = 8,
    max_batch: int = 8,
    url: Annotated[str | None, typer.Option(help="test a server already running here instead")] = None,
    seed: int = 0,
    out: Path | None = None,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    batch, references = make_requests(requests, scenes, seed)
    server = None
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable,
            "-m",
            "lens.cli",
            "serve",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--max-pending",
            str(max_pending),
            "--max-batch",
            str(max_batch),
            "--max-pixels",
            "4000000",
        ]
        server = subprocess.Popen(
            command,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not come up")
            time.sleep(0.5)
    try:
        report = asyncio.run(run_load(url, batch, references, concurrency))
        report["server_alive"] = server is None or server.poll() is None
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    report["settings"] = {"concurrency": concurrency, "max_pending": max_pending, "max_batch": max_batch}
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
    if report["problems"] or not report["server_alive"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
