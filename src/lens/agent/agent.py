"""Algorithm S1: route the turn, then talk (dialogue), segment (LENS + memory) or answer about the last mask."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from lens.agent.conversation import Conversation, Memory, Turn
from lens.agent.router import INTENTS, Route, Router, RouterPrompt
from lens.errors import InvalidInput
from lens.images import load_image, validate_query
from lens.pipeline import LensPipeline, Segmentation
from lens.visualize import overlay_mask

logger = logging.getLogger(__name__)

FIXED_REPLY = "Sure, the segmentation result is generated."  # Algorithm S1, line 7
NOT_FOUND_REPLY = "I could not find that in the image."  # the presence calibration said: not there


@dataclass
class AgentReply:
    text: str
    intent: str  # what was done (a follow-up with empty memory is done as a segmentation)
    routed: str  # what the router (or the caller's ``intent``) said
    route: Route | None  # the label log-likelihoods, None when the caller fixed the intent
    segmentation: Segmentation | None = None
    overlay: Image.Image | None = None
    timings: dict[str, float] = field(default_factory=dict)


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """``Concat(I0, Overlay(I0, mask0))`` of Algorithm S1, line 12."""
    out = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), "white")
    out.paste(left.convert("RGB"), (0, 0))
    out.paste(right.convert("RGB"), (left.width, 0))
    return out


class LensAgent:
    """One frozen MLLM that chats and segments. The same code runs the synthetic world's MLLM and LLaVA-1.5.

    Arguments:
        pipeline: LENS on that MLLM (its ``model.backbone`` answers and routes too).
        router: intent classifier (default: the MLLM's own label likelihoods on ``RouterPrompt()``).
        max_new_tokens: length of dialogue and follow-up answers.
    """

    def __init__(self, pipeline: LensPipeline, router: Router | None = None, max_new_tokens: int = 32):
        self.pipeline = pipeline
        self.backbone = pipeline.model.backbone
        self.router = router or Router(self.backbone, RouterPrompt())
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(cls, checkpoint: str = "lens:synthetic/lens", **kwargs: Any) -> LensAgent:
        return cls(LensPipeline.from_pretrained(checkpoint, **kwargs))

    def __call__(
        self,
        conversation: Conversation,
        text: str,
        image: Any | None = None,
        intent: str | None = None,
    ) -> AgentReply:
        """One user turn. ``image`` adds a new image to the conversation; ``intent`` skips the router (oracle)."""
        text = validate_query(text)
        if image is not None:
            conversation.add_image(load_image(image, max_pixels=self.pipeline.max_pixels))
        picture = conversation.image()
        if intent is not None and intent not in INTENTS:
            raise InvalidInput(f"intent must be one of {INTENTS}, got {intent!r}")
        start = time.perf_counter()
        route = None if intent is not None else self.router(text, picture)
        routed = intent or route.intent
        timings = {"route_s": time.perf_counter() - start}
        conversation.turns.append(Turn("user", text, conversation.current_image))
        reply = self._act(conversation, text, picture, routed, route, timings)
        conversation.turns.append(Turn("assistant", reply.text, conversation.current_image, reply.intent))
        return reply

    def _act(
        self,
        conversation: Conversation,
        text: str,
        image: Image.Image,
        routed: str,
        route: Route | None,
        timings: dict[str, float],
    ) -> AgentReply:
        start = time.perf_counter()
        if routed == "dialogue":
            answer = self.backbone.generate([image], [text], max_new_tokens=self.max_new_tokens)[0]
            timings["generate_s"] = time.perf_counter() - start
            return AgentReply(answer, "dialogue", routed, route, timings=timings)
        if routed == "follow_up" and conversation.memory is not None:  # lines 9-14
            memory = conversation.memory
            original = conversation.image(memory.image_id)
            shown = side_by_side(original, overlay_mask(original, memory.mask))
            answer = self.backbone.generate([shown], [text], max_new_tokens=self.max_new_tokens)[0]
            timings["generate_s"] = time.perf_counter() - start
            return AgentReply(answer, "follow_up", routed, route, timings=timings)
        # Segmentation, or a follow-up with nothing in memory (line 11: run the algorithm as a segmentation).
        result = self.pipeline(image, text)
        timings["segment_s"] = time.perf_counter() - start
        conversation.memory = (
            Memory(conversation.current_image, text, result.mask) if result.present else None
        )
        overlay = result.overlay()
        reply = FIXED_REPLY if result.present else NOT_FOUND_REPLY
        return AgentReply(reply, "segmentation", routed, route, result, overlay, timings)
