"""The READ-style baseline (Qian et al., CVPR 2025, "Reasoning to Attend"): LISA plus "similarity as points".

READ observes that the ``[SEG]`` token's similarity to the image tokens already shows where the target is, and
turns that map into point prompts (its ``similarity_map_to_points``). As in LISA-style (``lens.baselines.lisa``)
the fine-tuned MLLM's ``[SEG]`` state becomes one sparse SAM prompt; in addition, on the min-max normalised
dot-product map of ``[SEG]`` with the image tokens (``LisaModel.seg_map``), the cells at or above
``baseline.read_positive`` become positive clicks (most similar first), those at or below
``baseline.read_negative`` negative clicks (least similar first), at most ``baseline.read_points`` in all; SAM's
own prompt encoder encodes them exactly as it encodes a user's clicks.

    lens train configs/synthetic.yaml --set baseline.system=read --output-dir runs/read
"""

from __future__ import annotations

import torch
from torch import Tensor

from lens.baselines.common import sam_decode
from lens.baselines.lisa import LisaModel, SegTokenInputs
from lens.baselines.seg_token import SegTokenOutput
from lens.config import LensConfig

NOT_A_POINT = -1  # SAM's label of a padding click
POSITIVE, NEGATIVE = 1, 0  # SAM's click labels


def similarity_points(
    similarity: Tensor, valid: Tensor, num_points: int, positive: float, negative: float
) -> tuple[Tensor, Tensor]:
    """READ's point selection on one map: (n, 2) x, y cells and (n,) SAM labels, positives (descending
    similarity) then negatives (ascending), at most ``num_points``; ``similarity`` (gh, gw) in [0, 1], only cells
    where ``valid`` (gh, gw) is True are candidates. READ also lists "neutral" cells after those, with SAM's
    padding label, which prompt nothing; they are left out."""
    flat, on = similarity.flatten(), valid.flatten()
    cells = torch.arange(len(flat), device=flat.device)
    pos = cells[on & (flat >= positive)]
    pos = pos[torch.argsort(flat[pos], descending=True, stable=True)]
    neg = cells[on & (flat <= negative)]
    neg = neg[torch.argsort(flat[neg], stable=True)]
    chosen = torch.cat([pos, neg])[:num_points]
    labels = torch.cat([torch.full_like(pos, POSITIVE), torch.full_like(neg, NEGATIVE)])[:num_points]
    gw = similarity.shape[1]
    points = torch.stack([chosen % gw, chosen // gw], -1).float()  # (n, 2) x, y
    return points, labels


class ReadModel(LisaModel):
    """LISA-style, with READ's similarity points as extra SAM clicks."""

    def decode(
        self, inputs: SegTokenInputs, out: SegTokenOutput, grid_map: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b = self.config.baseline
        valid_cells = torch.stack([g.valid_cells(self.device) for g in inputs.geometries])
        picks = [
            similarity_points(m.detach(), v, b.read_points, b.read_positive, b.read_negative)
            for m, v in zip(grid_map, valid_cells, strict=True)
        ]
        n = max(1, max(len(p) for p, _ in picks))
        B = len(picks)
        points = grid_map.new_zeros(B, n, 2)
        labels = torch.full((B, n), NOT_A_POINT, dtype=torch.long, device=self.device)
        for i, (p, lab) in enumerate(picks):
            points[i, : len(p)], labels[i, : len(p)] = p, lab
        # A click at the pixel under the cell's centre, as an index, in SAM's input frame (as SamProcessor
        # hands it to the prompt encoder, which adds its own half-pixel shift).
        clicks = torch.stack(
            [
                g.decoder.image_to_decoder(g.grid.grid_to_image(p) - 0.5)
                for g, p in zip(inputs.geometries, points, strict=True)
            ]
        )  # (B, n, 2)
        sparse_points, _ = self.decoder.sam.prompt_encoder(
            input_points=clicks[:, None], input_labels=labels[:, None], input_boxes=None, input_masks=None
        )  # (B, 1, n + 1, d_s): SAM pads clicks without a box with one not-a-point
        prompt = self.projection(out.seg_hidden)  # (B, d_s)
        sparse = torch.cat([prompt[:, None], sparse_points[:, 0].to(prompt.dtype)], 1)  # (B, 1 + n + 1, d_s)
        embeddings = self.decoder.move(inputs.decoder_embeddings, self.device)
        low_res, iou = sam_decode(self.decoder, embeddings, sparse)
        return low_res, iou, points, labels != NOT_A_POINT


def build(config: LensConfig, device: str | torch.device = "cpu") -> ReadModel:
    from lens.weights import load_frozen

    backbone, decoder = load_frozen(config, device)
    return ReadModel(config, backbone, decoder).to(device)
