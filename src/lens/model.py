"""LENS, wired: frozen MLLM → head → keypoints → descriptor → mask decoder (paper Fig. 2, eq. 2-4).

Read top to bottom: ``LensModel.prepare`` runs the frozen parts once (inference mode), ``forward`` is the
trainable path and returns a ``LensOutput`` (with losses when targets are given), ``predict`` is the
user-facing call, ``embed_image`` does an image's text-independent work once for many ``predict`` calls.
Only the head, the descriptor and the decoder's ``trainable_names`` train.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from lens.backbone import Backbone, BackboneFeatures, first_of_each, unique_images
from lens.config import LensConfig
from lens.decoders import ImageEmbeddings, MaskDecoderBridge
from lens.descriptor import KeypointDescriptor
from lens.errors import InvalidConfig
from lens.geometry import ImageGeometry, grid_cell_index, pad_grids, to_padded_grid, valid_cell_mask
from lens.head import SegmentationHead
from lens.images import load_image, validate_queries
from lens.keypoints import extract_keypoints, sample_neighbourhood
from lens.losses import lens_loss

EDGE_MARGIN = 1e-3  # cells: how far inside the image's edge a clamped keypoint stays


def mask_targets(masks: Sequence[np.ndarray | Tensor] | None) -> list[Tensor] | None:
    """Per-sample target masks as ``LensInputs.masks`` holds them: uint8 (1 target, 0 background, 255 ignore)."""
    return None if masks is None else [torch.as_tensor(np.asarray(m), dtype=torch.uint8) for m in masks]


def trainable_tensors(module: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    """``names``' parameters of ``module``, detached: what a checkpoint of its trainable part saves."""
    tensors = dict(module.named_parameters())
    return {name: tensors[name].detach() for name in names}


S = TypeVar("S")
M = TypeVar("M")


@dataclass
class LensInputs:
    """A batch after the frozen stages: what training consumes (computed on the fly or read from a cache)."""

    features: BackboneFeatures
    decoder_embeddings: ImageEmbeddings  # batch of B: the decoder's image-encoder output, one row per prompt
    masks: list[Tensor] | None = None  # per sample (H_i, W_i) uint8: 1 target, 0 background, 255 ignore


@dataclass
class LensOutput:
    mask_logits: list[Tensor]  # per sample (H_i, W_i) logits at original image size
    low_res_logits: Tensor  # (B, h, w) decoder output in its own input frame
    iou_scores: Tensor  # (B,) the decoder's predicted IoU
    attention_map: Tensor  # (B, gh_max, gw_max) A_c in [0, 1], zero outside each image's own grid
    keypoints: Tensor  # (B, m, 2) x, y in attention-grid cells (sub-pixel), on the image
    keypoints_valid: Tensor  # (B, m) bool, as used by the decoder (without keypoint descriptions: as found)
    loss: Tensor | None = None
    losses: dict[str, Tensor] | None = None  # dice_loss, bce_loss, attention_loss (unweighted)


@dataclass
class Prediction:
    mask: np.ndarray  # (H, W) bool at original image size
    score: float  # the decoder's predicted IoU for the mask
    keypoints: np.ndarray  # (n, 2) x, y in original image pixels (valid keypoints only)
    keypoints_inside: (
        np.ndarray
    )  # (n,) bool: keypoint falls inside the mask (white vs red in the paper's Fig. 3)
    attention_map: np.ndarray  # (gh, gw) A_c in [0, 1] on this image's own grid
    geometry: ImageGeometry  # maps between this image, the attention grid and the decoder's frame
    mask_logits: np.ndarray | None = None  # (H, W) float32 logits behind ``mask`` (presence calibration)


@dataclass
class EmbeddedImage:
    """An image after the text-independent work: ask it any number of questions (``LensModel.predict``)."""

    image: Image.Image
    geometry: ImageGeometry
    decoder_embeddings: ImageEmbeddings  # batch of 1
    prefix: object | None  # the backbone's cached prompt prefix (keys / values through layer k), or None


class LensModel(nn.Module):
    def __init__(self, config: LensConfig, backbone: Backbone, decoder: MaskDecoderBridge):
        super().__init__()
        if config.decoder.name != decoder.name:
            raise ValueError(
                f"config names decoder {config.decoder.name!r} but got a {decoder.name!r} decoder"
            )
        self.config = config
        self.backbone = backbone
        self.decoder = decoder
        spec, dc = backbone.layer_spec(), config.descriptor
        self.head = SegmentationHead(spec)
        self.descriptor = KeypointDescriptor(
            spec.hidden_size,
            decoder.prompt_dim,
            dc.num_heads,
            dc.global_only_prob if dc.global_description else 0.0,  # no global-only path without f_s
            width=dc.width,
            keypoint_descriptions=dc.keypoint_descriptions,
        )
        if not dc.global_description:  # f_s's [CLS] position never reaches the decoder: it does not train
            decoder.cls_position.requires_grad_(False)
        if config.head.init_from_backbone:
            k = backbone.layer
            try:
                states = [backbone.decoder_layer_state(k + 1 + i) for i in range(len(self.head.layers))]
            except ValueError as err:
                raise InvalidConfig(
                    f"head.init_from_backbone copies backbone layers k+1 and k+2 into the head, but "
                    f"backbone.layer is k = {k} ({err}): use a k at least two below the MLLM's depth, "
                    "or head.init_from_backbone: false"
                ) from None
            for layer, state in zip(self.head.layers, states, strict=True):
                layer.load_state_dict(state)

    @property
    def device(self) -> torch.device:
        return self.head.layers[0].input_layernorm.weight.device

    def trainable_names(self) -> list[str]:
        """Exactly the tensors that train and that a checkpoint saves: head, descriptor, the decoder's own."""
        return [
            *(f"head.{n}" for n, _ in self.head.named_parameters()),
            *(f"descriptor.{n}" for n, _ in self.descriptor.named_parameters()),
            *(f"decoder.{n}" for n in self.decoder.trainable_names()),
        ]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return trainable_tensors(self, self.trainable_names())

    def prepare(
        self,
        images: Sequence[Image.Image],
        instructions: Sequence[str],
        masks: Sequence[np.ndarray | Tensor] | None = None,
    ) -> LensInputs:
        """Run the frozen MLLM (to layer k) and the decoder's image encoder, in inference mode."""
        targets = mask_targets(masks)
        if _use_streams(self.device):  # the image encoder on a second stream, alongside the MLLM prefill
            distinct, index = unique_images(images)
            embeddings, features = _alongside(
                lambda: self.decoder.embed_images(distinct),
                lambda: self.backbone.encode(images, instructions, decoder_frame=self.decoder.frame),
                self.device,
            )
            return LensInputs(features, self.decoder.select(embeddings, index), targets)
        features = self.backbone.encode(images, instructions, decoder_frame=self.decoder.frame)
        if features.image_index is None:  # a backbone that does not say which prompts share an image
            distinct, index = unique_images(images)
        else:
            index = features.image_index
            distinct = [images[i] for i in first_of_each(index)]
        embeddings = self.decoder.select(self.decoder.embed_images(distinct), index)  # once per image
        return LensInputs(features, embeddings, targets)

    def forward(self, inputs: LensInputs) -> LensOutput:
        f = inputs.features.to(self.device)
        kp = self.config.keypoints
        gh, gw = f.max_grid
        head = self.head(
            f.hidden_states,
            f.attention_mask,
            f.position_ids,
            f.image_positions,
            f.grid_sizes,
            f.text_span,
            f.image_index,
            f.shared_length,
        )

        # Keypoints: NMS over the cells on the image (never a padding cell, never outside the image's own
        # grid) + one Newton step on the unclipped map, so saturated plateaus keep their peaks.
        with torch.no_grad():
            cells = valid_cell_mask(f.geometries, gh, gw, self.device)  # (B, gh, gw)
            points, valid = extract_keypoints(
                head.attention_scores.float(),
                kp.nms_radius,
                kp.max_points,
                kp.subpixel_eps,
                cells,
                subpixel=kp.subpixel,
            )  # (B, m, 2)
            points = _clamp_to_images(points, f.geometries)  # a step can leave the image: keep it on

        # Descriptions from layer-2 features: image cells as a (B, d, gh, gw) map, f_s at the answer start.
        B = head.hidden_states.shape[0]
        rows = torch.arange(B, device=self.device)
        image_features = head.hidden_states[rows[:, None], f.image_positions.clamp(min=0)]  # (B, N, d)
        feature_map = to_padded_grid(image_features, f.grid_sizes, gh, gw).permute(
            0, 3, 1, 2
        )  # (B, d, gh, gw)
        neighbourhoods = sample_neighbourhood(
            feature_map, points, kp.neighbourhood, f.grid_sizes
        )  # (B, m, p*p, d)
        f_s = head.hidden_states[rows, f.answer_index]  # (B, d)
        descriptions, used = self.descriptor(f_s, neighbourhoods, valid)  # (B, 1 + m', d_s), (B, m')
        # m' = m; 0 without keypoint descriptions (the decoder gets f_s alone, no point at all)
        if not self.config.descriptor.global_description:
            descriptions = descriptions[:, 1:]  # f_s informed the d_i's self-attention but is no prompt

        decoder_points = torch.stack(
            [g.grid_to_decoder(p) for g, p in zip(f.geometries, points[:, : used.shape[1]], strict=True)]
        )  # (B, m', 2)
        embeddings = self.decoder.move(inputs.decoder_embeddings, self.device)
        dtype = _first_tensor(embeddings).dtype
        low_res, iou = self.decoder(embeddings, descriptions.to(dtype), decoder_points, used)
        mask_logits = [g.postprocess_masks(x.float()) for g, x in zip(f.geometries, low_res, strict=True)]

        shown = used if used.shape[1] == valid.shape[1] else valid  # no keypoint prompts: NMS's, for display
        out = LensOutput(mask_logits, low_res, iou, head.attention_map, points, shown)
        if inputs.masks is not None:
            targets = [m.to(self.device) for m in inputs.masks]
            attention_target = pad_grids(
                [g.mask_to_grid(m) for g, m in zip(f.geometries, targets, strict=True)], gh, gw
            )
            inside = grid_cell_index(f.grid_sizes, gh, gw) >= 0  # (B, gh, gw) the images' own grids
            out.losses = lens_loss(
                mask_logits, targets, head.attention_map, attention_target, self.config.loss, inside
            )
            out.loss = out.losses.pop("loss")
        return out

    @torch.inference_mode()
    def embed_image(self, image: Image.Image | np.ndarray | str | bytes | Tensor) -> EmbeddedImage:
        """The text-independent work on ``image``, done once: the decoder's image embedding and, where the
        backbone can share it, its prompt prefix (chat template + image through layers 1..k)."""
        image = load_image(image)
        embeddings, prefix = _alongside(
            lambda: self.decoder.embed_images([image]),
            lambda: self.backbone.encode_prefix(image),
            self.device,
        )
        geometry = ImageGeometry(
            self.backbone.grid_frame(image.width, image.height), self.decoder.frame(image.width, image.height)
        )
        return EmbeddedImage(image, geometry, embeddings, prefix)

    @torch.inference_mode()
    def predict(
        self, image: Image.Image | np.ndarray | EmbeddedImage, text: str | Sequence[str]
    ) -> Prediction | list[Prediction]:
        """Segment what ``text`` asks for in ``image``. Texts on one image share its decoder embedding and, with
        an ``EmbeddedImage`` (``embed_image``), its backbone prefix too.

        ``image``: an ``EmbeddedImage`` or anything ``lens.images.load_image`` accepts (PIL image, path, bytes,
        array, tensor); bad images and queries raise ``lens.errors.InvalidInput`` naming the problem.
        """
        texts = validate_queries([text] if isinstance(text, str | bytes) else list(text), self.backbone)
        if not texts:
            raise ValueError("predict() needs at least one text")
        embedded = image if isinstance(image, EmbeddedImage) else None
        pil = embedded.image if embedded is not None else load_image(image)  # upright 8-bit RGB
        with _inference(self):
            if embedded is None:
                embeddings, features = _alongside(
                    lambda: self.decoder.embed_images([pil]),
                    lambda: self.backbone.encode([pil] * len(texts), texts, decoder_frame=self.decoder.frame),
                    self.device,
                )
            else:
                embeddings = embedded.decoder_embeddings
                features = self.backbone.encode(
                    [pil] * len(texts), texts, decoder_frame=self.decoder.frame, prefix=embedded.prefix
                )
            index = torch.zeros(len(texts), dtype=torch.long)
            out = self(LensInputs(features, self.decoder.select(embeddings, index)))
        threshold = self.config.decoder.mask_threshold
        predictions = []
        for i, geometry in enumerate(features.geometries):
            mask = (out.mask_logits[i] > threshold).cpu().numpy()
            points = geometry.grid_to_image(out.keypoints[i][out.keypoints_valid[i]]).cpu().numpy()
            cols = np.clip(points[:, 0].astype(int), 0, pil.width - 1)
            rows = np.clip(points[:, 1].astype(int), 0, pil.height - 1)
            gh, gw = geometry.grid_size
            predictions.append(
                Prediction(
                    mask=mask,
                    score=float(out.iou_scores[i]),
                    keypoints=points,
                    keypoints_inside=mask[rows, cols],
                    attention_map=out.attention_map[i, :gh, :gw].float().cpu().numpy(),
                    geometry=geometry,
                    mask_logits=out.mask_logits[i].float().cpu().numpy(),
                )
            )
        return predictions[0] if isinstance(text, str | bytes) else predictions


def _use_streams(device: torch.device) -> bool:
    return device.type == "cuda"


def _alongside(side: Callable[[], S], main: Callable[[], M], device: torch.device) -> tuple[S, M]:
    """``(side(), main())``, with ``side`` queued on a second CUDA stream so that its kernels (the decoder's
    image encoder) overlap ``main``'s (the MLLM prefill): the two share no inputs. Elsewhere, one after the
    other. The side stream waits for work already queued (inputs copied in) and the current stream waits for
    the side one before anything reads its outputs; ``record_stream`` keeps the allocator from reusing them
    early. Numbers are the serial path's: the same kernels run on the same inputs."""
    if not _use_streams(device):
        return side(), main()
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        first = side()
    second = main()
    current.wait_stream(stream)
    for tensor in first if isinstance(first, tuple) else (first,):
        if isinstance(tensor, Tensor):
            tensor.record_stream(current)
    return first, second


def _first_tensor(embeddings: ImageEmbeddings) -> Tensor:
    return embeddings if isinstance(embeddings, Tensor) else embeddings[0]


def _clamp_to_images(points: Tensor, geometries: Sequence[ImageGeometry]) -> Tensor:
    """(B, m, 2) grid points clamped, per image, to the image's extent in cells (its edges, not its padding),
    ``EDGE_MARGIN`` inside so that float32 rounding in ``grid_to_image`` cannot put a point past the edge."""
    extents = [g.grid.image_extent() for g in geometries]
    low = points.new_tensor([[x[0] + EDGE_MARGIN, y[0] + EDGE_MARGIN] for x, y in extents])[
        :, None
    ]  # (B, 1, 2)
    high = points.new_tensor([[x[1] - EDGE_MARGIN, y[1] - EDGE_MARGIN] for x, y in extents])[:, None]
    return torch.minimum(torch.maximum(points, low), high)


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval behaviour for one call. A model already in eval mode (the usual case for inference) is left
    alone; only a model caught in training mode (validation inside a training run) is switched and restored."""
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train(True)
