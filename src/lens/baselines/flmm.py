"""F-LMM (Wu et al. 2024, "Grounding Frozen Large Multimodal Models"): a small U-Net reads the frozen MLLM's
word→image attention, every layer and every head, as image channels; SAM refines its coarse mask.

The MLLM never changes (``baseline.system: flmm``). Per prompt, the attention from its text tokens to the image
cells, averaged over those tokens but kept per layer and head, is a (layers * heads, gh, gw) stack (F-LMM's
``mask_attentions``). Each channel is normalised to sum to one over the image's cells, the stack is upsampled to
about ``UPSAMPLE_TO`` cells a side, and a U-Net (F-LMM's ``UNetHead``: mmseg's UNet, GroupNorm, bilinear
up-convolutions, width ``baseline.flmm_width``) maps it to coarse mask logits. SAM's mask decoder refines them
(F-LMM's ``SAMWrapper``): prompted with the coarse mask's bounding box, the coarse logits themselves as SAM's
mask prompt, and the prompt's text tokens (a learnt softmax mix of every layer's hidden states, projected to
SAM's prompt width) as extra sparse prompts. The U-Net, the text mix and projection and SAM's mask decoder train
on Dice + BCE of both the coarse mask and the refined one.

    lens train configs/synthetic.yaml --set baseline.system=flmm --output-dir runs/flmm
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from lens.backbone import Backbone, BackboneFeatures, first_of_each, unique_images
from lens.baselines.common import mask_losses, requires_grad_names
from lens.config import LensConfig
from lens.decoders import MaskDecoderBridge
from lens.geometry import ImageGeometry, pad_grids, valid_cell_mask
from lens.model import LensInputs, LensOutput, mask_targets, trainable_tensors
from lens.probe import text_rows_on_grid

# Hugging Face ``SamModel``: its own prompt encoder takes the box and mask prompts
SUPPORTED_DECODERS = ("sam",)
# F-LMM's ``upsample_input``: the attention stack is upsampled to about this many cells a side
UPSAMPLE_TO = 64
UNET_STAGES = 4  # F-LMM's UNet: 4 stages (3 down / up levels), 2 convolutions each, GroupNorm with one group
UNET_CONVS = 2


# ----- the frozen MLLM's attention, per layer and head -----------------------------------------------------------


@dataclass
class _Kept:
    attentions: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, heads, Lq, L) probabilities
    hidden: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, Lq, d) output


@contextmanager
def kept_per_layer(backbone: Backbone) -> Iterator[_Kept]:
    """Every decoder layer's attention probabilities, per head, and its output hidden states, for the forward
    passes run inside (``Backbone.layer_attentions`` switches attention to eager and averages heads; this
    keeps them). A second, cached pass over the prompts' own tokens overwrites the shared prefix's."""
    kept = _Kept()

    def attention_hook(index: int):
        def hook(_module: nn.Module, _args: tuple, output: tuple) -> None:
            kept.attentions[index] = output[1]

        return hook

    def hidden_hook(index: int):
        def hook(_module: nn.Module, _args: tuple, output: Tensor | tuple) -> None:
            kept.hidden[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = []
    for i, layer in enumerate(backbone.decoder_layers):
        handles.append(layer.self_attn.register_forward_hook(attention_hook(i)))
        handles.append(layer.register_forward_hook(hidden_hook(i)))  # before ``stop_after``'s: runs first
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


def text_image_head_maps(features: BackboneFeatures, attentions: Sequence[Tensor]) -> list[Tensor]:
    """Per prompt, every layer's and every head's text→image map: (num_layers * heads, gh_i, gw_i), layer-major,
    not renormalised. ``lens.probe.text_image_maps`` is its mean over each layer's heads.

    Arguments:
        features: the backbone's features of the batch (where the text and the grid cells are).
        attentions: per layer, attention probabilities (B, heads, Lq, L); the Lq rows are the last Lq positions.
    """
    return [
        torch.cat([text_rows_on_grid(probs, b, features) for probs in attentions])  # (layers * heads, gh, gw)
        for b in range(features.hidden_states.shape[0])
    ]


def text_hidden_states(
    features: BackboneFeatures, hidden: Sequence[Tensor], attentions: Sequence[Tensor]
) -> list[Tensor]:
    """Per prompt, every layer's output at its text tokens: (num_layers, L_t, d) (F-LMM's ``hidden_states``)."""
    out = []
    for b in range(features.hidden_states.shape[0]):
        t0, t1 = (int(v) for v in features.text_span[b])
        rows = []
        for h, probs in zip(hidden, attentions, strict=True):
            offset = probs.shape[-1] - probs.shape[-2]  # the hidden rows are the attention's rows
            rows.append(h[b, t0 - offset : t1 - offset])
        out.append(torch.stack(rows))
    return out


# ----- the mask head: F-LMM's UNet ---------------------------------------------------------------------------------


def _conv_block(in_channels: int, out_channels: int, convs: int) -> nn.Sequential:
    """mmseg's ``BasicConvBlock``: 3x3 convolutions, each with GroupNorm (one group) and ReLU, no bias."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(1, out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class _UpBlock(nn.Module):
    """mmseg's ``UpConvBlock`` with ``InterpConv``: bilinear x2, 1x1 conv to the skip's width, concatenate the
    skip, convolve."""

    def __init__(self, in_channels: int, skip_channels: int, convs: int):
        super().__init__()
        self.up = nn.Sequential(
            nn.Conv2d(in_channels, skip_channels, 1, bias=False),
            nn.GroupNorm(1, skip_channels),
            nn.ReLU(inplace=True),
        )
        self.conv = _conv_block(2 * skip_channels, skip_channels, convs)

    def forward(self, skip: Tensor, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)  # upsample, then conv
        return self.conv(torch.cat([skip, self.up(x)], 1))


def upsample_factor(grid_h: int, grid_w: int, target: int = UPSAMPLE_TO) -> int:
    """Integer factor taking an attention grid to about ``target`` cells a side (never down)."""
    return max(1, math.ceil(target / max(grid_h, grid_w)))


class AttentionUNet(nn.Module):
    """F-LMM's mask head: attention maps (n, C, gh, gw) -> coarse mask logits (n, s*gh, s*gw), s from
    ``upsample_factor``.

    Arguments:
        in_channels: layers * heads of the MLLM.
        width: channels of the first stage (F-LMM: 64), doubled at each of the ``stages - 1`` levels down.
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        stages: int = UNET_STAGES,
        convs: int = UNET_CONVS,
        upsample_to: int = UPSAMPLE_TO,
    ):
        super().__init__()
        self.upsample_to = upsample_to
        widths = [width * 2**i for i in range(stages)]
        self.encoder = nn.ModuleList(
            [_conv_block(in_channels, widths[0], convs)]
            + [
                nn.Sequential(nn.MaxPool2d(2), _conv_block(widths[i - 1], widths[i], convs))
                for i in range(1, stages)
            ]
        )
        self.decoder = nn.ModuleList([_UpBlock(widths[i], widths[i - 1], convs) for i in range(1, stages)])
        self.classifier = nn.Conv2d(widths[0], 1, 1)  # F-LMM's ``conv_seg``
        for module in self.modules():  # mmcv's ConvModule initialisation; the classifier keeps PyTorch's
            if isinstance(module, nn.Conv2d) and module is not self.classifier:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, maps: Tensor, valid: Tensor) -> Tensor:
        """maps: (n, C, gh, gw) attention, >= 0; valid: (n, gh, gw) bool, the cells that show the image."""
        n, _, gh, gw = maps.shape
        x = maps * valid[:, None]  # padding cells (and cells beyond the image's grid) carry nothing
        x = x / x.sum((-2, -1), keepdim=True).clamp(min=1e-12)  # F-LMM's ``normalize_input``, per channel
        s = upsample_factor(gh, gw, self.upsample_to)
        # (n, C, s*gh, s*gw): F-LMM's ``upsample_input``
        x = F.interpolate(x, scale_factor=float(s), mode="bilinear", align_corners=False)
        h, w = x.shape[-2:]
        step = 2 ** (len(self.encoder) - 1)
        x = F.pad(x, (0, -w % step, 0, -h % step))  # zeros bottom-right to a multiple of the pooling
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        for i in reversed(range(len(self.decoder))):
            x = self.decoder[i](skips[i], x)
        return self.classifier(x)[:, 0, :h, :w]


# ----- maps laid over the grid, read in the image's and SAM's pixels -----------------------------------------------


def sample_on_grid(maps: Tensor, geometry: ImageGeometry, points: Tensor) -> Tensor:
    """(n, h_m, w_m) maps spanning the image's attention grid, bilinearly read at (..., 2) original-pixel points
    -> (n, ...), as F-LMM reads its coarse mask: the image's part of the map cropped out (no MLLM padding leaks
    in at the edges) and resized, i.e. positions clamped to the centres of the map's first and last texels on
    the image. A map of any resolution covers the grid's full extent."""
    n, height, width = maps.shape
    grid = geometry.grid
    size = points.new_tensor([width, height])
    per_cell = size / points.new_tensor([grid.grid_w, grid.grid_h])  # texels per cell
    cells = geometry.image_to_grid(points.reshape(-1, 2))  # (P, 2) in cells, integer = centre
    texels = (cells + 0.5) * per_cell - 0.5  # (P, 2) in texels, integer = centre
    (x0, x1), (y0, y1) = grid.image_extent()  # in cells, integer = centre
    first = (points.new_tensor([x0, y0]) + 0.5) * per_cell  # the first texel on the image (its index)
    last = torch.maximum((points.new_tensor([x1, y1]) + 0.5) * per_cell - 1, first)
    texels = torch.minimum(torch.maximum(texels, first), last)
    normalised = (texels + 0.5) / size * 2 - 1  # grid_sample's [-1, 1] over the map's edges
    where = normalised.view(1, 1, -1, 2).expand(n, -1, -1, -1).to(maps.dtype)
    out = F.grid_sample(maps[:, None], where, mode="bilinear", padding_mode="border", align_corners=False)
    return out.view(n, *points.shape[:-1])


def _pixel_centres(height: int, width: int, device: torch.device) -> Tensor:
    """(height, width, 2) x, y centres of the pixels of a height x width raster."""
    ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)


def to_image(maps: Tensor, geometry: ImageGeometry) -> Tensor:
    """(n, h_m, w_m) grid maps -> (n, H, W) at the original image's pixels (bilinear)."""
    return sample_on_grid(maps, geometry, _pixel_centres(geometry.height, geometry.width, maps.device))


def mask_prompt(logits: Tensor, geometry: ImageGeometry, size: int) -> Tensor:
    """Coarse logits (h_m, w_m) on the grid -> SAM's mask prompt (1, 1, size, size), as F-LMM's
    ``generate_prompt_masks``: the logits at SAM's resized image, its padding at min(-1, min logit), resized
    to the prompt encoder's mask input."""
    frame = geometry.decoder
    centres = geometry.decoder_to_image(_pixel_centres(frame.resized_h, frame.resized_w, logits.device))
    inside = sample_on_grid(logits[None], geometry, centres)[0]  # (resized_h, resized_w)
    pad = inside.detach().min().clamp(max=-1.0)  # F-LMM: min(-1, masks.min()), a constant
    sides = (0, frame.input_size - frame.resized_w, 0, frame.input_size - frame.resized_h)
    region = torch.zeros(frame.input_size, frame.input_size, dtype=torch.bool, device=logits.device)
    region[: frame.resized_h, : frame.resized_w] = True
    full = torch.where(region, F.pad(inside, sides), pad)  # (input_size, input_size)
    return F.interpolate(full[None, None], (size, size), mode="bilinear", align_corners=False)


def mask_box(mask: Tensor) -> Tensor:
    """(H, W) bool -> (4,) x0, y0, x1, y1 in original pixels: the mask's bounding box with its far edges one past
    the last pixel (F-LMM's ``mask2box``), or the whole image when the mask is empty."""
    height, width = mask.shape
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(ys) == 0:
        return mask.new_tensor([0.0, 0.0, width, height], dtype=torch.float32)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def refine(
    sam: nn.Module,
    embeddings: Tensor,  # (1, d_s, h, w) SAM image embedding
    box: Tensor,  # (4,) x0, y0, x1, y1 in SAM input pixels (as ``SamProcessor`` scales boxes)
    mask: Tensor,  # (1, 1, m, m) SAM mask prompt (logits)
    text: Tensor | None = None,  # (L_t, d_s) extra sparse prompts after the box corners
) -> tuple[Tensor, Tensor]:
    """SAM's own prompt encoder and mask decoder on a box and a mask prompt (plus text tokens): what
    ``SamModel(image_embeddings, input_boxes, input_masks, multimask_output=False)`` computes. Returns
    low-resolution logits (4h, 4w) and SAM's predicted IoU ()."""
    dtype = embeddings.dtype
    sparse, dense = sam.prompt_encoder(
        input_points=None, input_labels=None, input_boxes=box.view(1, 1, 4), input_masks=mask.to(dtype)
    )  # (1, 1, 2, d_s), (1, d_s, h, w)
    if text is not None:
        sparse = torch.cat([sparse, text[None, None].to(sparse.dtype)], 2)  # (1, 1, 2 + L_t, d_s)
    masks, iou = sam.mask_decoder(
        image_embeddings=embeddings,
        image_positional_embeddings=sam.get_image_wide_positional_embeddings().to(dtype),
        sparse_prompt_embeddings=sparse.to(dtype),
        dense_prompt_embeddings=dense.to(dtype),
        multimask_output=False,
    )[:2]
    return masks[0, 0, 0], iou[0, 0, 0]


class TextPrompts(nn.Module):
    """F-LMM's text prompts for SAM: each text token's hidden states, mixed over the layers by learnt softmax
    weights (``text_layer_weights``, ones at first), projected to SAM's prompt width (``text_proj``)."""

    def __init__(self, layers: int, hidden_size: int, prompt_dim: int):
        super().__init__()
        self.layer_weights = nn.Parameter(torch.ones(layers))
        self.proj = nn.Linear(hidden_size, prompt_dim)

    def forward(self, states: Tensor) -> Tensor:
        """(layers, L_t, d) -> (L_t, d_s)."""
        weights = torch.softmax(self.layer_weights, 0)  # (layers,)
        return self.proj((weights[:, None, None] * states.float()).sum(0))


# ----- the system ------------------------------------------------------------------------------------------------


@dataclass
class FlmmInputs(LensInputs):
    maps: list[Tensor] | None = None  # per prompt (layers * heads, gh_i, gw_i) text→image attention
    text_states: list[Tensor] | None = None  # per prompt (layers, L_t, d) every layer's output at the text


@dataclass
class FlmmOutput(LensOutput):
    # per prompt (s*gh_i, s*gw_i): the U-Net's coarse logits over the attention grid, and (H_i, W_i) at image size
    coarse_logits: list[Tensor] = field(default_factory=list)
    coarse_mask_logits: list[Tensor] = field(default_factory=list)
    boxes: Tensor | None = None  # (B, 4) SAM's box prompt in original pixels
    mask_prompts: Tensor | None = None  # (B, 1, m, m) SAM's mask prompt


class FlmmModel(nn.Module):
    loss_names = ("loss", "dice_loss", "bce_loss", "coarse_dice_loss", "coarse_bce_loss")

    def __init__(self, config: LensConfig, backbone: Backbone, decoder: MaskDecoderBridge):
        super().__init__()
        if decoder.name not in SUPPORTED_DECODERS:
            raise ValueError(f"the F-LMM baseline refines with {SUPPORTED_DECODERS}, not {decoder.name!r}")
        self.config, self.backbone, self.decoder = config, backbone, decoder
        self.backbone.requires_grad_(False)
        self.decoder.cls_position.requires_grad_(False)  # LENS's [CLS] position: no part of F-LMM's prompts
        spec = backbone.layer_spec()
        layers = len(backbone.decoder_layers)
        self.unet = AttentionUNet(
            layers * spec.num_heads, config.baseline.flmm_width, upsample_to=config.baseline.flmm_upsample
        )
        self.text = TextPrompts(layers, spec.hidden_size, decoder.prompt_dim)
        self.mask_size = 4 * decoder.sam.config.prompt_encoder_config.image_embedding_size

    @property
    def device(self) -> torch.device:
        return self.text.proj.weight.device

    def trainable_names(self) -> list[str]:
        """The U-Net, the text mix and projection, SAM's mask decoder (as ``decoder.train_mask_decoder`` says)."""
        return requires_grad_names(self)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return trainable_tensors(self, self.trainable_names())

    def prepare(
        self,
        images: Sequence[Image.Image],
        instructions: Sequence[str],
        masks: Sequence[np.ndarray | Tensor] | None = None,
    ) -> FlmmInputs:
        """The MLLM through every layer with each head's attention kept, and SAM's image embedding once per image
        (inference mode; the results are cloned out of it so the trainable part can take gradients)."""
        with torch.inference_mode():
            with kept_per_layer(self.backbone) as kept:
                features, _ = self.backbone.layer_attentions(
                    images, instructions, decoder_frame=self.decoder.frame
                )
            attentions = [kept.attentions[i] for i in range(len(kept.attentions))]
            hidden = [kept.hidden[i] for i in range(len(kept.hidden))]
            maps = text_image_head_maps(features, attentions)
            text = text_hidden_states(features, hidden, attentions)
            del kept, attentions, hidden
            if features.image_index is None:
                distinct, index = unique_images(images)
            else:
                index = features.image_index
                distinct = [images[i] for i in first_of_each(index)]
            embeddings = self.decoder.embed_images(distinct)
        embeddings = self.decoder.select(embeddings.clone(), index)
        targets = mask_targets(masks)
        return FlmmInputs(features, embeddings, targets, [m.clone() for m in maps], [t.clone() for t in text])

    def coarse(self, maps: list[Tensor], geometries: list[ImageGeometry]) -> list[Tensor]:
        """Per prompt, the U-Net's coarse mask logits (s*gh_i, s*gw_i); prompts with one grid size run together."""
        out: list[Tensor | None] = [None] * len(maps)
        sizes = [tuple(m.shape[-2:]) for m in maps]
        for size in dict.fromkeys(sizes):
            members = [i for i, s in enumerate(sizes) if s == size]
            stack = torch.stack([maps[i] for i in members]).to(self.device, torch.float32)  # (n, C, gh, gw)
            valid = torch.stack([geometries[i].valid_cells(self.device) for i in members])  # (n, gh, gw)
            for i, logits in zip(members, self.unet(stack, valid), strict=True):
                out[i] = logits
        return out  # type: ignore[return-value]

    def forward(self, inputs: FlmmInputs) -> FlmmOutput:
        f = inputs.features
        geometries = f.geometries
        coarse = self.coarse(inputs.maps, geometries)  # per prompt (s*gh, s*gw)
        coarse_image = [to_image(c[None], g)[0] for c, g in zip(coarse, geometries, strict=True)]  # (H, W)

        embeddings = self.decoder.move(inputs.decoder_embeddings, self.device)
        sam = self.decoder.sam
        low_res, iou, boxes, prompts = [], [], [], []
        for b, g in enumerate(geometries):
            # F-LMM's refiner: the box of the coarse mask (detached: a box has no gradient), the coarse logits as
            # the mask prompt (with gradient: SAM's loss reaches the U-Net through it), the text tokens.
            box = mask_box(coarse_image[b].detach() > 0)  # sigmoid > 0.5
            prompt = mask_prompt(coarse[b], g, self.mask_size)
            text = self.text(inputs.text_states[b].to(self.device))  # (L_t, d_s)
            box_in_sam = g.image_to_decoder(box.view(2, 2)).view(4)
            logits, score = refine(sam, embeddings[b : b + 1], box_in_sam, prompt, text)
            low_res.append(logits)
            iou.append(score)
            boxes.append(box)
            prompts.append(prompt[0])
        low_res_t = torch.stack(low_res)  # (B, 4h, 4w)
        mask_logits = [g.postprocess_masks(x.float()) for g, x in zip(geometries, low_res_t, strict=True)]

        # The grounding map: the coarse mask's probability per attention cell, zero off each image's grid cells.
        gh, gw = f.max_grid
        per_cell = [
            F.avg_pool2d(c.detach().float().sigmoid()[None], upsample_factor(*size, self.unet.upsample_to))[
                0
            ]  # (gh_i, gw_i)
            for c, size in zip(coarse, f.grid_sizes.tolist(), strict=True)
        ]
        cells = valid_cell_mask(geometries, gh, gw, self.device)
        attention_map = pad_grids(per_cell, gh, gw) * cells
        B = len(geometries)
        out = FlmmOutput(
            mask_logits,
            low_res_t,
            torch.stack(iou),
            attention_map,
            torch.zeros(B, 0, 2, device=self.device),
            torch.zeros(B, 0, dtype=torch.bool, device=self.device),
            coarse_logits=coarse,
            coarse_mask_logits=coarse_image,
            boxes=torch.stack(boxes),
            mask_prompts=torch.stack(prompts),
        )
        if inputs.masks is not None:
            targets = [m.to(self.device) for m in inputs.masks]
            refined = mask_losses(mask_logits, targets, self.config.loss)
            first = mask_losses(coarse_image, targets, self.config.loss)
            out.loss = refined["loss"] + first["loss"]  # F-LMM: both masks, equally weighted
            out.losses = {
                "dice_loss": refined["dice_loss"],
                "bce_loss": refined["bce_loss"],
                "coarse_dice_loss": first["dice_loss"],
                "coarse_bce_loss": first["bce_loss"],
            }
        return out


def build(config: LensConfig, device: str | torch.device = "cpu") -> FlmmModel:
    """The frozen MLLM and SAM ``config`` names, with a fresh U-Net, text projection and SAM's mask decoder
    as pretrained (``lens.weights.load_lens_weights`` fills them from a checkpoint)."""
    from lens.weights import load_frozen

    backbone, decoder = load_frozen(config, device)
    model = FlmmModel(config, backbone, decoder)
    if config.backbone.quantization:  # bitsandbytes weights are placed at load and cannot be moved
        for name, child in model.named_children():
            if name != "backbone":
                child.to(device)
        return model
    return model.to(device)
