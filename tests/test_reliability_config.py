"""Config files and values are checked when loaded, before any model is built, naming the field."""

import dataclasses
from pathlib import Path

import pytest

from lens import config as config_module
from lens.config import LensConfig
from lens.errors import InvalidConfig
from lens.validation import CHOICES, LIMITS


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"max_steps": 4.5}}, r"config\.train\.max_steps: expected an integer, got 4\.5"),
        ({"backbone": {"layer": "five"}}, r"config\.backbone\.layer: expected an integer, got 'five'"),
        ({"backbone": {"layer": 0}}, r"config\.backbone\.layer: 0 is outside \[1, inf\]"),
        ({"train": {"batch_size": True}}, r"train\.batch_size: expected an integer, got True"),
        ({"train": {"lr": "fast"}}, r"train\.lr: expected a finite number"),
        ({"train": {"lr": -1e-4}}, r"train\.lr: -0\.0001 is outside"),
        ({"train": {"lr": float("nan")}}, r"train\.lr: expected a finite number"),
        ({"train": {"betas": [0.9]}}, r"train\.betas: expected 2 values, got 1"),
        ({"train": {"betas": [0.9, 1.5]}}, r"train\.betas: 1\.5 is outside \[0, 1\]"),
        ({"train": {"mixed_precision": "bf32"}}, r"train\.mixed_precision: 'bf32' is not one of"),
        ({"train": {"seed": None}}, r"train\.seed: expected an integer, got None"),
        ({"descriptor": {"global_only_prob": 1.5}}, r"global_only_prob: 1\.5 is outside \[0, 1\]"),
        ({"data": {"mixture": {"sem": -1.0}}}, r"data\.mixture: -1\.0 is outside"),
        ({"data": {"mixture": ["sem"]}}, r"data\.mixture: expected a mapping"),
        ({"data": {"semantic_roots": {"ade20k": 3}}}, r"data\.semantic_roots\.ade20k: expected a string"),
        ({"data": {"reason_seg_root": 5}}, r"data\.reason_seg_root: expected str \| None, got 5"),
        ({"head": {"init_from_backbone": "yes"}}, r"head\.init_from_backbone: expected true or false"),
        ({"train": 3}, r"config\.train: expected a mapping, got 3"),
    ],
)
def test_bad_values_are_refused_naming_the_field(data: dict, message: str) -> None:
    with pytest.raises(InvalidConfig, match=message):
        LensConfig.from_dict(data)


def test_good_values_still_load_and_ints_widen_to_floats() -> None:
    c = LensConfig.from_dict(
        {"train": {"lr": 1, "betas": [0.9, 0.99], "max_steps": 7}, "data": {"synthetic_seed": 3}}
    )
    assert c.train.lr == 1.0 and isinstance(c.train.lr, float)
    assert c.train.betas == (0.9, 0.99) and c.train.max_steps == 7 and c.data.synthetic_seed == 3
    assert LensConfig.from_dict(LensConfig().to_dict()) == LensConfig()


def test_every_limit_and_choice_names_a_real_field() -> None:
    sections = {
        obj.__name__: {f.name for f in dataclasses.fields(obj)}
        for obj in vars(config_module).values()
        if isinstance(obj, type) and dataclasses.is_dataclass(obj)
    }
    for section, name in [*LIMITS, *CHOICES]:
        assert name in sections.get(section, set()), f"{section}.{name} is not a config field"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("train: {max_steps: 3\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping at the top level, got list"),
        ("train:\n  max_steps: 4.5\n", r"c\.yaml: config\.train\.max_steps: expected an integer"),
    ],
)
def test_bad_yaml_files_are_refused_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(InvalidConfig, match=message) as info:
        LensConfig.from_yaml(path)
    assert "\n" not in str(info.value)


def test_a_checkpoint_with_an_empty_config_is_refused_before_any_model_is_built(tmp_path: Path) -> None:
    from lens.weights import load_lens

    (tmp_path / "lens_config.yaml").write_text("")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(InvalidConfig, match="lens_config.yaml is empty"):
        load_lens(tmp_path)
