"""The agent of Algorithm S1 on the shipped synthetic models: router, the three paths, memory, serialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lens.agent import (
    FIXED_REPLY,
    INTENTS,
    NOT_FOUND_REPLY,
    Conversation,
    LensAgent,
    Memory,
    Router,
    RouterPrompt,
)
from lens.data.synthetic import SyntheticWorld
from lens.errors import InvalidInput
from lens.pipeline import LensPipeline, PresenceCalibrator


@pytest.fixture(scope="module")
def pipe() -> LensPipeline:
    return LensPipeline.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(SyntheticWorld(seed=0).scene("test", 0).image)


class FixedScores:
    """A backbone stand-in whose label log-likelihoods are given: prompt text -> (3,) scores."""

    def __init__(self, scores: dict[str, list[float]]):
        self.scores, self.prompts = scores, []

    def score_continuations(self, image, instruction, continuations):
        self.prompts.append(instruction)
        key = "blank" if "request: n/a kind:" in instruction else "turn"
        return torch.tensor(self.scores[key])


def test_router_takes_the_likeliest_label_after_contextual_calibration(image):
    backbone = FixedScores({"turn": [-1.0, -1.5, -3.0], "blank": [-0.2, -1.2, -2.9]})
    route = Router(backbone, RouterPrompt())("cut out the ring.", image)
    # turn - blank = [-0.8, -0.3, -0.1]: follow_up wins though dialogue is likeliest uncalibrated.
    assert route.intent == "follow_up"
    assert route.log_likelihoods == pytest.approx({"dialogue": -0.8, "segmentation": -0.3, "follow_up": -0.1})
    raw = Router(backbone, RouterPrompt(content_free=None))("cut out the ring.", image)
    assert raw.intent == "dialogue"
    prompt = backbone.prompts[0]
    assert "request: please segment the red star. kind: two" in prompt and prompt.endswith(
        "request: cut out the ring. kind:"
    )


def test_router_prompt_checks_its_labels():
    with pytest.raises(ValueError, match="distinct"):
        RouterPrompt(labels={"dialogue": "one", "segmentation": "one", "follow_up": "three"})


def test_score_continuations_equals_the_next_token_distribution(pipe, image):
    backbone = pipe.model.backbone
    prompt = "what colour is the ring?"
    labels = [" one", " two", " three", " red ring"]
    scores = backbone.score_continuations(image, prompt, labels)
    inputs = backbone._inputs([image], [prompt])
    with torch.inference_mode():
        logits = backbone.model(**inputs).logits[0].float()  # (P, V) the prompt alone
    tokenizer = backbone.processor.tokenizer
    first = logits[-1].log_softmax(-1)
    for label, score in zip(labels[:3], scores[:3], strict=True):  # one token each
        (token,) = tokenizer(label, add_special_tokens=False)["input_ids"]
        assert float(score) == pytest.approx(float(first[token]), abs=1e-4)
    # Two tokens: log P(red) + log P(ring | red), the second from a forward pass over prompt + "red".
    red, ring = tokenizer(" red ring", add_special_tokens=False)["input_ids"]
    extended = dict(inputs)
    extended["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[red]])], 1)
    extended["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
    with torch.inference_mode():
        second = backbone.model(**extended).logits[0, -1].float().log_softmax(-1)
    assert float(scores[3]) == pytest.approx(float(first[red] + second[ring]), abs=1e-4)


class Spy:
    def __init__(self, backbone):
        self.backbone, self.calls = backbone, []

    def generate(self, images, instructions, **kwargs):
        self.calls.append((images[0].size, instructions[0]))
        return ["spy answer"]


def test_algorithm_s1_paths_and_memory(pipe, image):
    agent = LensAgent(pipe)
    spy = Spy(agent.backbone)
    agent.backbone = spy
    conversation = Conversation()
    conversation.add_image(image)

    # Follow-up with empty memory runs as a segmentation (Algorithm S1, lines 10-11).
    reply = agent(conversation, "what colour is the hexagon?", intent="follow_up")
    assert reply.intent == "segmentation" and reply.routed == "follow_up" and reply.overlay is not None
    assert reply.text in (FIXED_REPLY, NOT_FOUND_REPLY)

    always = PresenceCalibrator(["max_logit"], [0.0], 10.0, mean=[0.0], std=[1.0])
    agent.pipeline = LensPipeline(pipe.model, always)
    reply = agent(conversation, "please segment the hexagon.", intent="segmentation")
    assert reply.text == FIXED_REPLY and reply.segmentation.present
    assert conversation.memory is not None and np.array_equal(
        conversation.memory.mask, reply.segmentation.mask
    )

    reply = agent(conversation, "what colour is it?", intent="follow_up")
    assert reply.intent == "follow_up" and reply.text == "spy answer"
    assert spy.calls[-1] == ((2 * image.width, image.height), "what colour is it?")  # I0 beside its overlay

    reply = agent(conversation, "how many shapes are there?", intent="dialogue")
    assert reply.intent == "dialogue" and spy.calls[-1] == (image.size, "how many shapes are there?")
    assert [t.role for t in conversation.turns] == ["user", "assistant"] * 4

    never = PresenceCalibrator(["max_logit"], [0.0], -10.0, mean=[0.0], std=[1.0])
    agent.pipeline = LensPipeline(pipe.model, never)
    reply = agent(conversation, "please segment the unicorn.", intent="segmentation")
    assert reply.text == NOT_FOUND_REPLY and not reply.segmentation.mask.any() and conversation.memory is None
    with pytest.raises(InvalidInput, match="intent"):
        agent(conversation, "hi", intent="chitchat")


def test_routed_turns_use_the_mllm(pipe, image):
    reply = LensAgent(pipe)(Conversation(), "how many shapes are there?", image=image)
    assert reply.routed in INTENTS and set(reply.route.log_likelihoods) == set(INTENTS)
    assert reply.timings["route_s"] > 0


def test_conversation_round_trips_through_json(image, tmp_path):
    conversation = Conversation()
    first = conversation.add_image(image)
    second = conversation.add_image(image.rotate(90))
    mask = np.zeros((image.height, image.width), bool)
    mask[3:9, 20:31] = True
    conversation.memory = Memory(first, "the ring", mask)
    restored = Conversation.load(conversation.save(tmp_path / "c.json"))
    assert restored.id == conversation.id and restored.current_image == second
    assert set(restored.images) == {first, second}
    assert np.array_equal(np.asarray(restored.images[second]), np.asarray(conversation.images[second]))
    assert np.array_equal(restored.memory.mask, mask) and restored.memory.query == "the ring"
    with pytest.raises(InvalidInput, match="saved conversation"):
        Conversation.from_json('{"id": 1}')


def test_langchain_tool_returns_content_and_artifact(pipe, image):
    pytest.importorskip("langchain_core")
    from lens.agent.langchain import lens_tool

    conversation = Conversation()
    conversation.add_image(image)
    agent = LensAgent(pipe)
    agent.router = Router(FixedScores({"turn": [-3.0, -0.1, -2.0], "blank": [0.0, 0.0, 0.0]}))
    tool = lens_tool(agent, conversation)
    assert tool.response_format == "content_and_artifact"
    message = tool.invoke(
        {"type": "tool_call", "name": tool.name, "id": "call-1", "args": {"request": "cut out the hexagon."}}
    )
    assert message.content in (FIXED_REPLY, NOT_FOUND_REPLY)
    assert message.artifact["intent"] == "segmentation"
    assert message.artifact["mask"].shape == (image.height, image.width)


def test_cli_chat_and_segment(tmp_path, image):
    from typer.testing import CliRunner

    from lens.cli import app

    path = tmp_path / "scene.png"
    image.save(path)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "chat",
            str(path),
            "--device",
            "cpu",
            "--overlays",
            str(tmp_path / "ov"),
            "--save",
            str(tmp_path / "c.json"),
        ],
        input="how many shapes are there?\n/quit\n",
    )
    assert result.exit_code == 0, result.output
    assert "lens>" in result.output and len(Conversation.load(tmp_path / "c.json").turns) == 2
    result = runner.invoke(
        app, ["segment", str(path), "the hexagon", "--json", "--device", "cpu", "-o", str(tmp_path / "m.png")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.png").is_file() and '"query": "the hexagon"' in result.stdout
    result = runner.invoke(app, ["segment", str(tmp_path / "missing.png"), "x", "--device", "cpu"])
    assert result.exit_code == 2 and "no image at" in result.output


def test_the_benchmark_phrasings_are_held_out_of_every_template():
    import re
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import agent_routing

    from lens.data.synthetic.language import REASONING_LONG, VQA_TEMPLATES
    from lens.data.templates import LONG_QUESTION_TEMPLATES, SHORT_QUESTION_TEMPLATES

    def frame(text: str) -> str:  # a template's fixed words, placeholders removed
        return re.sub(r"\s+", " ", re.sub(r"\{[a-z_]+\}", " ", text.lower())).strip(" .?")

    templates = [*REASONING_LONG, *SHORT_QUESTION_TEMPLATES, *LONG_QUESTION_TEMPLATES]
    templates += [t for ts in VQA_TEMPLATES.values() for t in ts]
    held_out = [*agent_routing.SEGMENT, *agent_routing.DIALOGUE, *agent_routing.FOLLOW_UP]
    for phrase in held_out:
        for template in templates:
            assert frame(phrase) != frame(template), (phrase, template)
            assert frame(template) not in frame(phrase) or len(frame(template)) < 4, (phrase, template)
