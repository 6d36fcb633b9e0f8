"""LENS, wired: frozen MLLM → head → keypoints → descriptor → SAM bridge (paper Fig. 2, eq. 2-4).

Read top to bottom: ``LensModel.prepare`` runs the frozen parts once (inference mode), ``forward`` is the
trainable path and returns a ``LensOutput`` (with losses when targets are given), ``predict`` is the
user-facing call. Only the head, the descriptor, the [CLS] position and SAM's mask decoder train.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from lens.backbone import Backbone, BackboneFeatures, first_of_each, unique_images
from lens.config import LensConfig
from lens.decoder import SamBridge
from lens.descriptor import KeypointDescriptor
from lens.geometry import ImageGeometry
from lens.head import SegmentationHead
from lens.keypoints import extract_keypoints, sample_neighbourhood
from lens.losses import lens_loss

# Everything under these names is trained and saved; nothing else is.
TRAINABLE_PREFIXES = ("head.", "descriptor.", "bridge.cls_position", "bridge.sam.mask_decoder.")


@dataclass
class LensInputs:
    """A batch after the frozen stages: what training consumes (computed on the fly or read from a cache)."""

    features: BackboneFeatures
    sam_embeddings: Tensor  # (B, d_s, h, w) SAM image-encoder output
    masks: list[Tensor] | None = None  # per sample (H_i, W_i) uint8: 1 target, 0 background, 255 ignore


@dataclass
class LensOutput:
    mask_logits: list[Tensor]  # per sample (H_i, W_i) logits at original image size
    low_res_logits: Tensor  # (B, 4h, 4w) SAM decoder output in its padded input frame
    iou_scores: Tensor  # (B,) SAM's predicted IoU
    attention_map: Tensor  # (B, gh, gw) A_c in [0, 1]
    keypoints: Tensor  # (B, m, 2) x, y in attention-grid cells (sub-pixel)
    keypoints_valid: Tensor  # (B, m) bool, as used by the decoder
    loss: Tensor | None = None
    losses: dict[str, Tensor] | None = None  # dice_loss, bce_loss, attention_loss (unweighted)


@dataclass
class Prediction:
    mask: np.ndarray  # (H, W) bool at original image size
    score: float  # SAM's predicted IoU for the mask
    keypoints: np.ndarray  # (n, 2) x, y in original image pixels (valid keypoints only)
    keypoints_inside: (
        np.ndarray
    )  # (n,) bool: keypoint falls inside the mask (white vs red in the paper's Fig. 3)
    attention_map: np.ndarray  # (gh, gw) A_c in [0, 1]
    geometry: ImageGeometry  # maps between this image, the attention grid and SAM's frame
    mask_logits: np.ndarray | None = None  # (H, W) float32 logits behind ``mask`` (presence calibration)


# --- interfaces: minimal embed-once stand-in until branch `contracts` lands its EmbeddedImage (replace then) ---
@dataclass
class EmbeddedImage:
    """One image after its frozen, query-independent work: here SAM's image embedding only (prefix=None)."""

    image: Image.Image
    decoder_embeddings: Tensor  # (1, d_s, h, w) SAM image-encoder output
    prefix: object | None = None  # the backbone's cached template + image prefix (not kept by this stand-in)


# --- end of the stand-in ---


class LensModel(nn.Module):
    def __init__(self, config: LensConfig, backbone: Backbone, bridge: SamBridge):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.bridge = bridge
        spec = backbone.layer_spec()
        self.head = SegmentationHead(spec)
        self.descriptor = KeypointDescriptor(
            spec.hidden_size,
            bridge.prompt_dim,
            config.descriptor.num_heads,
            config.descriptor.global_only_prob,
        )
        if config.head.init_from_backbone:
            for i, layer in enumerate(self.head.layers):
                layer.load_state_dict(backbone.decoder_layer_state(backbone.layer + 1 + i))

    @property
    def device(self) -> torch.device:
        return self.bridge.device

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(TRAINABLE_PREFIXES)}

    def prepare(
        self,
        images: Sequence[Image.Image],
        instructions: Sequence[str],
        masks: Sequence[np.ndarray | Tensor] | None = None,
    ) -> LensInputs:
        """Run the frozen MLLM (to layer k) and SAM's image encoder, in inference mode."""
        targets = (
            None if masks is None else [torch.as_tensor(np.asarray(m), dtype=torch.uint8) for m in masks]
        )
        features = self.backbone.encode(images, instructions)
        if features.image_index is None:  # a backbone that does not say which prompts share an image
            distinct, index = unique_images(images)
        else:
            index = features.image_index
            distinct = [images[i] for i in first_of_each(index)]
        sam = self.bridge.embed_images(distinct)[index.to(self.device)]  # (B, d_s, h, w), once per image
        return LensInputs(features, sam, targets)

    def forward(self, inputs: LensInputs) -> LensOutput:
        f = inputs.features.to(self.device)
        kp = self.config.keypoints
        head = self.head(
            f.hidden_states,
            f.attention_mask,
            f.position_ids,
            f.image_span,
            f.text_span,
            f.grid_size,
            f.image_index,
            f.shared_length,
        )

        # Keypoints: NMS + one Newton step on the unclipped map, so saturated plateaus keep their peaks.
        with torch.no_grad():
            scores = head.attention_scores.float()
            points, valid = extract_keypoints(
                scores, kp.nms_radius, kp.max_points, kp.subpixel_eps
            )  # (B, m, 2)
            # A corner step can leave the grid: keep points on the image (cell edge ±0.5).
            gh, gw = f.grid_size
            points = torch.stack(
                [points[..., 0].clamp(-0.5, gw - 0.5), points[..., 1].clamp(-0.5, gh - 0.5)], -1
            )

        # Descriptions from layer-2 features: image tokens as a (B, d, gh, gw) map, f_s at the answer start.
        B, _, d = head.hidden_states.shape
        rows = torch.arange(B, device=self.device)
        image_index = f.image_span[:, :1] + torch.arange(gh * gw, device=self.device)  # (B, n_img)
        image_features = head.hidden_states[rows[:, None], image_index]  # (B, n_img, d)
        feature_map = image_features.transpose(1, 2).reshape(B, d, gh, gw)
        neighbourhoods = sample_neighbourhood(feature_map, points, kp.neighbourhood)  # (B, m, p*p, d)
        f_s = head.hidden_states[rows, f.answer_index]  # (B, d)
        descriptions, used = self.descriptor(f_s, neighbourhoods, valid)  # (B, 1 + m, d_s), (B, m)

        sam_points = torch.stack([g.grid_to_sam(p) for g, p in zip(f.geometries, points, strict=True)])
        sam_embeddings = inputs.sam_embeddings.to(self.device)
        low_res, iou = self.bridge(sam_embeddings, descriptions.to(sam_embeddings.dtype), sam_points, used)
        mask_logits = [g.postprocess_masks(x.float()) for g, x in zip(f.geometries, low_res, strict=True)]

        out = LensOutput(mask_logits, low_res, iou, head.attention_map, points, used)
        if inputs.masks is not None:
            targets = [m.to(self.device) for m in inputs.masks]
            attention_target = torch.stack(
                [g.mask_to_grid(m) for g, m in zip(f.geometries, targets, strict=True)]
            )
            out.losses = lens_loss(
                mask_logits, targets, head.attention_map, attention_target, self.config.loss
            )
            out.loss = out.losses.pop("loss")
        return out

    @torch.inference_mode()
    def embed_image(self, image: Image.Image) -> EmbeddedImage:  # interfaces stand-in (see EmbeddedImage)
        """SAM's embedding of ``image``, computed once for any number of later ``predict`` calls."""
        return EmbeddedImage(image, self.bridge.embed_images([image]))

    @torch.inference_mode()
    def predict(
        self, image: Image.Image | np.ndarray | EmbeddedImage, text: str | Sequence[str]
    ) -> Prediction | list[Prediction]:
        """Segment what ``text`` asks for in ``image``. A list of texts shares one SAM image embedding.

        ``image``: anything ``lens.images.load_image`` accepts (PIL image, path, bytes, array, tensor);
        bad images and queries raise ``lens.errors.InvalidInput`` naming the problem.
        """
        from lens.images import load_image, validate_queries

        embedded = image if isinstance(image, EmbeddedImage) else None  # interfaces stand-in
        image = embedded.image if embedded is not None else load_image(image)  # upright 8-bit RGB
        texts = validate_queries([text] if isinstance(text, str | bytes) else list(text), self.backbone)
        if not texts:
            raise ValueError("predict() needs at least one text")
        was_training = self.training
        self.eval()
        try:
            embedding = (
                embedded.decoder_embeddings if embedded is not None else self.bridge.embed_images([image])
            )
            features = self.backbone.encode([image] * len(texts), texts)
            out = self(LensInputs(features, embedding.expand(len(texts), -1, -1, -1)))
        finally:
            self.train(was_training)
        threshold = self.config.decoder.mask_threshold
        predictions = []
        for i, geometry in enumerate(features.geometries):
            mask = (out.mask_logits[i] > threshold).cpu().numpy()
            points = geometry.grid_to_image(out.keypoints[i][out.keypoints_valid[i]]).cpu().numpy()
            cols = np.clip(points[:, 0].astype(int), 0, image.width - 1)
            rows = np.clip(points[:, 1].astype(int), 0, image.height - 1)
            predictions.append(
                Prediction(
                    mask=mask,
                    score=float(out.iou_scores[i]),
                    keypoints=points,
                    keypoints_inside=mask[rows, cols],
                    attention_map=out.attention_map[i].float().cpu().numpy(),
                    geometry=geometry,
                    mask_logits=out.mask_logits[i].float().cpu().numpy(),
                )
            )
        return predictions[0] if isinstance(text, str | bytes) else predictions
