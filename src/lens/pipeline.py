"""LENS for users: masks in three lines, embed once and query many, a calibrated "is it there at all?".

    pipe = LensPipeline.from_pretrained()              # the shipped synthetic models; or a path / hub id
    result = pipe("scene.png", "the red ring")         # a Segmentation: mask, presence, box, keypoints, ...
    pipe.set_image("scene.png"); pipe("the blue star")  # the image's frozen work done once for many queries

SAM's predicted IoU says how good a mask *would be*, not whether the query's object exists: a query for an
absent object still gets a confident blob. ``PresenceCalibrator`` is a small logistic model on the mask
logits, the mask's area, the peak of A_c and SAM's IoU, fitted on the synthetic world's target / no-target
queries (``scripts/fit_presence.py``) and stored as ``presence.json`` beside the checkpoint; a query judged
absent gets an empty mask and ``present=False``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lens.assets import SYNTHETIC_LENS, resolve_model_id
from lens.data.templates import format_question
from lens.errors import InvalidInput
from lens.geometry import ImageGeometry
from lens.images import DEFAULT_MAX_PIXELS, load_image, validate_query
from lens.model import EmbeddedImage, LensModel, Prediction
from lens.visualize import attention_image, draw_keypoints, overlay_mask

logger = logging.getLogger(__name__)

PRESENCE_FILE = "presence.json"  # beside lens_config.yaml / model.safetensors in a checkpoint directory
CHECKPOINT_FILES = ("lens_config.yaml", "model.safetensors", PRESENCE_FILE)
_SENTENCE_END = ".?!"


# ----------------------------------------------------------------------------------------------------------
# Presence: is the object the query names in the image at all?


def presence_features(prediction: Prediction) -> dict[str, float]:
    """Per-query evidence that the target exists, from what LENS computed anyway.

    ``max_logit`` and ``mean_logit_inside`` separate target from no-target queries best on the synthetic val
    split; SAM's IoU head alone does not (its medians are 0.37 and 0.34).
    """
    if prediction.mask_logits is None:
        raise ValueError("presence needs the prediction's mask logits (Prediction.mask_logits is None)")
    logits = prediction.mask_logits
    inside = logits[prediction.mask]
    attention = np.asarray(prediction.attention_map, np.float64)
    cells = attention.size
    return {
        "max_logit": float(logits.max()),
        "mean_logit_inside": float(inside.mean()) if inside.size else 0.0,
        "log_area": math.log(float(prediction.mask.mean()) + 1e-4),
        "log_attention_peak": math.log(float(attention.max()) * cells + 1e-6),  # 0: uniform attention
        "iou_score": float(prediction.score),
    }


@dataclass
class PresenceCalibrator:
    """P(target present) = sigmoid(w · (x - mean) / std + b) on ``presence_features``; JSON-serialisable."""

    feature_names: list[str]
    weights: list[float]
    bias: float
    mean: list[float]
    std: list[float]
    threshold: float = 0.5  # present when the probability reaches it
    fitted_on: dict[str, Any] = field(default_factory=dict)  # how it was made (split, scenes, command)

    def vector(self, prediction: Prediction) -> np.ndarray:
        features = presence_features(prediction)
        return np.array([features[name] for name in self.feature_names], np.float64)

    def probability(self, prediction: Prediction) -> float:
        z = (self.vector(prediction) - np.asarray(self.mean)) / np.asarray(self.std)
        logit = float(z @ np.asarray(self.weights) + self.bias)
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, logit))))

    @classmethod
    def fit(
        cls, features: np.ndarray, present: np.ndarray, feature_names: Sequence[str], l2: float = 1e-3
    ) -> PresenceCalibrator:
        """Class-balanced L2 logistic regression (L-BFGS) on (N, F) ``features`` and (N,) bool ``present``."""
        x = torch.as_tensor(features, dtype=torch.float64)
        y = torch.as_tensor(np.asarray(present), dtype=torch.float64)
        if x.ndim != 2 or len(x) != len(y) or y.min() == y.max():
            raise ValueError("fit needs (N, F) features and labels of both classes")
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - mean) / std
        # Balanced: no-target queries are ~10 % of the world's, and a miss of either kind costs the same.
        weight = torch.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, weight=weight)
            loss = loss + l2 * (w**2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return cls(list(feature_names), w.detach().tolist(), float(b.detach()), mean.tolist(), std.tolist())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> PresenceCalibrator:
        data = json.loads(Path(path).read_text())
        try:
            calibrator = cls(**data)
        except TypeError as error:
            raise InvalidInput(f"{path} is not a presence calibration: {error}") from None
        unknown = set(calibrator.feature_names) - set(PRESENCE_FEATURES)
        if unknown or not len(calibrator.weights) == len(calibrator.mean) == len(calibrator.feature_names):
            raise InvalidInput(f"{path}: unknown or inconsistent presence features {sorted(unknown)}")
        return calibrator


PRESENCE_FEATURES = ("max_logit", "mean_logit_inside", "log_area", "log_attention_peak", "iou_score")


# ----------------------------------------------------------------------------------------------------------
# One query's result


@dataclass
class Segmentation:
    """What LENS found for one query on one image; ``mask`` is empty when ``present`` is False."""

    query: str
    mask: np.ndarray  # (H, W) bool at the original image size
    present: bool  # the calibrated decision (mask non-empty when no calibration is loaded)
    presence: float | None  # calibrated P(target present); None without a calibration
    score: float  # SAM's predicted IoU of the mask it drew (not a presence score)
    keypoints: np.ndarray  # (n, 2) x, y in original image pixels
    keypoints_inside: np.ndarray  # (n,) bool: inside LENS's mask (white vs red in the paper's Fig. 3)
    attention_map: np.ndarray  # (gh, gw) A_c
    geometry: ImageGeometry
    image: Image.Image = field(repr=False)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: load, embed, predict, total

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1) pixel bounds of the mask, x1 / y1 exclusive; None when the mask is empty."""
        if not self.mask.any():
            return None
        rows, cols = np.flatnonzero(self.mask.any(1)), np.flatnonzero(self.mask.any(0))
        return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def rle(self) -> dict[str, Any]:
        """The mask as COCO run-length encoding ({"size": [H, W], "counts": str}), via pycocotools."""
        from pycocotools import mask as mask_utils

        encoded = mask_utils.encode(np.asfortranarray(self.mask.astype(np.uint8)))
        return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}

    def save_mask(self, path: str | Path) -> Path:
        """The mask as a one-channel PNG (255 object, 0 background)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.mask.astype(np.uint8) * 255).save(path)
        return path

    def overlay(self, keypoints: bool = True) -> Image.Image:
        """The image with the mask blended in and the keypoints drawn (white inside, red outside)."""
        out = overlay_mask(self.image, self.mask)
        return draw_keypoints(out, self.keypoints, self.keypoints_inside) if keypoints else out

    def attention_overlay(self, alpha: float = 0.6) -> Image.Image:
        """A_c drawn over the image (each pixel shows the grid cell it falls in), with the keypoints."""
        h, w = self.mask.shape
        ys, xs = np.mgrid[0:h, 0:w]
        centres = torch.tensor(np.stack([xs + 0.5, ys + 0.5], -1), dtype=torch.float32)  # (h, w, 2)
        cells = self.geometry.image_to_grid(centres).numpy()
        gh, gw = self.attention_map.shape
        col = np.clip(np.round(cells[..., 0]).astype(int), 0, gw - 1)
        row = np.clip(np.round(cells[..., 1]).astype(int), 0, gh - 1)
        heat = attention_image(self.attention_map[row, col], (w, h))
        blended = Image.blend(self.image.convert("RGB"), heat, alpha)
        return draw_keypoints(blended, self.keypoints, self.keypoints_inside)

    def to_supervision(self) -> Any:
        """A ``supervision.Detections`` with this mask (none when absent); needs ``pip install lens-seg[supervision]``."""
        try:
            import supervision as sv
        except ImportError as error:
            raise ImportError("to_supervision needs `pip install supervision`") from error
        if not self.present or self.box is None:
            return sv.Detections.empty()
        return sv.Detections(
            xyxy=np.array([self.box], np.float32),
            mask=self.mask[None],
            confidence=np.array([self.presence if self.presence is not None else self.score], np.float32),
            data={"query": np.array([self.query])},
        )

    def to_dict(self, attention: bool = False) -> dict[str, Any]:
        """JSON-ready: RLE mask, presence, scores, box, keypoints (and A_c if asked), timings."""
        out = {
            "query": self.query,
            "present": self.present,
            "presence": self.presence,
            "score": self.score,
            "area": self.area,
            "box": self.box,
            "mask_rle": self.rle(),
            "keypoints": [
                {"x": float(x), "y": float(y), "inside": bool(i)}
                for (x, y), i in zip(self.keypoints, self.keypoints_inside, strict=True)
            ],
            "timings": self.timings,
        }
        if attention:
            out["attention_map"] = np.asarray(self.attention_map, np.float32).round(5).tolist()
        return out


# ----------------------------------------------------------------------------------------------------------
# The pipeline


def select_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA if present, else Apple's MPS, else CPU; anything else must exist on this machine."""
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise InvalidInput(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(f"device {name!r} asked for, but this machine has no CUDA GPU")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInput(f"device {name!r} asked for, but MPS is not available here")
    return chosen


def checkpoint_directory(checkpoint: str | Path, revision: str | None = None) -> Path:
    """A local LENS checkpoint directory from a path, a shipped ``lens:`` asset or a Hugging Face hub id."""
    text = str(checkpoint)
    local = Path(resolve_model_id(text))
    if local.is_dir():
        return local
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise InvalidInput(f"no LENS checkpoint directory at {text}")
    from huggingface_hub import snapshot_download  # a hub id "owner/name": only the checkpoint's files

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=list(CHECKPOINT_FILES)))
    except Exception as error:  # offline, unknown repo, no access: one line naming both places looked in
        raise InvalidInput(
            f"{text!r} is neither a local directory nor a reachable hub checkpoint ({type(error).__name__})"
        ) from None


def instruction(query: str, raw: bool = False) -> str:
    """The instruction LENS was trained on: LISA's template around a phrase, or around a whole sentence.

    A query ending in ``.?!`` is a sentence ("which object has a hole? please segment it."), anything else a
    phrase ("the red ring"); ``raw`` passes the text on unchanged.
    """
    query = validate_query(query)
    return query if raw else format_question(query, is_sentence=query[-1] in _SENTENCE_END)


class LensPipeline:
    """A trained LENS behind one call: image (or a set image) + query or queries → ``Segmentation``\\(s).

    Arguments:
        model: a trained ``LensModel`` (eval mode).
        presence: the calibration deciding ``present``; None: present iff the mask is non-empty.
        max_pixels: larger images are refused before decoding.
        batch_size: (image, query) pairs per forward pass in ``batch``.
        raw_queries: pass queries to the MLLM as written instead of in the training template.
    """

    def __init__(
        self,
        model: LensModel,
        presence: PresenceCalibrator | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        batch_size: int = 16,
        raw_queries: bool = False,
    ):
        if batch_size < 1:
            raise InvalidInput(f"batch_size must be at least 1, got {batch_size}")
        self.model = model.eval()
        self.presence = presence
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        self.raw_queries = raw_queries
        self._embedded: EmbeddedImage | None = None
        self._embed_seconds = 0.0

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | Path = SYNTHETIC_LENS,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        revision: str | None = None,
        presence: str | Path | PresenceCalibrator | None = "auto",
        **kwargs: Any,
    ) -> LensPipeline:
        """Load a LENS checkpoint (local path, ``lens:`` asset or hub id) with its frozen MLLM and SAM.

        Arguments:
            device: ``auto`` (CUDA → MPS → CPU) or a torch device string.
            dtype: the MLLM's dtype (e.g. ``bfloat16``); default the checkpoint config's.
            load_in_8bit / load_in_4bit: quantise the MLLM with bitsandbytes (CUDA only).
            presence: ``auto`` (the checkpoint's ``presence.json`` if it has one), a path, a calibrator, None.
        """
        from lens.weights import CONFIG_NAME, build_lens, load_lens_weights

        directory = checkpoint_directory(checkpoint, revision)
        if not (directory / CONFIG_NAME).is_file():
            raise InvalidInput(f"{directory} is not a LENS checkpoint (no {CONFIG_NAME})")
        from lens.config import LensConfig

        config = LensConfig.from_yaml(directory / CONFIG_NAME)
        chosen = select_device(device)
        if dtype is not None:
            name = str(dtype).removeprefix("torch.")
            if not isinstance(getattr(torch, name, None), torch.dtype):
                raise InvalidInput(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
            config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, dtype=name))
        if load_in_4bit or load_in_8bit:
            config = _quantized_config(config, chosen, bits=4 if load_in_4bit else 8)
        model = build_lens(config, chosen)
        model = load_lens_weights(model, directory)
        if isinstance(presence, str) and presence == "auto":
            presence = directory / PRESENCE_FILE if (directory / PRESENCE_FILE).is_file() else None
            if presence is None:
                logger.warning("%s has no %s: `present` means a non-empty mask", directory, PRESENCE_FILE)
        if isinstance(presence, str | Path):
            presence = PresenceCalibrator.load(presence)
        return cls(model, presence, **kwargs)

    # ------------------------------------------------------------------ embed once, query many

    def set_image(self, image: Any) -> EmbeddedImage:
        """Do the image's query-independent work once (SAM's embedding; the MLLM's prefix where supported)."""
        start = time.perf_counter()
        self._embedded = self.model.embed_image(load_image(image, max_pixels=self.max_pixels))
        self._embed_seconds = time.perf_counter() - start
        return self._embedded

    def reset_image(self) -> None:
        self._embedded = None

    @property
    def image(self) -> Image.Image | None:
        """The image ``set_image`` set, if any."""
        return None if self._embedded is None else self._embedded.image

    def __call__(
        self, image_or_query: Any, query: str | Sequence[str] | None = None
    ) -> Segmentation | list[Segmentation]:
        """``pipe(image, query)``, ``pipe(image, [queries])``, or ``pipe(query)`` after ``set_image``."""
        if query is None:
            if self._embedded is None:
                raise InvalidInput(
                    "pipe(query) needs pipe.set_image(image) first; or call pipe(image, query)"
                )
            return self._predict(self._embedded, image_or_query, {"embed_s": self._embed_seconds})
        start = time.perf_counter()
        image = load_image(image_or_query, max_pixels=self.max_pixels)
        return self._predict(image, query, {"load_s": time.perf_counter() - start})

    def _predict(
        self, image: Image.Image | EmbeddedImage, query: str | Sequence[str], timings: dict[str, float]
    ) -> Segmentation | list[Segmentation]:
        queries = [query] if isinstance(query, str) else list(query)
        if not queries:
            raise InvalidInput("no query given")
        texts = [instruction(q, self.raw_queries) for q in queries]
        start = time.perf_counter()
        predictions = self.model.predict(image, texts)
        timings = {**timings, "predict_s": time.perf_counter() - start, "queries": len(queries)}
        picture = image.image if isinstance(image, EmbeddedImage) else image
        results = [self._result(q, p, picture, timings) for q, p in zip(queries, predictions, strict=True)]
        return results[0] if isinstance(query, str) else results

    def batch(self, requests: Sequence[tuple[Any, str | Sequence[str]]]) -> list[list[Segmentation]]:
        """Many images, each with one or more queries: (image, query pair)s run ``batch_size`` per forward pass.

        Returns one list of results per request, in order. Images are refused one by one before any work.
        """
        images = [load_image(image, max_pixels=self.max_pixels) for image, _ in requests]
        queries = [[q] if isinstance(q, str) else list(q) for _, q in requests]
        if any(not q for q in queries):
            raise InvalidInput("every request needs at least one query")
        pairs = [(i, q, instruction(q, self.raw_queries)) for i, qs in enumerate(queries) for q in qs]
        flat: list[Segmentation] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            begin = time.perf_counter()
            predictions = self.predict_many([images[i] for i, _, _ in chunk], [t for _, _, t in chunk])
            timings = {"predict_s": time.perf_counter() - begin, "queries": len(chunk)}
            flat += [
                self._result(q, p, images[i], timings)
                for (i, q, _), p in zip(chunk, predictions, strict=True)
            ]
        out, k = [], 0
        for qs in queries:
            out.append(flat[k : k + len(qs)])
            k += len(qs)
        return out

    @torch.inference_mode()
    def predict_many(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[Prediction]:
        """One forward pass over (image, instruction) pairs on different images (what the HTTP queue batches).

        Each distinct image goes through SAM's encoder and the MLLM's vision tower once.
        """
        model = self.model
        inputs = model.prepare(list(images), list(texts))
        out = model(inputs)
        geometries = inputs.features.geometries
        threshold = model.config.decoder.mask_threshold
        predictions = []
        for i, (image, geometry) in enumerate(zip(images, geometries, strict=True)):
            logits = out.mask_logits[i].float()
            mask = (logits > threshold).cpu().numpy()
            points = geometry.grid_to_image(out.keypoints[i][out.keypoints_valid[i]]).cpu().numpy()
            cols = np.clip(points[:, 0].astype(int), 0, image.width - 1)
            rows = np.clip(points[:, 1].astype(int), 0, image.height - 1)
            gh, gw = geometry.grid_size  # A_c is padded to the batch's largest grid
            predictions.append(
                Prediction(
                    mask=mask,
                    score=float(out.iou_scores[i]),
                    keypoints=points,
                    keypoints_inside=mask[rows, cols],
                    attention_map=out.attention_map[i, :gh, :gw].float().cpu().numpy(),
                    geometry=geometry,
                    mask_logits=logits.cpu().numpy(),
                )
            )
        return predictions

    def _result(
        self, query: str, prediction: Prediction, image: Image.Image, timings: dict[str, float]
    ) -> Segmentation:
        presence = None if self.presence is None else self.presence.probability(prediction)
        present = bool(prediction.mask.any()) if presence is None else presence >= self.presence.threshold
        mask = prediction.mask if present else np.zeros_like(prediction.mask)
        return Segmentation(
            query=query,
            mask=mask,
            present=bool(present and mask.any()),
            presence=presence,
            score=prediction.score,
            keypoints=prediction.keypoints,
            keypoints_inside=mask[
                np.clip(prediction.keypoints[:, 1].astype(int), 0, image.height - 1),
                np.clip(prediction.keypoints[:, 0].astype(int), 0, image.width - 1),
            ],
            attention_map=prediction.attention_map,
            geometry=prediction.geometry,
            image=image,
            timings=dict(timings),
        )


def _quantized_config(config: Any, device: torch.device, bits: int) -> Any:
    """``config`` with its MLLM in ``bits``-bit bitsandbytes weights (``backbone.quantization``); CUDA only."""
    if device.type != "cuda":
        raise InvalidInput(f"{bits}-bit loading needs a CUDA GPU (bitsandbytes); device is {device}")
    return dataclasses.replace(
        config, backbone=dataclasses.replace(config.backbone, quantization=f"{bits}bit")
    )
