"""SELF1E (Zhang et al. 2025): the fine-tuned MLLM segments by itself, from one segmentation token, no decoder.

"Rethinking MLLM Itself as a Segmenter with a Single Segmentation Token" (github.com/ANDYZAQ/SELF1E). The MLLM
is fine-tuned as LISA fine-tunes it (``lens.baselines.seg_token``: LoRA, trainable embeddings and LM head, the
reply "Sure, it is [SEG]."), and the mask is a dot product, per pixel, of a projection of the ``[SEG]`` state
with image features the MLLM itself computed:

* image features: the last-layer states of the image tokens, *refilled* with the pre-LLM image features (the
  projector output the LLM read), each widened by an MLP to ``s²`` times its width and rearranged into an
  ``s``-times finer map (depth-to-space, SELF1E's "pixel-unshuffle"), summed, then one more MLP;
* the ``[SEG]`` state through the same widening MLP, its ``s²`` pieces averaged, then the same last MLP;
* mask logits = features · seg / sqrt(d) on the ``s``·grid, resized to the original image through the grid
  frame (LLaVA's pad-to-square undone); SELF1E also supervises the LLM branch alone (an auxiliary mask);
* attention: the image tokens attend to each other both ways and to the ``[SEG]`` token after them (SELF1E's
  image-to-image and image-to-segmentation pathways), a 4-D mask handed to the transformers model.

No SAM runs: ``decoder`` is ``NoMaskDecoder``, a stand-in that answers the calls the loop makes of a decoder
(its image embeddings are empty). Where this differs from SELF1E, and why: docs/baselines.md.

    lens train configs/synthetic.yaml --set baseline.system=self1e --output-dir runs/self1e
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from lens.backbone import LlavaBackbone
from lens.baselines.common import mask_losses, requires_grad_names
from lens.baselines.seg_token import Conversation, SegTokenMLLM
from lens.config import LensConfig
from lens.decoders import MaskDecoderBridge
from lens.geometry import DecoderFrame, GridFrame, ImageGeometry
from lens.model import LensInputs, LensOutput, mask_targets, trainable_tensors

UPSCALE = 2  # s: SELF1E's 1 / downsample_ratio, each grid cell becomes s x s mask pixels before resizing
LOSS_NAMES = ("loss", "ce_loss", "dice_loss", "bce_loss")


class NoMaskDecoder(MaskDecoderBridge):
    """The decoder slot of a system that has none: SELF1E decodes masks from the MLLM itself.

    The loop and the checkpoints ask a decoder for ``move``, ``dtype``, ``name`` and ``trainable_names``; this
    answers them without loading SAM (gigabytes that would never run) or running its image encoder. Its image
    embeddings are empty tensors (B, 0), and a checkpoint's metadata names it ``"none"``.
    """

    name = "none"
    prompt_dim = 0

    def frame(self, width: int, height: int) -> DecoderFrame:
        return DecoderFrame.identity(width, height)  # the original pixels: masks are made there directly

    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        return torch.zeros(len(images), 0)

    def forward(self, embeddings, descriptions, points, valid):  # noqa: ANN001 - never called
        raise RuntimeError("SELF1E has no mask decoder: its masks come from the MLLM's own features")

    def drop_image_encoder(self) -> None:
        pass

    def trainable_names(self) -> list[str]:
        return []

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32


def _mlp(width: int, out: int) -> nn.Sequential:
    """SELF1E's ``combine_decode_proj*``: Linear, GELU, Linear."""
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out))


class Self1eHead(nn.Module):
    """Image features and the segmentation vector, from the MLLM's own states (SELF1E's RFR + RFA).

    Names follow SELF1E: ``expand_llm`` is ``combine_decode_proj_all`` (LLM states, and the [SEG] state),
    ``expand_vision`` is ``combine_decode_proj_ori`` (pre-LLM features), ``fuse`` is ``combine_decode_proj``.
    """

    def __init__(self, hidden_size: int, scale: int = UPSCALE):
        super().__init__()
        self.scale = scale
        wide = hidden_size * scale * scale
        self.expand_llm = _mlp(hidden_size, wide)
        self.expand_vision = _mlp(hidden_size, wide)
        self.fuse = _mlp(hidden_size, hidden_size)

    def _finer(self, cells: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, N, d s²) row-major cells -> (B, s gh, s gw, d): each cell's s² pieces laid out as s x s pixels."""
        gh, gw = grid
        x = cells.transpose(1, 2).reshape(cells.shape[0], -1, gh, gw)  # (B, d s², gh, gw)
        return F.pixel_shuffle(x, self.scale).permute(0, 2, 3, 1)

    def forward(
        self, llm: Tensor, vision: Tensor, seg: Tensor, grid: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Mask logits on the ``s``-finer grid: (B, s gh, s gw) from the fused features, and (B, s gh, s gw)
        from the LLM branch alone (SELF1E's auxiliary ``seg_prob_low``).

        Arguments:
            llm: (B, N, d) last-layer states of the image tokens (row-major cells).
            vision: (B, N, d) the projector's output at those tokens: what the LLM read.
            seg: (B, d) last-layer state of the segmentation token.
        """
        llm_map = self._finer(self.expand_llm(llm), grid)  # (B, s gh, s gw, d)
        features = self.fuse(llm_map + self._finer(self.expand_vision(vision), grid))  # (B, s gh, s gw, d)
        wide = self.expand_llm(seg)[:, :, None, None]  # (B, d s², 1, 1)
        query = self.fuse(F.pixel_shuffle(wide, self.scale).mean((2, 3)))  # (B, d)
        root = math.sqrt(query.shape[-1])
        logits = torch.einsum("bhwc,bc->bhw", features, query) / root
        low = torch.einsum("bhwc,bc->bhw", llm_map, query) / root
        return logits, low


def self1e_attention_mask(
    attention_mask: Tensor, image_positions: Tensor, seg_positions: Tensor, dtype: torch.dtype
) -> Tensor:
    """SELF1E's attention (``get_cus_attn_mask_seg``): causal, except that the image tokens attend to every
    image token and to the segmentation tokens (after them), in rows that hold one; padding is never attended.

    Arguments:
        attention_mask: (B, L) 1 on real tokens (right padding).
        image_positions: (B, N) positions of the image tokens.
        seg_positions: (B, L) bool, True at segmentation tokens.

    Returns:
        (B, 1, L, L) additive mask in ``dtype`` (0 where attended, the dtype's minimum elsewhere), as the
        transformers models take a prepared 4-D mask.
    """
    B, L = attention_mask.shape
    device = attention_mask.device
    is_image = torch.zeros(B, L, dtype=torch.bool, device=device).scatter_(1, image_positions, True)
    is_image &= seg_positions.any(1, keepdim=True)  # only a segmentation request opens the image tokens
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()  # (L, L) query i sees keys j <= i
    seen = is_image | seg_positions  # (B, L) keys an image token sees wherever they are
    allowed = causal[None] | (is_image[:, :, None] & seen[:, None, :])  # (B, L, L)
    allowed &= attention_mask.bool()[:, None, :]
    allowed |= torch.eye(L, dtype=torch.bool, device=device)  # every token sees itself, as SELF1E ensures
    mask = torch.zeros(B, 1, L, L, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def grid_map_to_image(frame: GridFrame, logits: Tensor) -> Tensor:
    """Logits (..., h, w) spread evenly over the attention grid (any multiple of it) -> (..., H, W) at the
    original image, bilinear at each pixel's centre: the grid's padding (LLaVA's pad to square) falls away.

    The map covers the grid's extent ``origin + [0, grid * cell)`` on each axis; pixel centre ``x + 0.5`` sits at
    ``(x + 0.5 - origin) / (grid * cell)`` of it. Differentiable, no binarising.
    """
    lead, (h, w) = logits.shape[:-2], logits.shape[-2:]
    x = logits.reshape(-1, 1, h, w).float()
    xs = (torch.arange(frame.width, device=x.device) + 0.5 - frame.origin_x) / (frame.grid_w * frame.cell_w)
    ys = (torch.arange(frame.height, device=x.device) + 0.5 - frame.origin_y) / (frame.grid_h * frame.cell_h)
    grid = torch.stack(torch.meshgrid(xs * 2 - 1, ys * 2 - 1, indexing="xy"), -1)  # (H, W, 2) as x, y
    out = F.grid_sample(
        x, grid.expand(x.shape[0], -1, -1, -1).to(x.dtype), mode="bilinear", align_corners=False,
        padding_mode="border",
    )  # fmt: skip
    return out.reshape(*lead, frame.height, frame.width)


@dataclass
class Self1eInputs(LensInputs):
    """``features`` is None: SELF1E reads the whole fine-tuned MLLM's forward, not LENS's layer-k features."""

    conversation: Conversation | None = None  # prompt + answer, tokenized, with the images' pixels
    geometries: list[ImageGeometry] | None = None  # per prompt: its image's grid frame


class Self1eModel(nn.Module):
    """The fine-tuned MLLM (``SegTokenMLLM``) and ``Self1eHead``; wired as ``LensModel`` for the loop and
    ``lens.evaluation``. Trains: the LoRA adapters, the embeddings and LM head, the head's three MLPs."""

    loss_names = LOSS_NAMES

    def __init__(self, config: LensConfig, backbone: LlavaBackbone):
        super().__init__()
        if not isinstance(backbone, LlavaBackbone):
            raise NotImplementedError(
                f"SELF1E needs the image tokens as one row-major grid (LLaVA-1.5), not {type(backbone).__name__}"
            )
        self.config = config
        self.mllm = SegTokenMLLM(backbone, config.baseline)
        self.head = Self1eHead(self.mllm.hidden_size).to(self.mllm.device)
        self.decoder = NoMaskDecoder()

    @property
    def backbone(self) -> LlavaBackbone:
        return self.mllm.backbone  # registered once, under ``mllm``: one name per trained tensor

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
    ) -> Self1eInputs:
        """Tokenize prompt + answer and note each image's grid frame. No model runs here: every stage of the
        MLLM's forward is in the trained path, and the vision tower runs inside it (SAM never runs)."""
        conversation = self.mllm.conversation(images, instructions)
        geometries = [
            ImageGeometry(
                self.backbone.grid_frame(im.width, im.height), self.decoder.frame(im.width, im.height)
            )
            for im in images
        ]
        targets = mask_targets(masks)
        embeddings = self.decoder.embed_images(images)
        return Self1eInputs(None, embeddings, targets, conversation, geometries)  # type: ignore[arg-type]

    def forward(self, inputs: Self1eInputs) -> LensOutput:
        conversation = inputs.conversation.to(self.device)
        ids = conversation.inputs["input_ids"]
        attention = self1e_attention_mask(
            conversation.inputs["attention_mask"],
            conversation.image_positions,
            ids == self.mllm.seg_token_id,
            _compute_dtype(self.backbone.model),
        )
        conversation = dataclasses.replace(
            conversation, inputs={**conversation.inputs, "attention_mask": attention}
        )
        with _output_of(self.backbone.model.model.multi_modal_projector) as projected:
            out = self.mllm(conversation)
        gh, gw = self.backbone.grid_size
        positions = conversation.image_positions  # (B, N)
        if positions.shape[1] != gh * gw:
            raise ValueError(f"expected {gh * gw} image tokens per prompt, got {positions.shape[1]}")
        rows = torch.arange(len(ids), device=self.device)[:, None]
        dtype = self.head.fuse[0].weight.dtype
        llm = out.hidden_states[rows, positions].to(dtype)  # (B, N, d)
        vision = projected[0].to(dtype)  # (B, N, d): one row per prompt, its image's tokens
        logits, low = self.head(llm, vision, out.seg_hidden.to(dtype), (gh, gw))  # (B, s gh, s gw) each
        geometries = inputs.geometries
        mask_logits = [grid_map_to_image(g.grid, x) for g, x in zip(geometries, logits, strict=True)]
        s = self.head.scale
        heat = torch.sigmoid(logits.detach().float()).view(-1, gh, s, gw, s).mean((2, 4))  # (B, gh, gw)
        B = len(ids)
        result = LensOutput(
            mask_logits,
            logits,
            logits.new_zeros(B),  # no IoU head
            heat,
            logits.new_zeros(B, 0, 2),  # no keypoints
            torch.zeros(B, 0, dtype=torch.bool, device=self.device),
        )
        if inputs.masks is not None:
            targets = [m.to(self.device) for m in inputs.masks]
            main = mask_losses(mask_logits, targets, self.config.loss)
            aux = mask_losses(
                [grid_map_to_image(g.grid, x) for g, x in zip(geometries, low, strict=True)],
                targets,
                self.config.loss,
            )  # SELF1E adds the LLM branch's own mask to the same Dice and BCE sums
            losses = {k: main[k] + aux[k] for k in ("dice_loss", "bce_loss")}
            mask_loss = main["loss"] + aux["loss"]
            result.loss = self.config.baseline.ce_weight * out.ce_loss + mask_loss
            result.losses = {"ce_loss": out.ce_loss, **losses}
        return result


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype attention scores have: autocast's where it is on, else the model's."""
    device = next(model.parameters()).device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return next(model.parameters()).dtype


@contextmanager
def _output_of(module: nn.Module) -> Iterator[list[Tensor]]:
    """The outputs ``module`` returns while the block runs (a forward hook, removed after): the projector's,
    read from the very forward that feeds the LLM rather than by running the vision tower twice."""
    seen: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _args, output: seen.append(output))
    try:
        yield seen
    finally:
        handle.remove()


def build(config: LensConfig, device: str | torch.device = "cpu") -> Self1eModel:
    """The pretrained MLLM ``config`` names, made a SELF1E segmenter (fresh LoRA, tokens, head). SAM is not
    loaded: nothing of it would run."""
    from lens.weights import load_frozen_backbone

    return Self1eModel(config, load_frozen_backbone(config, device))
