"""The conversation: an explicit, serialisable record of images, turns and the segmentation memory M.

Everything an agent needs to continue a conversation lives here (never in the agent), so a conversation can
be saved to JSON, restored in another process (the HTTP service keeps one per id) and hold several images.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lens.errors import InvalidInput


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _unpng(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def _unrle(rle: dict[str, Any]) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    text: str
    image_id: str | None = None  # the image the turn is about
    intent: str | None = None  # assistant turns: how the router (or the caller) classified the user turn


@dataclass
class Memory:
    """M.last of Algorithm S1: the last segmentation (its image and mask), for follow-up questions."""

    image_id: str
    query: str
    mask: np.ndarray  # (H, W) bool


@dataclass
class Conversation:
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    images: dict[str, Image.Image] = field(default_factory=dict)
    turns: list[Turn] = field(default_factory=list)
    memory: Memory | None = None
    current_image: str | None = None  # the image later turns are about, until another is added

    def add_image(self, image: Image.Image, image_id: str | None = None) -> str:
        image_id = image_id or f"image-{len(self.images)}"
        self.images[image_id] = image.convert("RGB")
        self.current_image = image_id
        return image_id

    def image(self, image_id: str | None = None) -> Image.Image:
        key = image_id or self.current_image
        if key is None or key not in self.images:
            raise InvalidInput(
                f"conversation {self.id} has no image {key!r}; add one first" if key else "no image yet"
            )
        return self.images[key]

    def to_json(self) -> str:
        data = {
            "id": self.id,
            "images": {k: _png(v) for k, v in self.images.items()},
            "turns": [asdict(t) for t in self.turns],
            "memory": None
            if self.memory is None
            else {
                "image_id": self.memory.image_id,
                "query": self.memory.query,
                "mask": _rle(self.memory.mask),
            },
            "current_image": self.current_image,
        }
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Conversation:
        try:
            data = json.loads(text)
            memory = data["memory"]
            return cls(
                id=data["id"],
                images={k: _unpng(v) for k, v in data["images"].items()},
                turns=[Turn(**t) for t in data["turns"]],
                memory=None
                if memory is None
                else Memory(memory["image_id"], memory["query"], _unrle(memory["mask"])),
                current_image=data["current_image"],
            )
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidInput(f"not a saved conversation: {error}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Conversation:
        return cls.from_json(Path(path).read_text())
