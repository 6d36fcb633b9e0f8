"""Building is separate from loading: ``build_lens`` makes a model from a config (frozen parts pretrained,
trainable parts fresh), ``load_lens_weights`` fills the trainable parts from a safetensors file.

``build_lens_for_cache`` builds the same model without the frozen MLLM and the decoder's image encoder, for training
and evaluating on a feature cache (``lens.cache``).

A LENS checkpoint is a directory with ``lens_config.yaml`` and ``model.safetensors`` holding only the
trainable tensors (head, descriptor, the decoder's ``trainable_names``): the frozen MLLM and image encoder are
referenced by id, never copied. The config (and the safetensors metadata) name the decoder the weights belong
to; loading them into another decoder is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from lens.assets import resolve_model_id
from lens.backbone import BACKBONES, Backbone, BackboneFeatures, LayerSpec, load_backbone
from lens.config import BackboneConfig, LensConfig
from lens.decoders import MaskDecoderBridge, load_decoder
from lens.errors import InvalidCheckpoint
from lens.io import atomic_write
from lens.model import LensModel

logger = logging.getLogger(__name__)

CONFIG_NAME = "lens_config.yaml"
WEIGHTS_NAME = "model.safetensors"


DECODER_KEY = "decoder"  # safetensors metadata: the decoder name the weights belong to


def _load_decoder(config: LensConfig, device: str | torch.device = "cpu") -> MaskDecoderBridge:
    return load_decoder(
        dataclasses.replace(config.decoder, model_id=resolve_model_id(config.decoder.model_id)), device
    )


def load_frozen_backbone(config: LensConfig, device: str | torch.device = "cpu") -> Backbone:
    """The pretrained MLLM ``config`` names (a ``lens:`` asset resolved)."""
    backbone_config = dataclasses.replace(
        config.backbone, model_id=resolve_model_id(config.backbone.model_id)
    )
    return load_backbone(backbone_config, device=device)


def load_frozen(config: LensConfig, device: str | torch.device = "cpu") -> tuple[Backbone, MaskDecoderBridge]:
    """The pretrained MLLM and mask decoder ``config`` names (``lens:`` assets resolved), as LENS loads them."""
    decoder = _load_decoder(config, device)
    return load_frozen_backbone(config, device), decoder


def build_lens(config: LensConfig, device: str | torch.device = "cpu") -> LensModel:
    """Load the frozen MLLM and mask decoder named in ``config`` and attach freshly initialised LENS parts.

    A config naming a comparison system (``baseline.system``) builds that system from the same two models
    instead (``lens.baselines``): it trains, saves, loads and evaluates through the same calls as LENS.
    """
    if config.baseline.system is not None:
        from lens.baselines import build_system

        return build_system(config, device)
    backbone, decoder = load_frozen(config, device)
    model = LensModel(config, backbone, decoder)
    if config.backbone.quantization:  # bitsandbytes weights are placed at load and cannot be moved
        for name, child in model.named_children():
            if name != "backbone":
                child.to(device)
        return model
    return model.to(device)


def save_lens_weights(model: LensModel, directory: str | Path) -> Path:
    """Write config + trainable weights atomically: a crash mid-save never corrupts an existing checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    metadata = {DECODER_KEY: model.decoder.name}
    for name, write in (
        (WEIGHTS_NAME, lambda p: save_file(state, p, metadata=metadata)),
        (CONFIG_NAME, model.config.to_yaml),
    ):
        atomic_write(directory / name, write)
    return directory


def load_lens_weights(model: LensModel, path: str | Path) -> LensModel:
    """Fill the trainable parts of ``model`` from a checkpoint directory, ``.safetensors`` file or ``lens:`` id."""
    path = Path(resolve_model_id(str(path)))  # a directory, a .safetensors file or a shipped lens: id
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no LENS weights at {file}")
    try:
        _check_decoder(model, file, path / CONFIG_NAME if path.is_dir() else file.parent / CONFIG_NAME)
        state = load_file(str(file), device=str(model.device))
    except (SafetensorError, OSError) as err:  # truncated, or not safetensors at all: name the file
        raise InvalidCheckpoint(f"{file} is not a readable safetensors file ({err})") from None
    expected = model.trainable_state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{file} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{file}: {name} has shape {tuple(tensor.shape)}, model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False)
    return model


def _check_decoder(model: LensModel, file: Path, config_file: Path) -> None:
    """Refuse weights trained with another decoder (named in the file's metadata or the checkpoint's config)."""
    with safe_open(str(file), framework="pt") as handle:
        found = (handle.metadata() or {}).get(DECODER_KEY)
    if found is None and config_file.is_file():
        found = LensConfig.from_yaml(config_file).decoder.name
    if found is not None and found != model.decoder.name:
        raise ValueError(
            f"{file} holds weights for the {found!r} decoder, not this model's {model.decoder.name!r}"
        )


def checkpoint_config(checkpoint: str | Path) -> tuple[Path, LensConfig]:
    """The directory of a LENS checkpoint (a path or ``lens:`` asset) and the config it was trained with."""
    directory = Path(resolve_model_id(str(checkpoint)))
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory} is not a LENS checkpoint (no {CONFIG_NAME})")
    return directory, LensConfig.from_yaml(directory / CONFIG_NAME)


def load_lens(directory: str | Path, device: str | torch.device = "cpu") -> LensModel:
    """A trained LENS from a checkpoint directory (or ``lens:`` asset): its config, frozen models, weights."""
    directory, config = checkpoint_config(directory)
    return load_lens_weights(build_lens(config, device), directory)


# Models for cached features (``lens.cache``): the frozen encoders' outputs come from disk.


class SpecBackbone(Backbone):
    """Stands in for the frozen MLLM when features come from a cache: it knows one layer's shape, no weights."""

    def __init__(self, spec: LayerSpec, layer: int):
        super().__init__()
        self.spec, self.layer = spec, layer

    def layer_spec(self) -> LayerSpec:
        return self.spec

    def encode(
        self, images: Sequence[Image.Image], instructions: Sequence[str], decoder_frame=None, prefix=None
    ) -> BackboneFeatures:
        raise RuntimeError(
            "this LENS model reads cached features and holds no MLLM; build it with build_lens"
        )


def backbone_spec(config: BackboneConfig) -> LayerSpec:
    """The head's layer shape from the MLLM's config alone: the model is built on the meta device, never loaded."""
    model_id = resolve_model_id(config.model_id)  # a hub id, a directory or a shipped ``lens:`` asset
    hf_config = AutoConfig.from_pretrained(model_id, revision=config.revision)
    with torch.device("meta"):
        hf_model = AutoModelForImageTextToText.from_config(hf_config)
    processor = AutoProcessor.from_pretrained(model_id, revision=config.revision)
    return BACKBONES[config.name](hf_model, processor, layer=config.layer).layer_spec()


def strip_frozen_encoders(model: LensModel) -> LensModel:
    """Drop the MLLM and the decoder's image encoder from ``model`` (in place): what training on a cache needs."""
    model.backbone = SpecBackbone(model.backbone.layer_spec(), model.backbone.layer)
    model.decoder.drop_image_encoder()
    return model


def build_lens_for_cache(config: LensConfig, device: str | torch.device = "cpu") -> LensModel:
    """A LENS model for cached features: the decoder without its image encoder, the head, no MLLM in memory."""
    if config.baseline.system is not None:
        raise ValueError(
            f"baseline {config.baseline.system!r} reads more of the MLLM than a LENS feature cache holds: "
            "train and evaluate it without --cache-root"
        )
    if config.head.init_from_backbone:  # the head copies two MLLM layers: load it once, then drop it
        return strip_frozen_encoders(build_lens(config, "cpu")).to(device)
    decoder = _load_decoder(config)
    model = LensModel(config, SpecBackbone(backbone_spec(config.backbone), config.backbone.layer), decoder)
    return strip_frozen_encoders(model).to(device)
