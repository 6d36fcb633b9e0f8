"""The agent as a LangChain tool (``pip install lens-seg[langchain]``): text for the LLM, the mask as artifact."""

from __future__ import annotations

from typing import Any

from lens.agent.agent import LensAgent
from lens.agent.conversation import Conversation


def lens_tool(agent: LensAgent, conversation: Conversation, name: str = "lens") -> Any:
    """A ``StructuredTool`` answering one user turn about ``conversation``'s current image.

    ``response_format="content_and_artifact"``: the tool message's content is the agent's reply; its artifact
    is ``{"intent", "mask" ((H, W) bool or None), "present", "presence", "box", "overlay" (PIL or None)}``.
    """
    try:
        from langchain_core.tools import StructuredTool
    except ImportError as error:
        raise ImportError(
            "lens_tool needs `pip install langchain-core` (extra: lens-seg[langchain])"
        ) from error

    def run(request: str) -> tuple[str, dict[str, Any]]:
        reply = agent(conversation, request)
        seg = reply.segmentation
        artifact = {
            "intent": reply.intent,
            "mask": None if seg is None else seg.mask,
            "present": None if seg is None else seg.present,
            "presence": None if seg is None else seg.presence,
            "box": None if seg is None else seg.box,
            "overlay": reply.overlay,
        }
        return reply.text, artifact

    return StructuredTool.from_function(
        run,
        name=name,
        description=(
            "Look at the current image: answer a question about it, segment an object it shows "
            "(e.g. 'please segment the red ring.'), or answer a question about the last segmented object."
        ),
        response_format="content_and_artifact",
    )
