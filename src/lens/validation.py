"""Type and range checks of config values, read from the config dataclasses' own type hints.

``lens.config._from_dict`` calls ``check_field`` on every value it reads from YAML, so ``max_steps: 4.5``
or ``layer: "five"`` stops at load time with the field's dotted name, before any model is built. Types
come from the annotations (generic: a field moved between sections is still checked); ranges and choices,
which annotations cannot say, come from ``LIMITS`` / ``CHOICES`` keyed by the field's name inside its
section class.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from lens.errors import InvalidConfig

# (section class name, field) -> (lowest allowed, highest allowed); None: unbounded on that side
LIMITS: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("BackboneConfig", "layer"): (1, None),
    ("KeypointConfig", "max_points"): (1, None),
    ("KeypointConfig", "nms_radius"): (0, None),
    ("KeypointConfig", "subpixel_eps"): (0, None),
    ("KeypointConfig", "neighbourhood"): (1, None),
    ("DescriptorConfig", "num_heads"): (1, None),
    ("DescriptorConfig", "global_only_prob"): (0, 1),
    ("DescriptorConfig", "width"): (1, None),
    ("LossConfig", "dice_weight"): (0, None),
    ("LossConfig", "bce_weight"): (0, None),
    ("LossConfig", "attention_weight"): (0, None),
    ("TrainConfig", "lr"): (0, None),
    ("TrainConfig", "weight_decay"): (0, None),
    ("TrainConfig", "betas"): (0, 1),
    ("TrainConfig", "warmup_steps"): (0, None),
    ("TrainConfig", "max_steps"): (1, None),
    ("TrainConfig", "batch_size"): (1, None),
    ("TrainConfig", "grad_accum_steps"): (1, None),
    ("TrainConfig", "max_grad_norm"): (0, None),
    ("TrainConfig", "save_every"): (1, None),
    ("TrainConfig", "keep_checkpoints"): (1, None),
    ("TrainConfig", "eval_every"): (0, None),
    ("TrainConfig", "eval_limit"): (1, None),
    ("TrainConfig", "eval_batch_size"): (1, None),
    ("TrainConfig", "log_every"): (1, None),
    ("DataConfig", "num_classes_per_sample"): (1, None),
    ("DataConfig", "num_workers"): (0, None),
    ("DataConfig", "mixture"): (0, None),
    ("BaselineConfig", "lora_rank"): (1, None),
    ("BaselineConfig", "lora_alpha"): (0, None),
    ("BaselineConfig", "lora_dropout"): (0, 1),
    ("BaselineConfig", "ce_weight"): (0, None),
    ("BaselineConfig", "read_points"): (1, None),
    ("BaselineConfig", "read_positive"): (0, 1),
    ("BaselineConfig", "read_negative"): (0, 1),
    ("BaselineConfig", "flmm_width"): (1, None),
    ("BaselineConfig", "flmm_upsample"): (1, None),
}
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("BackboneConfig", "dtype"): ("float32", "float16", "bfloat16"),
    ("TrainConfig", "mixed_precision"): ("no", "fp16", "bf16"),
    ("TrainConfig", "lr_schedule"): ("linear", "cosine"),
    ("BaselineConfig", "system"): ("lisa", "read", "flmm", "self1e"),
}


def field_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass (its module uses ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def check_field(cls: type, name: str, hint: Any, value: Any, where: str) -> Any:
    """``value`` checked against ``hint`` and the field's limits; lists become tuples where the hint says so."""
    value = _check_type(hint, value, where)
    key = (cls.__name__, name)
    if key in CHOICES and value is not None and value not in CHOICES[key]:
        raise InvalidConfig(f"{where} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in LIMITS and value is not None:
        low, high = LIMITS[key]
        numbers = (
            value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else [value]
        )
        for number in numbers:
            if (low is not None and number < low) or (high is not None and number > high):
                bound = (
                    f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
                )
                raise InvalidConfig(f"{where} must be {bound}, got {number!r}")
    return value


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_type(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _check_type(option, value, where)
            except InvalidConfig as err:
                errors.append(str(err))
        raise InvalidConfig(f"{where}: expected {_describe(hint)}, got {value!r}")
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise InvalidConfig(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidConfig(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidConfig(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise InvalidConfig(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise InvalidConfig(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise InvalidConfig(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(
            _check_type(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin is list:
        if not isinstance(value, list | tuple):
            raise InvalidConfig(f"{where}: expected a list, got {value!r}")
        return (
            [_check_type(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise InvalidConfig(f"{where}: expected a mapping, got {value!r}")
        key_hint, value_hint = args or (Any, Any)
        return {
            _check_type(key_hint, k, f"{where} key"): _check_type(value_hint, v, f"{where}.{k}")
            for k, v in value.items()
        }
    return value  # a hint this checker does not know: left to the dataclass
