"""The training-free baseline: the frozen MLLM's own text→image attention prompts the pretrained SAM.

Nothing is trained. At one decoder layer (the probe's best, ``lens probe``) the MLLM's attention from the
prompt's text tokens to the image cells, averaged over heads and text tokens exactly as ``lens probe`` and eq. 1
average it, is the grounding map; NMS (the keypoint stage's, S1.1) picks its ``num_points`` highest peaks, and
SAM's own prompt encoder turns them into positive clicks for its pretrained mask decoder (one mask). It is what
LENS's premise predicts a grounding MLLM can already do, and what the head must beat to earn its training.

    python -m lens.baselines.training_free configs/synthetic.yaml --layer 3 --points 1 \
        --splits synthetic/test --output-dir runs/training-free
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from PIL import Image
from torch import Tensor, nn

from lens.backbone import Backbone, unique_images
from lens.config import LensConfig
from lens.decoders import MaskDecoderBridge
from lens.geometry import pad_grids, valid_cell_mask
from lens.keypoints import nms
from lens.model import LensInputs, LensOutput, mask_targets
from lens.probe import text_image_maps

logger = logging.getLogger(__name__)

SUPPORTED_DECODERS = ("sam", "sam_hq")  # decoders whose HF model takes point clicks as ``input_points``
NOT_A_POINT = -1  # SAM's label of a padding click


@dataclass(frozen=True)
class TrainingFreeSettings:
    """Everything that decides the baseline's masks besides the two frozen models (saved with its results)."""

    layer: int  # 1-based decoder layer whose own attention is the map (the probe's recommendation)
    num_points: int = 1  # highest NMS peaks given to SAM as positive clicks
    nms_radius: float = 2.0  # cells, as LENS's keypoint stage on the same grid

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise ValueError(f"layer is 1-based, got {self.layer}")
        if self.num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {self.num_points}")
        if not self.nms_radius >= 0:
            raise ValueError(f"nms_radius must be >= 0, got {self.nms_radius}")


@dataclass
class TrainingFreeInputs(LensInputs):
    maps: list[Tensor] | None = None  # per prompt (gh_i, gw_i): the chosen layer's text→image attention


class TrainingFreeModel(nn.Module):
    """Frozen MLLM + frozen SAM, wired as ``LensModel`` is, so ``lens.evaluation.evaluate`` scores it alike."""

    def __init__(
        self,
        config: LensConfig,
        backbone: Backbone,
        decoder: MaskDecoderBridge,
        settings: TrainingFreeSettings,
    ):
        super().__init__()
        if decoder.name not in SUPPORTED_DECODERS:
            raise ValueError(f"the training-free baseline drives {SUPPORTED_DECODERS}, not {decoder.name!r}")
        layers = len(backbone.decoder_layers)
        if settings.layer > layers:
            raise ValueError(f"the backbone has decoder layers 1..{layers}; got layer {settings.layer}")
        self.config, self.backbone, self.decoder, self.settings = config, backbone, decoder, settings
        self.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    def trainable_names(self) -> list[str]:
        return []  # nothing trains

    def trainable_state_dict(self) -> dict[str, Tensor]:
        # No weights of its own: its identity (``lens.integrity.model_identity``) is the config's, settings in.
        return {
            "settings": torch.tensor(
                [self.settings.layer, self.settings.num_points, self.settings.nms_radius]
            )
        }

    @torch.inference_mode()
    def prepare(
        self,
        images: Sequence[Image.Image],
        instructions: Sequence[str],
        masks: Sequence[np.ndarray | Tensor] | None = None,
    ) -> TrainingFreeInputs:
        """The MLLM through every layer with its attention kept (``Backbone.layer_attentions``), and SAM's
        image embedding once per image."""
        features, attentions = self.backbone.layer_attentions(
            images, instructions, decoder_frame=self.decoder.frame
        )
        maps = [m[self.settings.layer - 1] for m in text_image_maps(features, attentions)]
        distinct, index = unique_images(images)
        embeddings = self.decoder.select(self.decoder.embed_images(distinct), index)
        targets = mask_targets(masks)
        return TrainingFreeInputs(features, embeddings, targets, maps)

    @torch.inference_mode()
    def forward(self, inputs: TrainingFreeInputs) -> LensOutput:
        f = inputs.features
        gh, gw = f.max_grid
        heat = pad_grids(inputs.maps, gh, gw).to(self.device)  # (B, gh, gw), zero off each image's grid
        cells = valid_cell_mask(f.geometries, gh, gw, self.device)  # (B, gh, gw): on the image only
        points, valid = nms(heat, self.settings.nms_radius, self.settings.num_points, cells)  # (B, n, 2)
        # A click where a user would give it: the pixel under the cell's centre, as an index (centre - 0.5) of the
        # original image, scaled into SAM's input frame as ``SamProcessor`` scales points (HF's prompt encoder
        # then adds its own half-pixel shift), so SAM sees exactly what its own processor would hand it.
        clicks = torch.stack(
            [
                g.decoder.image_to_decoder(g.grid.grid_to_image(p) - 0.5)
                for g, p in zip(f.geometries, points, strict=True)
            ]
        )  # (B, n, 2)
        labels = torch.where(valid, 1, NOT_A_POINT)  # (B, n)
        embeddings = inputs.decoder_embeddings.to(self.device)
        out = self.decoder.sam(
            image_embeddings=embeddings,
            input_points=clicks[:, None],  # (B, 1, n, 2)
            input_labels=labels[:, None],  # (B, 1, n)
            multimask_output=False,
        )
        low_res = out.pred_masks[:, 0, 0]  # (B, h, w)
        mask_logits = [g.postprocess_masks(x.float()) for g, x in zip(f.geometries, low_res, strict=True)]
        iou = out.iou_scores[:, 0, 0]
        return LensOutput(
            mask_logits, low_res, iou, heat / heat.amax((1, 2), keepdim=True).clamp(min=1e-12), points, valid
        )


def build_training_free(
    config: LensConfig, settings: TrainingFreeSettings, device: str | torch.device = "cpu"
) -> TrainingFreeModel:
    """The two frozen models ``config`` names, wired as the baseline (the LENS head is never built)."""
    from lens.weights import build_lens

    lens = build_lens(config, device)
    return TrainingFreeModel(config, lens.backbone, lens.decoder, settings).eval()


app = typer.Typer(add_completion=False)


@app.command()
def main(
    config: Annotated[Path, typer.Argument(help="LensConfig YAML naming the MLLM, SAM and the data")],
    layer: Annotated[
        int, typer.Option(help="decoder layer whose own attention is the map (lens probe's best)")
    ],
    points: Annotated[int, typer.Option(help="NMS peaks given to SAM as positive clicks")] = 1,
    nms_radius: Annotated[
        float | None, typer.Option(help="cells (default: the config's keypoints.nms_radius)")
    ] = None,
    splits: Annotated[
        str | None, typer.Option(help="comma-separated DATASET/SPLIT (default: the config's)")
    ] = None,
    output_dir: Annotated[Path, typer.Option(help="per_sample.jsonl, results.json / .md")] = Path(
        "runs/training-free"
    ),
    limit: Annotated[int | None, typer.Option(help="first N items of each split")] = None,
    batch_size: Annotated[int, typer.Option(help="items per forward")] = 8,
) -> None:
    """Score the training-free baseline with LENS's own evaluation (same splits, metrics and files)."""
    from lens.evaluation import eval_splits, evaluate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = LensConfig.from_yaml(config)
    radius = cfg.keypoints.nms_radius if nms_radius is None else nms_radius
    try:
        settings = TrainingFreeSettings(layer, points, radius)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    model = build_training_free(cfg, settings)
    chosen = eval_splits(cfg, splits.split(",") if splits else None)
    results = evaluate(model, chosen, output_dir, batch_size, limit=limit, method="training-free")
    (output_dir / "settings.json").write_text(json.dumps(dataclasses.asdict(settings), indent=1) + "\n")
    typer.echo(json.dumps(results, indent=1))


if __name__ == "__main__":
    app()
