"""Typed configuration. Every hyper-parameter of the paper has exactly one home here, with its default.

Configs are plain dataclasses so they read like documentation, round-trip through YAML, and are saved
beside every checkpoint (``lens_config.yaml``) so weights never travel without the model they belong to.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lens.errors import InvalidConfig
from lens.validation import check_field, field_hints

T = TypeVar("T")

LR_SCHEDULES = ("linear", "cosine")  # transformers.get_scheduler names we document and test


@dataclass
class BackboneConfig:
    """The frozen MLLM. Nothing here is trained."""

    name: str = "llava"  # key in lens.backbone.BACKBONES
    model_id: str = "llava-hf/llava-1.5-7b-hf"  # hub id or local directory
    revision: str | None = None
    layer: int = 14  # k: the head reads the output of decoder layer k (1-based; paper: 14 of 32)
    dtype: str = "bfloat16"  # dtype the frozen MLLM runs in ("float32" on CPU)
    quantization: str | None = None  # "4bit" | "8bit": bitsandbytes weights (CUDA only, extra `quant`)


@dataclass
class HeadConfig:
    """The two-layer segmentation head (paper §3.1); its shape mirrors one backbone decoder layer."""

    # copy the weights of backbone layers k+1 and k+2 into the head (needs k <= the MLLM's depth - 2)
    init_from_backbone: bool = False


@dataclass
class KeypointConfig:
    """Keypoint extraction (paper §3.2, S1.1-S1.2)."""

    max_points: int = 16  # m (= N in S1.1): at most this many keypoints per image
    nms_radius: float = 4.0  # r: suppression radius, in attention-grid cells (Euclidean)
    subpixel: bool = True  # S1.2's Newton step after NMS; false: the NMS cells as they are (an ablation)
    subpixel_eps: float = 1e-6  # ε: Tikhonov term of the regularised Newton step
    neighbourhood: int = 3  # p: a p×p patch of layer-2 features is sampled around each keypoint


@dataclass
class DescriptorConfig:
    """The descriptor model (paper S1.3-S1.4)."""

    num_heads: int = 8
    global_only_prob: float = 0.5  # S1.4: during training, use only the global description with this prob.
    # Ablations (docs/training.md, "Ablation switches"); the defaults are the paper's method. False: only f_s
    # prompts the decoder (Table 2 "w/o keypoint description"); only the keypoints do ("w/o global description").
    keypoint_descriptions: bool = True
    global_description: bool = True
    width: int | None = None  # attend at this width (f_s, neighbourhoods projected to it); None: the MLLM's

    def __post_init__(self) -> None:
        if not (self.keypoint_descriptions or self.global_description):
            raise InvalidConfig(
                "descriptor.keypoint_descriptions and descriptor.global_description cannot both be false: "
                "nothing would prompt the mask decoder"
            )


@dataclass
class DecoderConfig:
    """The mask decoder (paper §3.3)."""

    name: str = "sam"  # key in lens.decoders.DECODERS; a checkpoint only loads into the decoder it names
    model_id: str = "facebook/sam-vit-huge"  # hub id or local directory
    revision: str | None = None
    train_mask_decoder: bool = True  # SAM's image encoder and prompt encoder always stay frozen
    mask_threshold: float = 0.0  # logits above this are foreground (reference protocol)
    # Speed of the frozen image encoder (docs/performance.md); none of these change trained weights.
    attn_implementation: str = "sdpa"  # "sdpa" (fused) | "eager"; outputs agree to float tolerance
    image_encoder_dtype: str | None = None  # e.g. "bfloat16": the encoder alone in it (sam, sam_hq)
    compile_image_encoder: bool = False  # torch.compile the encoder (pays on a GPU after warm-up)


@dataclass
class LossConfig:
    """L = λ_dice·Dice + λ_bce·BCE on the mask, plus λ_attn·BCE(A_c, M) (paper eq. 5-7, §4.1)."""

    dice_weight: float = 2.0
    bce_weight: float = 4.0
    attention_weight: float = 1.0


@dataclass
class TrainConfig:
    """Optimisation (paper §4.1; other settings follow LISA)."""

    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    max_steps: int = 5000
    lr_schedule: str = "linear"  # decay after warm-up: "linear" (LISA's WarmupDecayLR) or "cosine"
    batch_size: int = 2
    grad_accum_steps: int = 10
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"  # "no" | "fp16" | "bf16"
    seed: int = 0
    # start the trainable weights from this LENS checkpoint (directory or lens: asset), with a fresh optimizer
    # and schedule: a warm restart or a fine-tune; None: initialise them as the builders do
    init_from: str | None = None
    # the loop's cadence: these change no trained weight, but belong to the recipe a run is repeated with
    save_every: int = 500  # optimizer steps between resumable checkpoints
    keep_checkpoints: int = 2  # older ones are deleted
    eval_every: int = 500  # optimizer steps between validations (and at the last step); 0: last step only
    eval_limit: int | None = 200  # validation items per evaluation (None: the whole split)
    eval_batch_size: int = 8
    log_every: int = 10  # optimizer steps between tracker (TensorBoard) logs; train_log.jsonl has every step

    def __post_init__(self) -> None:
        # checked before any step runs, so a typo never costs a run (or a ZeroDivisionError at step 1)
        for name, low in (("save_every", 1), ("eval_every", 0), ("log_every", 1), ("keep_checkpoints", 1),
                          ("eval_batch_size", 1), ("max_steps", 1), ("batch_size", 1), ("grad_accum_steps", 1),
                          ("warmup_steps", 0)):  # fmt: skip
            if getattr(self, name) < low:
                raise ValueError(f"train.{name} must be >= {low}, got {getattr(self, name)}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(
                f"train.eval_limit must be >= 1 or null (the whole split), got {self.eval_limit}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )


@dataclass
class DataConfig:
    """Where training / evaluation data live. Unset roots are skipped and the mixture renormalised."""

    # plug-in datasets (lens.data.registry) by name -> their options, e.g. {"synthetic": {"seed": 0}}
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    reason_seg_root: str | None = None  # contains train/ val/ test/ of ReasonSeg
    refer_root: str | None = None  # contains refcoco/ refcoco+/ refcocog/ refclef/ (REFER layout)
    coco_image_root: str | None = None  # COCO train2014 images for the refcoco family
    saiapr_image_root: str | None = None  # images for refclef
    semantic_roots: dict[str, str] = field(
        default_factory=dict
    )  # source name -> root (see lens.data.semantic)
    mixture: dict[str, float] = field(default_factory=lambda: {"sem": 9.0, "refer": 3.0, "reason": 1.0})
    num_classes_per_sample: int = 3  # semantic datasets: classes asked about per image
    val_split: str = "val"
    num_workers: int = 2


BASELINE_SYSTEMS = ("lisa", "read", "flmm", "self1e")  # trained comparison systems (lens.baselines)


@dataclass
class BaselineConfig:
    """A comparison system trained and scored in LENS's place (``lens.baselines``, docs/baselines.md).

    ``system`` null is LENS itself. Otherwise ``lens train`` / ``lens eval`` build that system from the same
    frozen MLLM and SAM named above, on the same data, loop and metrics; the fields below are its own
    settings (each system reads only its own) and are saved with its checkpoint like every other setting.
    """

    system: str | None = None  # one of BASELINE_SYSTEMS, or null for LENS
    # LISA / READ / SELF1E: the MLLM fine-tuned with LoRA (LISA: r 8, alpha 16, dropout 0.05 on q and v),
    # plus its embeddings and LM head, to answer ``answer``, whose ``seg_token`` is a new token
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    seg_token: str = "[SEG]"
    answer: str = "Sure, it is [SEG]."  # LISA's segmentation reply
    ce_weight: float = 1.0  # the answer's language-model loss next to the mask loss (LISA: 1.0)
    # READ's "similarity as points": on the min-max normalised [SEG]-to-image similarity map, cells >= the
    # positive threshold become positive clicks (most similar first), cells <= the negative one negative clicks
    # (least similar first), at most read_points in all (READ-7B: 30, 0.8, 0.2 on its 12 x 12 map)
    read_points: int = 30
    read_positive: float = 0.8
    read_negative: float = 0.2
    # F-LMM: base channel width of the U-Net that maps the stacked attention maps to mask logits
    flmm_width: int = 32
    # F-LMM's ``upsample_input``: the attention stack is upsampled to about this many cells a side first
    flmm_upsample: int = 64


@dataclass
class LensConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    keypoints: KeypointConfig = field(default_factory=KeypointConfig)
    descriptor: DescriptorConfig = field(default_factory=DescriptorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LensConfig:
        return _from_dict(cls, _migrate(data), "config")

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def override(self, assignments: list[str]) -> LensConfig:
        """A copy with ``section.key=value`` assignments applied (values parsed as YAML): the CLI's ``--set``."""
        data = self.to_dict()
        for assignment in assignments:
            dotted, sep, text = assignment.partition("=")
            *path, last = dotted.strip().split(".")
            if not sep or not path:
                raise ValueError(f"--set expects section.key=value, got {assignment!r}")
            node = data
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"--set {assignment!r}: {part!r} is a value, not a section")
            value = yaml.safe_load(text)  # an unknown key is named by from_dict
            if (
                isinstance(node.get(last), float)
                and isinstance(value, str | int)
                and not isinstance(value, bool)
            ):
                value = _as_float(value, assignment)  # YAML 1.1 reads "1e-3" as a string
            node[last] = value
        return LensConfig.from_dict(data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> LensConfig:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:  # one line: where the YAML broke
            raise InvalidConfig(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
        if data is None:  # an empty file must not silently mean "paper defaults" (and a hub download)
            raise InvalidConfig(f"{path} is empty; a LENS config needs at least one section")
        if not isinstance(data, dict):
            raise InvalidConfig(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except InvalidConfig as err:
            raise InvalidConfig(f"{path}: {err}") from None


def _as_float(value: str | int, assignment: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--set {assignment!r}: expected a number") from None


# Keys of configs saved before plug-in datasets had their own section: old key -> key in data.datasets.synthetic
_LEGACY_DATA_KEYS = {"synthetic_seed": "seed", "synthetic_eval_scenes": "eval_scenes"}


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Read configs (and shipped checkpoints) written with ``data.synthetic_seed`` / ``synthetic_eval_scenes``."""
    section = data.get("data")
    if not isinstance(section, dict) or not set(_LEGACY_DATA_KEYS) & set(section):
        return data
    section = dict(section)
    legacy = {new: section.pop(old) for old, new in _LEGACY_DATA_KEYS.items() if old in section}
    if legacy.get("seed") is not None:  # a null seed meant "not the synthetic world"
        section["datasets"] = {"synthetic": legacy, **section.get("datasets", {})}
    return {**data, "data": section}


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build a (nested) dataclass from a dict, naming any unknown key instead of silently dropping it."""
    if not isinstance(data, dict):
        raise InvalidConfig(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InvalidConfig(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = field_hints(cls)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = (
            fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        )
        sub = default() if default is not None else None
        if dataclasses.is_dataclass(sub):
            kwargs[name] = _from_dict(type(sub), value, f"{where}.{name}")
        else:  # type and range from the field's annotation (lens.validation), naming the field
            kwargs[name] = check_field(cls, name, hints[name], value, f"{where}.{name}")
    return cls(**kwargs)
