"""The routed LISA-style baseline: turns reach the right model (the untouched MLLM's own generate, LISA's own
mask), the oracle skips the router, memory counts each tensor once, and the turn-level scores."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from helpers import TINY_LAYER, make_lens, random_image
from lens.agent import Conversation, LensAgent, Route
from lens.backbone import LlavaBackbone
from lens.baselines.lisa import LisaModel
from lens.baselines.routed import (
    LisaPipeline,
    RoutedSystem,
    app,
    deployment_bytes,
    memory_report,
    shared_frozen_bytes,
    tensor_bytes,
)
from lens.data.synthetic import SyntheticWorld
from lens.pipeline import LensPipeline, instruction
from lens.tiny import build_tiny_models
from lens.weights import save_lens_weights
from lens.world.turns import score_turns

IMAGE_SIZE = (40, 56)  # (height, width): not square, as the MLLM and SAM frames both pad it


def _lisa(seed: int = 0) -> LisaModel:
    """A tiny LISA-style model whose every trainable tensor is moved off its initial value (LoRA's B starts
    at zero, where the fine-tuned MLLM would answer exactly as the original)."""
    lens = make_lens(build_tiny_models(seed=0), backbone__dtype="float32")
    lens.config.baseline = dataclasses.replace(lens.config.baseline, system="lisa")
    torch.manual_seed(seed)
    model = LisaModel(lens.config, lens.backbone, lens.decoder)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=generator))
    return model.eval()


def _original() -> LlavaBackbone:
    llava, processor, _, _ = build_tiny_models(seed=0)  # the same pretrained weights LISA started from
    return LlavaBackbone(llava, processor, layer=TINY_LAYER)


class FixedRouter:
    """Says ``intent`` for every turn and records the turns it saw."""

    def __init__(self, intent: str):
        self.intent, self.calls = intent, []

    def __call__(self, text: str, image: Image.Image) -> Route:
        self.calls.append(text)
        return Route(self.intent, {"dialogue": 0.0, "segmentation": 0.0, "follow_up": 0.0})


class Spy:
    """Stands in for the original MLLM's ``generate`` and records what it was shown."""

    def __init__(self):
        self.calls = []

    def generate(self, images, instructions, **kwargs):
        self.calls.append((images[0].size, instructions[0]))
        return ["spy answer"]


@pytest.fixture(scope="module")
def system() -> RoutedSystem:
    return RoutedSystem(_original(), LisaPipeline(_lisa()))


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return random_image(*IMAGE_SIZE, seed=3)


def _hf_generate(image: Image.Image, text: str, max_new_tokens: int = 32) -> str:
    """Greedy answer of a third, untouched copy of the tiny LLaVA, through transformers alone."""
    llava, processor, _, _ = build_tiny_models(seed=0)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = llava.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(
        out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    ).strip()


def test_dialogue_turns_are_answered_by_the_untouched_mllm(system, image):
    text = "what is the colour of the red ring?"
    reply = system(Conversation(), text, image=image, intent="dialogue")
    assert reply.intent == "dialogue" and reply.segmentation is None
    assert reply.text == _hf_generate(image, text)
    fine_tuned = system.pipeline.model.mllm.generate([image], [text])[0]
    assert fine_tuned != reply.text  # the fine-tuned copy answers otherwise: the answer is not LISA's
    tokenizer = system.backbone.processor.tokenizer
    assert (
        "[SEG]" not in tokenizer.get_vocab()
        and "[SEG]" in system.pipeline.model.backbone.processor.tokenizer.get_vocab()
    )


def test_segmentation_turns_take_lisas_mask_and_reply(system, image):
    conversation = Conversation()
    text = "please segment the red ring."
    reply = system(conversation, text, image=image, intent="segmentation")
    model = system.pipeline.model
    with torch.no_grad():
        logits = model(model.prepare([image], [instruction(text)])).mask_logits[0]
    expected = (logits > model.config.decoder.mask_threshold).numpy()
    assert 0 < expected.sum() < expected.size  # a mask with an edge, so equality means something
    assert reply.intent == "segmentation" and reply.text == "Sure, it is [SEG]."
    assert np.array_equal(reply.segmentation.mask, expected)
    assert conversation.memory is not None and np.array_equal(conversation.memory.mask, expected)
    assert [t.text for t in conversation.turns] == [text, "Sure, it is [SEG]."]

    spy = Spy()  # the follow-up shows the original MLLM the image beside LISA's overlay (LensAgent's path)
    original, system.backbone = system.backbone, spy
    try:
        reply = system(conversation, "what colour is it?", intent="follow_up")
    finally:
        system.backbone = original
    assert reply.intent == "follow_up" and reply.text == "spy answer"
    assert spy.calls == [((2 * image.width, image.height), "what colour is it?")]


def test_oracle_intent_skips_the_router_and_routed_turns_follow_it(image):
    router = FixedRouter("segmentation")
    system = RoutedSystem(_original(), LisaPipeline(_lisa()), router=router)
    conversation = Conversation()
    conversation.add_image(image)
    reply = system(conversation, "how many rings are there?", intent="dialogue")
    assert router.calls == [] and reply.route is None and reply.intent == "dialogue"
    reply = system(conversation, "how many rings are there?")  # the router says segmentation
    assert router.calls == ["how many rings are there?"] and reply.routed == "segmentation"
    assert reply.segmentation is not None and reply.text == "Sure, it is [SEG]."


def _hand_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_memory_counts_a_shared_tensor_once():
    shared = nn.Linear(3, 4)  # 16 float32: 64 bytes
    first = nn.Sequential(shared, nn.BatchNorm1d(4))  # + 8 + 8 float32, one int64: 72 bytes
    second = nn.Sequential(shared, nn.Linear(4, 2, bias=False).half())  # + 8 float16: 16 bytes
    tied = nn.Linear(4, 2, bias=False).half()
    tied.weight = second[1].weight  # the same tensor under another module
    assert tensor_bytes([first]) == 64 + 72
    assert tensor_bytes([first, second, tied]) == 64 + 72 + 16
    hand = _hand_bytes([*first.parameters(), *first.buffers(), second[1].weight])
    assert tensor_bytes([first, second, tied]) == hand
    view = nn.Module()
    view.register_buffer("alias", shared.weight.data)  # another tensor object on the same memory
    assert tensor_bytes([shared, view]) == tensor_bytes([shared])
    parts = deployment_bytes({"a": [first], "b": [second]})
    assert parts == {"total_bytes": 152, "parts": {"a": 136, "b": 16}}


def test_memory_report_of_the_three_deployments(system):
    lens = make_lens(build_tiny_models(seed=0))
    lisa = system.pipeline.model
    report = memory_report(lens, system)

    def every(module):
        return _hand_bytes([*module.parameters(), *module.buffers()])

    assert report["lens"]["total_bytes"] == every(lens)
    assert report["lisa"]["total_bytes"] == every(lisa)
    assert report["routed_lisa"]["total_bytes"] == every(system.backbone) + every(lisa)  # nothing shared
    assert report["routed_lisa"]["parts"]["original_mllm"] == every(system.backbone)
    assert sum(report["lisa"]["parts"].values()) == report["lisa"]["total_bytes"]
    assert report["lisa"]["parts"]["projection"] == every(lisa.projection)
    # What the original MLLM shares with the fine-tuned one: all but the (resized) embeddings and LM head.
    model = system.backbone.model
    unshared = every(model.get_input_embeddings()) + every(model.get_output_embeddings())
    assert shared_frozen_bytes(model, lisa.backbone.model) == every(model) - unshared
    assert report["routed_lisa"]["original_mllm_equal_to_fine_tuned_bytes"] == every(model) - unshared


def test_score_turns_on_two_scenes(system):
    scenes = SyntheticWorld(seed=0, height=64, width=64).split("test")[:2]
    result = score_turns(system, scenes)
    assert result["num_scenes"] == 2 and not result["oracle"]
    assert set(result["router"]["by_intent"]) == {"dialogue", "segmentation", "follow_up"}
    assert sum(sum(c.values()) for c in result["router"]["confusion"].values()) == 6
    for value in (
        result["router"]["accuracy"],
        *result["router"]["by_intent"].values(),
        result["dialogue"]["vqa_exact_match"],
        result["dialogue"]["segmentation_style_fraction"],
        result["segmentation"]["giou"],
        result["follow_up"]["exact_match"],
    ):
        assert 0.0 <= value <= 1.0
    assert result["dialogue"]["num_turns"] == result["segmentation"]["num_turns"] == 2

    oracle = score_turns(system, scenes, oracle=True, follow_up=False, held_out=True)
    assert oracle["router"]["accuracy"] == 1.0 and oracle["follow_up"]["num_turns"] == 0
    assert oracle["dialogue"]["segmentation_style_fraction"] == 0.0  # dialogue reached the original MLLM
    assert oracle["segmentation"]["giou"] > 0.0  # LISA's (random) masks overlap the targets somewhat
    assert math.isnan(oracle["follow_up"]["exact_match"])


def test_score_turns_drives_lens_agent_too():
    agent = LensAgent(LensPipeline(make_lens(build_tiny_models(seed=0)).eval()))
    scene = SyntheticWorld(seed=0, height=64, width=64).split("test")[:1]
    result = score_turns(agent, scene, oracle=True, follow_up=False)
    assert result["segmentation"]["num_turns"] == 1 and result["dialogue"]["num_turns"] == 1


def test_from_checkpoint_and_memory_command(tmp_path, image):
    llava, llava_processor, sam, sam_processor = build_tiny_models(seed=0)
    for model, processor, name in ((llava, llava_processor, "llava"), (sam, sam_processor, "sam")):
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    trained = _lisa()
    config = trained.config
    config.backbone.model_id, config.decoder.model_id = str(tmp_path / "llava"), str(tmp_path / "sam")
    save_lens_weights(trained, tmp_path / "lisa")
    lens = make_lens(build_tiny_models(seed=0), backbone__dtype="float32")  # as it is loaded back
    lens.config.backbone.model_id, lens.config.decoder.model_id = (
        config.backbone.model_id,
        config.decoder.model_id,
    )
    save_lens_weights(lens, tmp_path / "lens")

    system = RoutedSystem.from_checkpoint(tmp_path / "lisa")
    original = dict(system.backbone.model.state_dict())
    assert original.keys() == llava.state_dict().keys()  # no adapters, no new tokens
    assert all(torch.equal(original[k], v) for k, v in llava.state_dict().items())
    loaded = system.pipeline.model.trainable_state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.trainable_state_dict().items())
    text = "please segment the red ring."
    reply = system(Conversation(), text, image=image, intent="segmentation")
    with torch.no_grad():
        logits = trained(trained.prepare([image], [instruction(text)])).mask_logits[0]
    assert np.array_equal(reply.segmentation.mask, (logits > 0).numpy())

    out = tmp_path / "memory.json"
    args = ["memory", "--lisa", str(tmp_path / "lisa"), "--lens", str(tmp_path / "lens"), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| routed LISA |" in result.output
    report = json.loads(out.read_text())
    expected = memory_report(lens, system)
    for name in ("lens", "routed_lisa", "lisa"):
        assert report[name]["total_bytes"] == expected[name]["total_bytes"]
