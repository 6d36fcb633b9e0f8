"""Instruction skills of the world's MLLM: boxes, intent, follow-ups, vocabulary growth and their scoring."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration
from typer.testing import CliRunner

import lens.world.skills as skills
from lens.agent.router import RouterPrompt
from lens.data.synthetic import SyntheticWorld, tokenize_words, world_vocabulary
from lens.data.templates import LONG_QUESTION_TEMPLATES, SHORT_QUESTION_TEMPLATES
from lens.tiny import TinyLlavaSpec, build_llava
from lens.visualize import MASK_COLOUR
from lens.world.mllm import MllmTrainConfig, app, grow_vocabulary, train_mllm
from lens.world.skills import (
    FOLLOW_UP_FRAMES,
    REQUEST_FRAMES_HELD_OUT,
    SKILLS,
    box_identify_items,
    box_iou,
    box_items,
    box_of,
    box_text,
    evaluate_skills,
    follow_up_items,
    intent_items,
    parse_box,
    skill_items,
    skill_vocabulary,
)
from lens.world.vqa import IGNORE_LABEL, PromptParts, batch_loss, make_batch

TINY = MllmTrainConfig(
    vision_steps=0,
    steps=3,
    scenes_per_step=2,
    questions_per_scene=8,
    lr=3e-3,
    warmup_steps=1,
    log_every=3,
    eval_scenes=1,
    skill_eval_scenes=1,
    router_eval_scenes=1,
    spec=TinyLlavaSpec(),
)


@pytest.fixture(scope="module")
def scenes():
    return SyntheticWorld(seed=0).split("train")[:6]


def test_box_text_round_trips_hand_values():
    mask = np.zeros((10, 20), bool)
    mask[1:4, 2:6] = True  # rows 1..3, columns 2..5: pixel edges x 2..6 of 20, y 1..4 of 10
    assert box_of(mask) == (0.1, 0.1, 0.3, 0.4)
    assert box_text(box_of(mask)) == "[0.10, 0.10, 0.30, 0.40]"
    assert box_text((0.123, 0.5, 1.0, 0.05)) == "[0.12, 0.50, 1.00, 0.05]"
    # the word tokenizer's decoding puts spaces around every piece
    assert parse_box("[ 0 . 12 , 0 . 50 , 1 . 00 , 0 . 05 ]") == (0.12, 0.5, 1.0, 0.05)
    assert parse_box("[ 0 . 12 , 0 . 50 , 1 . 00 ]") is None and parse_box("large red ring") is None
    with pytest.raises(ValueError, match="empty"):
        box_of(np.zeros((4, 4), bool))


def test_box_iou_hand_values():
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)  # overlap 1, union 4 + 4 - 1
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou(None, (0, 0, 1, 1)) == 0.0
    assert box_iou((0.5, 0.5, 0.2, 0.9), (0, 0, 1, 1)) == 0.0  # x2 < x1: not a box


def test_box_answers_are_the_targets_boxes(scenes):
    rng = np.random.default_rng(0)
    for scene in scenes:
        height, width = scene.image.shape[:2]
        boxes = {}
        for obj in scene.objects:  # independent: the mask's bounding rows and columns
            rows, cols = np.any(obj.mask, 1), np.any(obj.mask, 0)
            if rows.any():
                y = np.flatnonzero(rows)
                x = np.flatnonzero(cols)
                edges = (x[0] / width, y[0] / height, (x[-1] + 1) / width, (y[-1] + 1) / height)
                boxes[" ".join(f"{v:.2f}" for v in edges)] = obj
        for item in box_items(scene, rng):
            assert " ".join(f"{v:.2f}" for v in parse_box(item.qa.answer)) in boxes
        identify = box_identify_items(scene, rng)
        assert len(identify) == len(boxes)
        for item in identify:
            obj = boxes[" ".join(f"{v:.2f}" for v in parse_box(item.qa.question))]
            assert item.qa.answer == f"{obj.size} {obj.colour} {obj.shape}"


def test_box_query_boxes_cover_the_query_target(scenes):
    """Each box question's answer is the box of the query's own target (from segmentation_queries)."""
    scene = scenes[0]
    queries = [q for q in scene.segmentation_queries() if q.target is not None and not q.sample.is_sentence]
    items = box_items(scene, np.random.default_rng(0))
    assert len(items) == len(queries)
    for query, item in zip(queries, items, strict=True):
        assert query.sample.query in item.qa.question
        assert item.qa.answer == box_text(box_of(query.target.mask))


def test_intent_items_are_the_routers_prompt(scenes):
    prompt = RouterPrompt()
    budget = 96
    labels = set(prompt.labels.values())
    for scene in scenes:
        for item in intent_items(scene, np.random.default_rng(1), budget):
            assert item.qa.answer == prompt.labels[item.detail] and item.qa.answer in labels
            turn = item.qa.question.rsplit("request: ", 1)[1].removesuffix(" kind:")
            assert item.qa.question in {prompt.render(turn, shots) for shots in range(4)}
            assert len(tokenize_words(item.qa.question)) + 1 <= budget


def test_held_out_turns_use_the_held_out_phrasing(scenes):
    scene = scenes[0]
    held = {qa.question for qa in scene.vqa("held_out")}
    turns = [
        t
        for t, intent in skills.intent_turns(scene, np.random.default_rng(0), 50, True)
        if intent == "dialogue"
    ]
    assert turns and set(turns) <= held and held != {qa.question for qa in scene.vqa()}


def test_held_out_frames_never_reach_training(scenes):
    held_follow = {f for _, held in FOLLOW_UP_FRAMES.values() for f in held}
    held_requests = [f.split("{q}")[0] for f in REQUEST_FRAMES_HELD_OUT]
    seen = [item.qa.question for s in scenes for item in skill_items(s, SKILLS, np.random.default_rng(2), 96)]
    assert not any(f in q for q in seen for f in held_follow)
    assert not any(f"request: {frame}" in q for q in seen for frame in held_requests)
    held = [
        it.qa.question for s in scenes for it in intent_items(s, np.random.default_rng(2), 96, held_out=True)
    ]
    assert any(f"request: {frame}" in q for q in held for frame in held_requests)  # the eval does use them


def test_follow_up_image_highlights_the_answered_object(scenes):
    scene = scenes[1]
    items = follow_up_items(scene, np.random.default_rng(3))
    image = items[0].image
    height, width = scene.image.shape[:2]
    assert image.shape == (height, 2 * width, 3) and all(it.image is image for it in items)
    np.testing.assert_array_equal(image[:, :width], scene.image)  # the original on the left
    changed = np.any(image[:, width:] != scene.image, axis=-1)  # the overlay on the right
    answers = {it.detail: it.qa.answer for it in items}
    (obj,) = [o for o in scene.objects if o.mask.any() and np.array_equal(o.mask & changed, changed)]
    assert answers["colour"] == obj.colour and answers["shape"] == obj.shape and answers["size"] == obj.size
    assert answers["name"] == f"{obj.size} {obj.colour} {obj.shape}"
    # half-way blend toward the mask colour (overlay_mask's alpha 0.5), by hand on one masked pixel
    y, x = np.argwhere(obj.mask)[0]
    expected = np.round(0.5 * scene.image[y, x].astype(float) + 0.5 * np.array(MASK_COLOUR))
    np.testing.assert_array_equal(image[y, width + x], expected.astype(np.uint8))


def test_vocabulary_covers_every_skill_text_and_the_prompts(scenes):
    vocab = set(skill_vocabulary())
    assert set(world_vocabulary()) <= vocab
    prompt = RouterPrompt()
    texts = [
        prompt.instruction,
        prompt.turn_format.format(text=""),
        prompt.content_free,
        *(t for t, _ in prompt.examples),
    ]
    texts += [t.replace("{class_name}", "").replace("{sent}", "") for t in SHORT_QUESTION_TEMPLATES]
    texts += [t.replace("{sent}", "") for t in LONG_QUESTION_TEMPLATES]
    rng = np.random.default_rng(4)
    for scene in scenes:
        for item in skill_items(scene, SKILLS, rng, 96) + intent_items(scene, rng, 96, held_out=True):
            texts += [item.qa.question, item.qa.answer]
        texts += [it.qa.question for it in follow_up_items(scene, rng, held_out=True)]
    missing = {t for text in texts for t in tokenize_words(text.lower()) if t not in vocab}
    assert not missing
    assert {"output", "segmentation", "mask", "00", "99", "[", "]"} <= vocab


def test_grown_vocabulary_keeps_old_ids_and_logits(tmp_path, scenes):
    model, processor = build_llava(world_vocabulary(), TinyLlavaSpec(), seed=0)
    old_vocab = dict(processor.tokenizer.get_vocab())
    text = "what colour is the large red ring? describe the image."
    ids = processor.tokenizer(text).input_ids
    inputs = processor(images=[scenes[0].image], text=["user: <image>\n" + text], return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits  # (1, L, V_old)
    added = grow_vocabulary(model, processor, skill_vocabulary())
    assert added and not set(added) & set(old_vocab)
    tokenizer = processor.tokenizer
    assert {w: tokenizer.get_vocab()[w] for w in old_vocab} == old_vocab
    assert tokenizer(text).input_ids == ids
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == len(old_vocab) + len(added)
    with torch.no_grad():
        after = model(
            **processor(images=[scenes[0].image], text=["user: <image>\n" + text], return_tensors="pt")
        ).logits
    assert torch.equal(after[..., : before.shape[-1]], before)  # bit for bit
    unk = tokenizer.unk_token_id
    box = tokenizer("please output segmentation mask. [0.12, 0.30, 1.00, 0.05]").input_ids
    assert unk not in box and all(i >= len(old_vocab) for i in tokenizer(" ".join(added)).input_ids[1:])
    # new rows start at the old rows' mean (covariance of 181 rows in 64 dims is PD: HF samples around it)
    old_rows = model.get_input_embeddings().weight[: len(old_vocab)]
    new_rows = model.get_input_embeddings().weight[len(old_vocab) :]
    assert (new_rows.mean(0) - old_rows.mean(0)).norm() < old_rows.std(0).norm()
    assert grow_vocabulary(model, processor, skill_vocabulary()) == []  # nothing left to add
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path).tokenizer
    assert reloaded.get_vocab() == tokenizer.get_vocab()


def test_mixed_batch_loss_equals_full_sequence_loss(scenes):
    """Skills in a batch (follow-up images as their own rows) keep the shared-prefix loss exact."""
    model, processor = build_llava(skill_vocabulary(), TinyLlavaSpec(), seed=0)
    batch = make_batch(
        scenes[:2], processor, PromptParts.of(processor), 40, np.random.default_rng(0), (), {}, SKILLS, 96
    )
    kinds = {k for g in batch.groups for k in g.kinds}
    assert set(SKILLS) <= kinds
    rows = torch.cat([g.rows for g in batch.groups])
    assert batch.prefix["input_ids"].shape[0] == 4 and set(rows.tolist()) == {
        0,
        1,
        2,
        3,
    }  # 2 scenes + 2 follow-ups
    follow = [g for g in batch.groups if g.kinds[0] == "follow_up"][0]
    assert set(follow.rows.tolist()) == {2, 3}
    with torch.no_grad():
        loss, _ = batch_loss(model, batch)
    total, count = 0.0, 0
    prefix = batch.prefix["input_ids"]
    with torch.no_grad():
        for group in batch.groups:
            for r in range(len(group.rows)):
                row = int(group.rows[r])
                real = group.attention_mask[r].bool()
                out = model(
                    input_ids=torch.cat([prefix[row], group.input_ids[r][real]])[None],
                    pixel_values=batch.prefix["pixel_values"][row : row + 1],
                    labels=torch.cat([torch.full_like(prefix[row], IGNORE_LABEL), group.labels[r][real]])[
                        None
                    ],
                )
                n = int((group.labels[r][real][1:] != IGNORE_LABEL).sum())
                total += float(out.loss) * n
                count += n
    assert float(loss) == pytest.approx(total / count, rel=1e-4)


def test_skill_weights_shift_the_draw(scenes):
    model, processor = build_llava(skill_vocabulary(), TinyLlavaSpec(), seed=0)
    parts = PromptParts.of(processor)

    def drawn(**weights: float) -> int:
        batch = make_batch(scenes, processor, parts, 8, np.random.default_rng(5), (), weights, ("box",), 96)
        return sum(k == "box" for g in batch.groups for k in g.kinds)

    # Weight 1e6 draws every box question a scene has, up to its 8 questions; 1e-6 none.
    most = sum(min(8, len(box_items(s, np.random.default_rng(0)))) for s in scenes)
    assert drawn(box=1e6) == most and drawn(box=1e-6) == 0 and 1 < drawn() < most


def test_bad_skill_and_phrasing_are_usage_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown skills \['bxo'\]"):
        MllmTrainConfig(skills=("bxo",))
    with pytest.raises(ValueError, match="unknown question kinds"):
        MllmTrainConfig(kind_weights={"box": 2.0})  # a skill's weight needs the skill on
    assert MllmTrainConfig(skills=("box",), kind_weights={"box": 2.0}).kind_weights == {"box": 2.0}
    result = CliRunner().invoke(app, ["--out", str(tmp_path / "out"), "--skill", "bxo"])
    assert result.exit_code == 2 and "bxo" in result.output
    with pytest.raises(ValueError, match="held_out"):
        MllmTrainConfig(phrasing="held_out")  # never trained on: the held-out pools are for evaluation
    result = CliRunner().invoke(app, ["--out", str(tmp_path / "out"), "--phrasing", "fancy"])
    assert result.exit_code == 2 and "fancy" in result.output
    assert not (tmp_path / "out").exists()


def test_scores_are_one_for_right_answers_and_zero_for_wrong(monkeypatch, scenes):
    model, processor = build_llava(skill_vocabulary(), TinyLlavaSpec(), seed=0)
    test = scenes[:2]
    truth: dict[tuple[bytes, str], str] = {}  # (image, question) -> answer: questions recur across scenes
    rng = np.random.default_rng([0, 7])  # evaluate_skills' own draws, replayed
    for scene in test:
        for items in (
            box_items(scene, rng),
            box_identify_items(scene, rng),
            intent_items(scene, rng, skills.router_budget(model)),
            intent_items(scene, rng, skills.router_budget(model), held_out=True),
            follow_up_items(scene, rng),
            follow_up_items(scene, rng, held_out=True),
        ):
            image = scene.image if not items or items[0].image is None else items[0].image
            truth.update({(image.tobytes(), it.qa.question): it.qa.answer for it in items})

    def spaced(answer: str) -> str:  # how the word tokenizer decodes
        return " ".join(tokenize_words(answer))

    monkeypatch.setattr(
        skills, "_generate", lambda m, p, pairs, b, t: [spaced(truth[im.tobytes(), q]) for im, q in pairs]
    )
    right = evaluate_skills(model, processor, test)
    assert right["box"]["mean_iou"] == pytest.approx(1.0) and right["box"]["acc_at_0.5"] == 1.0
    assert right["box_identify"]["exact_match"] == 1.0
    for name in ("intent", "intent_heldout", "follow_up", "follow_up_heldout"):
        assert right[name]["accuracy"] == 1.0, name
    assert set(right["intent"]["by_kind"]) == {"dialogue", "segmentation", "follow_up"}
    assert "colour" in right["follow_up"]["by_kind"]
    monkeypatch.setattr(skills, "_generate", lambda m, p, pairs, b, t: ["two"] * len(pairs))
    wrong = evaluate_skills(model, processor, test)
    assert wrong["box"]["mean_iou"] == 0.0 and wrong["box_identify"]["exact_match"] == 0.0
    assert wrong["intent"]["by_kind"] == {"dialogue": 0.0, "segmentation": 1.0, "follow_up": 0.0}


def test_tiny_run_with_every_skill_grows_and_scores(tmp_path):
    """A fresh tiny run, then one continuing it with skills: vocabulary grown, skills_test written."""
    base = tmp_path / "base"
    plain = train_mllm(TINY, base)
    assert "skills_test" not in plain
    old = AutoProcessor.from_pretrained(base).tokenizer.get_vocab()
    cfg = dataclasses.replace(
        TINY, init_from=str(base), skills=SKILLS, kind_weights={"intent": 2.0}, phrasing="varied"
    )
    metrics = train_mllm(cfg, tmp_path / "skills")
    tokenizer = AutoProcessor.from_pretrained(tmp_path / "skills").tokenizer
    assert {w: tokenizer.get_vocab()[w] for w in old} == old and len(tokenizer) > len(old)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "skills")
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    saved = json.loads((tmp_path / "skills" / "metrics.json").read_text())
    scored = saved["skills_test"]
    assert scored == metrics["skills_test"]
    assert 0.0 <= scored["box"]["mean_iou"] <= 1.0 and scored["box"]["num_questions"] > 0
    assert set(scored["intent_router"]) == {"seen", "heldout"}
    assert scored["intent_router"]["seen"]["num_questions"] == 6  # 2 turns of each intent, one scene
    assert saved["config"]["skills"] == list(SKILLS) and saved["config"]["phrasing"] == "varied"
    assert set(world_vocabulary(version=2)) <= set(tokenizer.get_vocab())


def test_evaluate_command_scores_a_checkpoint(tmp_path):
    model, processor = build_llava(skill_vocabulary(), TinyLlavaSpec(), seed=0)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    out = tmp_path / "skills.json"
    result = CliRunner().invoke(
        skills.app,
        ["evaluate", str(tmp_path / "m"), "--scenes", "1", "--router-scenes", "1", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["num_scenes"] == 1 and "intent_router" in metrics


def test_router_scores_on_an_image(scenes):
    """The Router evaluation runs the agent's own class on the world's image."""
    model, processor = build_llava(skill_vocabulary(), TinyLlavaSpec(), seed=0)
    routed = skills._route(model, processor, scenes[:1], skills.router_budget(model), 0)
    assert routed["seen"]["num_questions"] == 6
    assert set(routed["heldout"]["by_kind"]) == {"dialogue", "segmentation", "follow_up"}


def test_vqa_is_scored_in_the_phrasing_asked(monkeypatch, scenes):
    """``evaluate_vqa(phrasing=...)`` asks that wording's questions; answers are the same in every phrasing."""
    from lens.world import vqa

    asked: dict[str, list[str]] = {}
    model, processor = build_llava(skill_vocabulary(), TinyLlavaSpec(), seed=0)
    truth = {qa.question: qa.answer for p in ("canonical", "held_out") for qa in scenes[0].vqa(p)}
    for phrasing in ("canonical", "held_out"):

        def answer(m, p, pairs, b, t, phrasing=phrasing):
            asked[phrasing] = [q for _, q in pairs]
            return [" ".join(tokenize_words(truth[q])) for q in asked[phrasing]]

        monkeypatch.setattr(vqa, "answer_questions", answer)
        result = vqa.evaluate_vqa(model, processor, scenes[:1], phrasing=phrasing)
        assert result["overall"] == 1.0
    assert len(asked["canonical"]) == len(asked["held_out"])
    assert sorted(asked["canonical"]) == sorted(qa.question for qa in scenes[0].vqa("canonical"))
    assert set(asked["canonical"]) != set(asked["held_out"])
