"""The LISA-style baseline (Lai et al. 2024): the MLLM fine-tuned to answer with ``[SEG]``, whose state prompts SAM.

The MLLM learns (``lens.baselines.seg_token``: LoRA, embeddings, LM head) to reply "Sure, it is [SEG]." to a
segmentation request; LISA's ``text_hidden_fcs`` (an MLP) projects the last layer's state at ``[SEG]`` to one
sparse prompt embedding of SAM's mask decoder, which trains too, with SAM's no-mask dense prompt. Loss: the
answer's cross-entropy (``baseline.ce_weight``) plus LENS's own Dice + BCE on the mask. As LISA validates, the
answer is teacher-forced at evaluation, so a mask is always decoded from the ``[SEG]`` state.

    lens train configs/synthetic.yaml --set baseline.system=lisa --output-dir runs/lisa
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from lens.backbone import LlavaBackbone, unique_images
from lens.baselines.common import mask_losses, requires_grad_names, sam_decode
from lens.baselines.seg_token import Conversation, SegPromptProjection, SegTokenMLLM, SegTokenOutput
from lens.config import LensConfig
from lens.decoders import MaskDecoderBridge
from lens.geometry import ImageGeometry
from lens.model import LensInputs, LensOutput, mask_targets, trainable_tensors


@dataclass
class SegTokenInputs(LensInputs):
    """A batch after the frozen work (SAM's image encoder) and tokenization; the MLLM runs in ``forward``."""

    conversation: Conversation | None = None
    geometries: list[ImageGeometry] | None = None  # per prompt: its MLLM grid and SAM frame


class LisaModel(nn.Module):
    """Fine-tuned MLLM → ``[SEG]`` state → MLP → SAM's mask decoder (one sparse prompt)."""

    loss_names = ("loss", "ce_loss", "dice_loss", "bce_loss")

    def __init__(self, config: LensConfig, backbone: LlavaBackbone, decoder: MaskDecoderBridge):
        super().__init__()
        if not isinstance(backbone, LlavaBackbone):
            raise ValueError(
                f"the {config.baseline.system} baseline fine-tunes LLaVA; got {type(backbone).__name__}"
            )
        self.config, self.backbone, self.decoder = config, backbone, decoder
        self.mllm = SegTokenMLLM(backbone, config.baseline)  # changes backbone.model in place
        self.projection = SegPromptProjection(self.mllm.hidden_size, decoder.prompt_dim)
        decoder.cls_position.requires_grad_(False)  # LENS's [CLS] position: not part of LISA

    @property
    def device(self) -> torch.device:
        return self.mllm.device

    def trainable_names(self) -> list[str]:
        return requires_grad_names(self)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return trainable_tensors(self, self.trainable_names())

    def prepare(
        self,
        images: Sequence[Image.Image],
        instructions: Sequence[str],
        masks: Sequence[np.ndarray | Tensor] | None = None,
    ) -> SegTokenInputs:
        """SAM's image embedding once per image, and the conversations tokenized (the MLLM trains: it runs in
        ``forward``). Outside inference mode, like ``LensModel.prepare``: what it returns enters autograd."""
        distinct, index = unique_images(images)
        embeddings = self.decoder.select(self.decoder.embed_images(distinct), index)
        geometries = [
            ImageGeometry(
                self.backbone.grid_frame(im.width, im.height), self.decoder.frame(im.width, im.height)
            )
            for im in images
        ]
        targets = mask_targets(masks)
        conversation = self.mllm.conversation(images, instructions)
        return SegTokenInputs(None, embeddings, targets, conversation, geometries)  # type: ignore[arg-type]

    def seg_map(self, out: SegTokenOutput, conversation: Conversation, valid: Tensor) -> Tensor:
        """(B, gh, gw) READ's similarity map: the dot product of ``[SEG]``'s state with each image token's,
        min-max normalised over the cells on the image (``valid``, (B, gh, gw) bool) to [0, 1], zero elsewhere."""
        gh, gw = self.backbone.grid_size
        rows = torch.arange(len(out.hidden_states), device=out.hidden_states.device)
        image = out.hidden_states[rows[:, None], conversation.image_positions]  # (B, N, d)
        similarity = (image @ out.seg_hidden[:, :, None])[..., 0].view(-1, gh, gw).float()  # (B, gh, gw)
        low = torch.where(valid, similarity, torch.inf).amin((1, 2), keepdim=True)
        high = torch.where(valid, similarity, -torch.inf).amax((1, 2), keepdim=True)
        normalised = (similarity - low) / (high - low).clamp(min=1e-12)
        return torch.where(valid, normalised, torch.zeros_like(normalised))

    def decode(
        self, inputs: SegTokenInputs, out: SegTokenOutput, grid_map: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Low-res logits (B, h, w), IoU (B,), points (B, m, 2) and their validity (B, m): one prompt, no points."""
        prompt = self.projection(out.seg_hidden)  # (B, d_s)
        embeddings = self.decoder.move(inputs.decoder_embeddings, self.device)
        low_res, iou = sam_decode(self.decoder, embeddings, prompt[:, None])
        B = len(prompt)
        return (
            low_res,
            iou,
            prompt.new_zeros(B, 0, 2),
            torch.zeros(B, 0, dtype=torch.bool, device=self.device),
        )

    def forward(self, inputs: SegTokenInputs) -> LensOutput:
        conversation = inputs.conversation.to(self.device)
        out = self.mllm(conversation)
        valid = torch.stack([g.valid_cells(self.device) for g in inputs.geometries])  # (B, gh, gw)
        grid_map = self.seg_map(out, conversation, valid)
        low_res, iou, points, used = self.decode(inputs, out, grid_map)
        mask_logits = [
            g.postprocess_masks(x.float()) for g, x in zip(inputs.geometries, low_res, strict=True)
        ]
        result = LensOutput(mask_logits, low_res, iou, grid_map.detach(), points, used)
        if inputs.masks is not None:
            losses = mask_losses(mask_logits, [m.to(self.device) for m in inputs.masks], self.config.loss)
            losses["ce_loss"] = out.ce_loss
            result.loss = losses.pop("loss") + self.config.baseline.ce_weight * out.ce_loss
            result.losses = losses
        return result


def build(config: LensConfig, device: str | torch.device = "cpu") -> LisaModel:
    from lens.weights import load_frozen

    backbone, decoder = load_frozen(config, device)
    return LisaModel(config, backbone, decoder).to(device)
