"""The agent of the paper's supplementary S2 (Algorithm S1): one frozen MLLM that chats and segments.

A router asks the MLLM itself which of three intents a user turn has (dialogue, segmentation, follow-up) by
comparing the likelihoods of the three labels; segmentation turns run LENS and store the overlay in the
conversation's memory; follow-ups show the MLLM the original image beside that overlay.
"""

from lens.agent.agent import FIXED_REPLY, NOT_FOUND_REPLY, AgentReply, LensAgent
from lens.agent.conversation import Conversation, Memory, Turn
from lens.agent.router import INTENTS, Route, Router, RouterPrompt

__all__ = [
    "FIXED_REPLY",
    "INTENTS",
    "NOT_FOUND_REPLY",
    "AgentReply",
    "Conversation",
    "LensAgent",
    "Memory",
    "Route",
    "Router",
    "RouterPrompt",
    "Turn",
]
