"""The HTTP service, through a real HTTP client against a uvicorn server on localhost."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from pycocotools import mask as mask_utils  # noqa: E402

from lens.data.synthetic import SyntheticWorld  # noqa: E402
from lens.pipeline import LensPipeline  # noqa: E402
from lens.serve import ServeSettings, create_app  # noqa: E402
from lens.serve import serve_in_thread as running  # noqa: E402


@pytest.fixture(scope="module")
def pipe() -> LensPipeline:
    return LensPipeline.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def scenes():
    world = SyntheticWorld(seed=0)
    return [world.scene("test", i) for i in range(4)]


@pytest.fixture(scope="module")
def url(pipe) -> Iterator[str]:
    settings = ServeSettings(max_pixels=200 * 200, max_request_bytes=2_000_000, max_wait_s=0.05)
    with running(create_app(pipe, settings=settings)) as base:
        yield base


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def test_segment_json_and_multipart_match_the_pipeline(url, pipe, scenes):
    scene = scenes[0]
    queries = [q.sample.query for q in scene.segmentation_queries()[:2]]
    expected = pipe(scene.image, queries)
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post(
            "/v1/segment",
            json={"image": b64(png(scene.image)), "queries": queries},
            headers={"X-Request-ID": "abc-1"},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["request_id"] == "abc-1" == r.headers["x-request-id"]
        assert [x["query"] for x in body["results"]] == queries
        for got, want in zip(body["results"], expected, strict=True):
            assert np.array_equal(decode(got["mask_rle"]), want.mask)
            assert got["present"] == want.present and got["presence"] == pytest.approx(
                want.presence, abs=1e-3
            )
        r = client.post(
            "/v1/segment",
            files={"image": ("s.png", png(scene.image), "image/png")},
            data={"query": queries[:1]},
        )
        assert r.status_code == 200, r.text
        assert np.array_equal(decode(r.json()["results"][0]["mask_rle"]), expected[0].mask)
        assert client.get("/healthz").json()["status"] == "ok"
        assert "/v1/segment" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({"image": "%%%", "queries": ["x"]}, 400, "base64"),
        ({"image": b64(b"not an image"), "queries": ["x"]}, 400, "not a readable image"),
        ({"image": b64(png(np.zeros((300, 300, 3), np.uint8))), "queries": ["x"]}, 400, "pixel limit"),
        ({"image": b64(png(np.zeros((32, 32, 3), np.uint8))), "queries": ["   "]}, 400, "whitespace"),
        ({"image": b64(png(np.zeros((32, 32, 3), np.uint8))), "queries": []}, 422, "queries"),
        ({"queries": ["x"]}, 422, "image"),
    ],
)
def test_bad_segment_requests_get_a_json_4xx(url, payload, status, message):
    r = httpx.post(f"{url}/v1/segment", json=payload, timeout=30)
    assert r.status_code == status, r.text
    assert message in r.json()["error"] and r.json()["request_id"]


def test_oversized_body_and_unknown_conversation(url):
    r = httpx.post(
        f"{url}/v1/segment", content=b"x" * 2_100_000, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "exceeds" in r.json()["error"]
    r = httpx.post(f"{url}/v1/chat", json={"message": "hi", "conversation_id": "nope"})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    r = httpx.post(f"{url}/v1/chat", json={"message": "hi"})
    assert r.status_code == 400 and "needs an image" in r.json()["error"]


def test_concurrent_requests_are_batched_and_never_mixed_up(url, pipe, scenes):
    jobs = [(s, q.sample.query) for s in scenes for q in s.segmentation_queries()[:3]]
    expected = {(s.name, q): pipe(s.image, q).mask for s, q in jobs}
    before = httpx.get(f"{url}/healthz").json()["queue"]

    def send(k: int):
        scene, query = jobs[k]
        r = httpx.post(
            f"{url}/v1/segment",
            json={"image": b64(png(scene.image)), "queries": [query]},
            headers={"X-Request-ID": f"job-{k}"},
            timeout=60,
        )
        return k, r

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(send, range(len(jobs))))
    for k, r in answers:
        scene, query = jobs[k]
        assert r.status_code == 200 and r.json()["request_id"] == f"job-{k}"
        assert r.json()["results"][0]["query"] == query
        got = decode(r.json()["results"][0]["mask_rle"])
        assert (got != expected[(scene.name, query)]).mean() < 1e-3
    after = httpx.get(f"{url}/healthz").json()["queue"]
    requests, batches = (
        after["batched_requests"] - before["batched_requests"],
        after["batches"] - before["batches"],
    )
    assert requests == len(jobs) and batches < requests  # some forward passes served several requests


@pytest.mark.slow  # each forward pass is made to take 1.5 s
def test_requests_beyond_the_bound_get_503_promptly(pipe, scenes):
    class Slow(LensPipeline):
        def batch(self, requests):
            time.sleep(1.5)
            return super().batch(requests)

    slow = Slow(pipe.model, pipe.presence)
    settings = ServeSettings(max_pending=2, max_batch=1, max_wait_s=0.0)
    body = {"image": b64(png(scenes[0].image)), "queries": ["the hexagon"]}
    with running(create_app(slow, settings=settings)) as base, ThreadPoolExecutor(8) as pool:

        def send(_):
            start = time.perf_counter()
            r = httpx.post(f"{base}/v1/segment", json=body, timeout=60)
            return r.status_code, time.perf_counter() - start, r

        answers = list(pool.map(send, range(8)))
    codes = [c for c, _, _ in answers]
    assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) <= {200, 503}
    refused = [(t, r) for c, t, r in answers if c == 503]
    served = min(t for c, t, _ in answers if c == 200)
    assert max(t for t, _ in refused) < served  # refused at once, not after waiting for the model
    assert all(r.headers["retry-after"] == "1" and "busy" in r.json()["error"] for _, r in refused)


def test_chat_segments_then_answers_a_follow_up(url, scenes):
    scene = scenes[1]
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post(
            "/v1/chat",
            json={
                "message": "please segment the hexagon.",
                "intent": "segmentation",
                "image": b64(png(scene.image)),
            },
        )
        assert r.status_code == 200, r.text
        first = r.json()
        assert first["intent"] == "segmentation" and first["reply"]
        assert "segmentation" in first and Image.open(io.BytesIO(base64.b64decode(first["overlay_png"])))
        r = client.post(
            "/v1/chat",
            json={
                "message": "what colour is it?",
                "intent": "follow_up",
                "conversation_id": first["conversation_id"],
            },
        )
        assert r.status_code == 200 and r.json()["conversation_id"] == first["conversation_id"]
        assert r.json()["intent"] in ("follow_up", "segmentation")  # segmentation when nothing was found
        r = client.post(
            "/v1/chat",
            json={"message": "how many shapes are there?", "conversation_id": first["conversation_id"]},
        )
        assert r.status_code == 200 and set(r.json()["route"]) == {"dialogue", "segmentation", "follow_up"}
