"""LISA-style and READ-style baselines: the [SEG] conversation, the fine-tuned MLLM's state against peft's own
merged transformers model, READ's clicks against SamProcessor, and training / evaluation / checkpoints through
LENS's own entry points."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from helpers import box_mask, make_lens, random_image
from lens.baselines.lisa import LisaModel
from lens.baselines.read import ReadModel, similarity_points
from lens.baselines.seg_token import IGNORE
from lens.config import LensConfig
from lens.data.loader import build_eval_dataset, build_train_datasets, train_ratios
from lens.data.synthetic.dataset import SYNTHETIC
from lens.evaluation import EvalSplit, evaluate
from lens.tiny import build_tiny_models
from lens.training import FINAL, TrainData, train
from lens.weights import CONFIG_NAME, WEIGHTS_NAME, load_lens_weights, save_lens_weights

SYSTEMS = {"lisa": LisaModel, "read": ReadModel}
TINY_WORLD = {"seed": 0, "height": 64, "width": 64, "train_size": 6, "val_size": 1}


def _system(name: str, seed: int = 0, **baseline) -> LisaModel:
    lens = make_lens(build_tiny_models(seed=0), backbone__dtype="float32")
    lens.config.baseline = dataclasses.replace(lens.config.baseline, system=name, **baseline)
    torch.manual_seed(seed)
    return SYSTEMS[name](lens.config, lens.backbone, lens.decoder)


def _perturb_adapters(model: LisaModel) -> None:
    """LoRA's B starts at zero (the adapter adds nothing); give every trainable tensor a random offset."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))


def test_conversation_appends_the_answer_after_each_prompt():
    model = _system("lisa")
    images = [random_image(40, 60), random_image(50, 50, 1)]
    texts = ["what is the red ring?", "segment the big blue square in this image please"]
    conv = model.mllm.conversation(images, texts)
    prompt = model.backbone._inputs(images, texts)
    answer = model.mllm.answer_ids
    tokenizer = model.backbone.processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(answer)[-1] == tokenizer.eos_token
    for b in range(2):
        n = int(prompt["attention_mask"][b].sum())
        ids = conv.inputs["input_ids"][b]
        assert torch.equal(ids[:n], prompt["input_ids"][b, :n])  # the prompt untouched
        assert ids[n : n + len(answer)].tolist() == answer
        assert int(conv.inputs["attention_mask"][b].sum()) == n + len(answer)
        supervised = torch.nonzero(conv.labels[b] != IGNORE).flatten().tolist()
        assert supervised == list(range(n, n + len(answer)))  # CE on the answer (and EOS) only
        assert ids[conv.seg_index[b]] == model.mllm.seg_token_id
    assert tokenizer.decode([model.mllm.seg_token_id]) == "[SEG]"  # one new token, not split


def test_seg_state_equals_peft_merged_transformers_model():
    model = _system("lisa")
    _perturb_adapters(model)
    model.eval()
    images, texts = [random_image(48, 30, 2)], ["where is the small green triangle?"]
    conv = model.mllm.conversation(images, texts)
    with torch.no_grad():
        ours = model.mllm(conv)
        merged = (
            model.mllm.merged()
        )  # peft folds B·A·alpha/r into the base weights: a plain transformers model
        assert not any("lora" in n for n, _ in merged.named_parameters())
        reference = merged(**conv.inputs, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(ours.seg_hidden[0], reference[0, conv.seg_index[0]], atol=1e-5, rtol=1e-4)
    # ... and the adapters do change the model: the base weights alone give another state
    base = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    with torch.no_grad():
        for p in base.values():
            p.zero_()
        plain = model.mllm(conv).seg_hidden
    assert not torch.allclose(plain, ours.seg_hidden, atol=1e-4)


def test_read_selects_points_as_reads_similarity_map_to_points():
    # a 3 x 4 map by hand: >= 0.8 positive (most similar first), <= 0.2 negative (least similar first); the
    # padding column (x = 3) is never a candidate, whatever its value
    similarity = torch.tensor([[0.9, 0.5, 0.1, 1.0], [0.8, 0.2, 0.95, 0.0], [0.0, 0.3, 0.6, 0.9]])
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[:, 3] = False
    points, labels = similarity_points(similarity, valid, num_points=6, positive=0.8, negative=0.2)
    expected = [((2, 1), 1), ((0, 0), 1), ((0, 1), 1), ((0, 2), 0), ((2, 0), 0), ((1, 1), 0)]
    assert [(tuple(int(v) for v in p), int(lab)) for p, lab in zip(points, labels, strict=True)] == expected
    points, labels = similarity_points(similarity, valid, num_points=2, positive=0.8, negative=0.2)
    assert labels.tolist() == [1, 1] and points.tolist() == [[2.0, 1.0], [0.0, 0.0]]


def test_read_clicks_where_sam_processor_puts_them():
    model = _system("read", read_points=3)
    _perturb_adapters(model)
    model.eval()
    image = random_image(50, 90, 3)  # wide: the MLLM pads it to a square, SAM pads bottom-right
    inputs = model.prepare([image], ["the red ring"])
    with torch.no_grad():
        out = model(inputs)
    grid = out.attention_map[0]
    valid = inputs.geometries[0].valid_cells()
    assert (
        float(grid[valid].max()) == 1.0
        and float(grid[valid].min()) == 0.0
        and float(grid[~valid].abs().sum()) == 0
    )
    peak = int(grid.flatten().argmax())
    gw = grid.shape[1]
    assert out.keypoints[0, 0].tolist() == [peak % gw, peak // gw]  # the most similar cell clicks first
    centre = inputs.geometries[0].grid_to_image(out.keypoints[0, :1].float())[0]
    expected = model.decoder.processor(
        images=[image],
        input_points=[[[[float(centre[0]) - 0.5, float(centre[1]) - 0.5]]]],
        return_tensors="pt",
    )["input_points"][0, 0, 0]
    clicks = inputs.geometries[0].decoder.image_to_decoder(centre - 0.5)
    torch.testing.assert_close(clicks, expected.float(), atol=1e-4, rtol=0)


def test_read_adds_the_peaks_to_lisas_prompt():
    lisa, read = _system("lisa"), _system("read")
    read.load_state_dict(lisa.state_dict())
    for m in (lisa, read):
        _perturb_adapters(m)
        m.eval()
    images, texts = [random_image(40, 40, 4)], ["the blue square"]
    with torch.no_grad():
        a, b = lisa(lisa.prepare(images, texts)), read(read.prepare(images, texts))
    torch.testing.assert_close(a.attention_map, b.attention_map)  # the same fine-tuned MLLM ...
    assert a.keypoints.shape[1] == 0 and 1 <= b.keypoints_valid.sum() <= read.config.baseline.read_points
    assert not torch.allclose(a.low_res_logits, b.low_res_logits)  # ... but READ's clicks change SAM's mask


def _config(name: str) -> LensConfig:
    config = LensConfig()
    config.backbone.dtype = "float32"
    config.baseline.system = name
    config.data.datasets = {"synthetic": dict(TINY_WORLD)}
    config.data.num_workers = 0
    config.data.num_classes_per_sample = 2
    config.train = dataclasses.replace(
        config.train, lr=1e-3, warmup_steps=1, max_steps=3, batch_size=1, grad_accum_steps=1,
        save_every=100, eval_every=0, eval_limit=2, keep_checkpoints=1,
    )  # fmt: skip
    return config


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lisa", "read"])
def test_trains_evaluates_and_reloads_through_lens_entry_points(tmp_path, name):
    config = _config(name)
    model = _system(name)
    model.config = config
    train_sets = build_train_datasets(config.data, config.train.seed)
    val = EvalSplit(SYNTHETIC, "val", build_eval_dataset(config.data, SYNTHETIC, "val"))
    before = {n: t.clone() for n, t in model.trainable_state_dict().items()}
    records = train(
        config,
        tmp_path / "run",
        model=model,
        data=TrainData(dict(train_sets), train_ratios(config.data), val),
    )
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"ce_loss", "dice_loss", "bce_loss"} <= set(records[0]) and "val_giou" in records[-1]
    after = model.trainable_state_dict()
    lora = [n for n in after if "lora_B" in n]
    assert lora and all(not torch.equal(before[n], after[n]) for n in lora)  # the MLLM itself trained
    results = evaluate(model.eval(), [val], tmp_path / "eval", batch_size=2, method=name)
    assert 0.0 <= results["splits"]["synthetic/val"]["overall"]["giou"] <= 1.0

    fresh = _system(name, seed=5)  # another initialisation of every trainable part
    load_lens_weights(fresh, tmp_path / "run" / FINAL)
    fresh.eval()
    image, text = random_image(64, 64, 7), "the red ring"
    with torch.no_grad():
        a, b = model(model.prepare([image], [text])), fresh(fresh.prepare([image], [text]))
    torch.testing.assert_close(a.mask_logits[0], b.mask_logits[0])
    saved = load_file(str(save_lens_weights(fresh, tmp_path / "again") / WEIGHTS_NAME))
    assert sorted(saved) == sorted(fresh.trainable_names())  # exactly what trains, no frozen MLLM weight
    assert LensConfig.from_yaml(tmp_path / "again" / CONFIG_NAME).baseline.system == name


def test_box_mask_targets_give_the_mask_and_answer_losses():
    model = _system("lisa")
    images = [random_image(40, 60), random_image(50, 50, 1)]
    masks = [box_mask(40, 60, 5, 5, 20, 20), box_mask(50, 50, 1, 1, 30, 30)]
    out = model(model.prepare(images, ["the red ring", "the blue square"], masks))
    weights = model.config.loss
    expected = (
        weights.dice_weight * out.losses["dice_loss"]
        + weights.bce_weight * out.losses["bce_loss"]
        + model.config.baseline.ce_weight * out.losses["ce_loss"]
    )
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    trainable = dict(model.named_parameters())
    assert all(
        trainable[n].grad is not None for n in model.trainable_names()
    )  # every trainable tensor learns
    assert not model.decoder.cls_position.requires_grad  # LENS's own [CLS] position is not part of LISA
