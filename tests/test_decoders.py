"""The decoder contract and SamDecoder, against SAM's own forward (transformers' ``SamModel``)."""

from __future__ import annotations

import pytest
import torch

from conftest import random_image
from lens.config import DecoderConfig
from lens.decoders import DECODERS, MaskDecoderBridge, SamDecoder, load_decoder
from lens.geometry import DecoderFrame
from lens.tiny import build_sam


@pytest.fixture
def decoder() -> SamDecoder:
    sam, processor = build_sam(seed=0)
    return SamDecoder(sam, processor).eval()


def _prompts(decoder: SamDecoder, B: int = 2, m: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    points = torch.rand(B, m, 2, generator=gen) * (decoder.image_size - 1)  # SAM input pixels (integer grid)
    labels = torch.randint(0, 2, (B, m), generator=gen)
    embeddings = decoder.embed_images([random_image(40, 60, 0), random_image(50, 30, 1)][:B])
    return embeddings, points, labels


def _as_descriptions(decoder: SamDecoder, labels: torch.Tensor) -> torch.Tensor:
    """Descriptions that make LENS's prompts SAM's own: keypoint i described by SAM's label embedding, and the
    global slot (plus its [CLS] position) equal to the padding point SAM appends when no box is given."""
    encoder = decoder.sam.prompt_encoder
    label_embeddings = torch.stack([encoder.point_embed[0].weight[0], encoder.point_embed[1].weight[0]])
    keypoints = label_embeddings[labels]  # (B, m, d_s)
    padding = encoder.not_a_point_embed.weight - decoder.cls_position  # (1, d_s)
    return torch.cat([padding.expand(labels.shape[0], 1, -1), keypoints], 1)


@torch.no_grad()
def test_equals_sams_own_forward_on_the_same_prompts(decoder):
    embeddings, points, labels = _prompts(decoder)
    descriptions = _as_descriptions(decoder, labels)
    valid = torch.ones_like(labels, dtype=torch.bool)
    # LENS points are continuous (pixel centres at +0.5); SAM shifts its integer pixel indices by 0.5 itself.
    low_res, iou = decoder(embeddings, descriptions, points + 0.5, valid)
    expected = decoder.sam(
        image_embeddings=embeddings,
        input_points=points[:, None],
        input_labels=labels[:, None],
        multimask_output=False,
    )
    torch.testing.assert_close(low_res, expected.pred_masks[:, 0, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(iou, expected.iou_scores[:, 0, 0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_invalid_keypoints_are_sams_padding_points_whatever_they_hold(decoder):
    """An invalid slot is SAM's "not a point" (label -1): its description and position have no effect."""
    embeddings, points, labels = _prompts(decoder, seed=1)
    descriptions = _as_descriptions(decoder, labels)
    valid = torch.tensor([[True, False, True], [False, False, True]])
    low_res, iou = decoder(embeddings, descriptions, points + 0.5, valid)
    garbage = descriptions.clone()
    garbage[:, 1:][~valid] = 1e3 * torch.randn(int((~valid).sum()), descriptions.shape[-1])
    moved = points.clone()
    moved[~valid] = 0.0
    again, iou_again = decoder(embeddings, garbage, moved + 0.5, valid)
    torch.testing.assert_close(again, low_res, rtol=0, atol=0)
    torch.testing.assert_close(iou_again, iou, rtol=0, atol=0)
    expected = decoder.sam(
        image_embeddings=embeddings,
        input_points=points[:, None],
        input_labels=torch.where(valid, labels, -1)[:, None],
        multimask_output=False,
    )
    torch.testing.assert_close(low_res, expected.pred_masks[:, 0, 0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_keypoint_order_does_not_matter(decoder):
    embeddings, points, labels = _prompts(decoder, m=4, seed=2)
    descriptions = torch.randn(2, 5, decoder.prompt_dim, generator=torch.Generator().manual_seed(3))
    valid = torch.tensor([[True, True, False, True], [True, False, True, True]])
    low_res, iou = decoder(embeddings, descriptions, points, valid)
    order = torch.tensor([2, 0, 3, 1])
    permuted = torch.cat([descriptions[:, :1], descriptions[:, 1:][:, order]], 1)
    again, iou_again = decoder(embeddings, permuted, points[:, order], valid[:, order])
    torch.testing.assert_close(again, low_res, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(iou_again, iou, rtol=1e-5, atol=1e-5)


def test_contract_members(decoder, tmp_path):
    assert DECODERS["sam"] is SamDecoder and issubclass(SamDecoder, MaskDecoderBridge)
    assert decoder.frame(200, 100) == DecoderFrame.longest_side(200, 100, decoder.image_size)
    embeddings = decoder.embed_images([random_image(40, 60, 0), random_image(50, 30, 1)])
    assert torch.equal(decoder.select(embeddings, torch.tensor([1, 1, 0]))[2], embeddings[0])
    names = decoder.trainable_names()
    assert "cls_position" in names and not any("iou_prediction_head" in n for n in names)
    assert not any(n.startswith(("sam.vision_encoder.", "sam.prompt_encoder.")) for n in names)
    frozen = SamDecoder(*build_sam(seed=0), train_mask_decoder=False)
    assert frozen.trainable_names() == ["cls_position"]
    sam, processor = build_sam(seed=0)
    sam.save_pretrained(tmp_path / "sam")
    processor.save_pretrained(tmp_path / "sam")
    loaded = load_decoder(DecoderConfig(model_id=str(tmp_path / "sam")))
    assert isinstance(loaded, SamDecoder)
    with pytest.raises(ValueError, match="unknown decoder 'nope'"):
        load_decoder(DecoderConfig(name="nope"))
