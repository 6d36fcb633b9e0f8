"""The READ-style baseline (Qian et al. 2025, "Reasoning to Attend"): LISA plus "similarity as points".

READ observes that the ``[SEG]`` token's similarity to the image tokens already shows where the target is, and
turns that map into point prompts. Here, as in LISA-style (``lens.baselines.lisa``), the fine-tuned MLLM's
``[SEG]`` state becomes one sparse SAM prompt; in addition the ``baseline.read_points`` highest peaks of its
cosine-similarity map over the image tokens (NMS with the keypoint stage's radius, cells of pure padding
excluded) become positive clicks, encoded by SAM's own prompt encoder exactly as SAM encodes a user's clicks.

    lens train configs/synthetic.yaml --set baseline.system=read --output-dir runs/read
"""

from __future__ import annotations

import torch
from torch import Tensor

from lens.baselines.common import sam_decode
from lens.baselines.lisa import LisaModel, SegTokenInputs
from lens.baselines.seg_token import SegTokenOutput
from lens.config import LensConfig
from lens.keypoints import nms

NOT_A_POINT = -1  # SAM's label of a padding click


class ReadModel(LisaModel):
    """LISA-style, with the ``[SEG]``-to-image similarity peaks as extra positive points for SAM."""

    def decode(
        self, inputs: SegTokenInputs, out: SegTokenOutput, grid_map: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        valid_cells = torch.stack([g.valid_cells(self.device) for g in inputs.geometries])
        heat = grid_map.detach().float().clamp(min=0)  # only cells more similar than orthogonal are peaks
        points, valid = nms(
            heat, self.config.keypoints.nms_radius, self.config.baseline.read_points, valid_cells
        )
        # A click at the pixel under the cell's centre, as an index, in SAM's input frame (as SamProcessor
        # hands it to the prompt encoder, which adds its own half-pixel shift).
        clicks = torch.stack(
            [
                g.decoder.image_to_decoder(g.grid.grid_to_image(p) - 0.5)
                for g, p in zip(inputs.geometries, points, strict=True)
            ]
        )  # (B, n, 2)
        labels = torch.where(valid, 1, NOT_A_POINT)  # (B, n)
        sam = self.decoder.sam
        sparse_points, _ = sam.prompt_encoder(
            input_points=clicks[:, None], input_labels=labels[:, None], input_boxes=None, input_masks=None
        )  # (B, 1, n + 1, d_s): SAM pads clicks without a box with one not-a-point
        prompt = self.projection(out.seg_hidden)  # (B, d_s)
        sparse = torch.cat([prompt[:, None], sparse_points[:, 0].to(prompt.dtype)], 1)  # (B, 1 + n + 1, d_s)
        embeddings = self.decoder.move(inputs.decoder_embeddings, self.device)
        low_res, iou = sam_decode(self.decoder, embeddings, sparse)
        return low_res, iou, points, valid


def build(config: LensConfig, device: str | torch.device = "cpu") -> ReadModel:
    from lens.weights import load_frozen

    backbone, decoder = load_frozen(config, device)
    return ReadModel(config, backbone, decoder).to(device)
