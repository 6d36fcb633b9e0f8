"""lens eval resumes only from records its own checkpoint wrote (content hash of weights + config, and per split
the limit, batch size and number of items); anything else is refused, never merged."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import make_lens
from lens.data.loader import QueryDataset
from lens.data.synthetic import SyntheticWorld
from lens.data.synthetic.dataset import SyntheticQueries
from lens.errors import InvalidInput
from lens.evaluation import IDENTITY_NAME, PER_SAMPLE_NAME, EvalSplit, evaluate, prediction_path


@pytest.fixture(scope="module")
def split() -> EvalSplit:
    world = SyntheticWorld(seed=0, height=64, width=80, val_size=2)
    return EvalSplit(
        "synthetic", "val", QueryDataset(SyntheticQueries(world, "val", num_scenes=2), "synthetic")
    )


def _lens(tiny_models, seed: int = 0):
    lens = make_lens(tiny_models, backbone__dtype="float32")
    if seed:
        torch.manual_seed(seed)
        for p in lens.head.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
    return lens


def test_another_checkpoints_records_are_refused_not_merged(tiny_models, split, tmp_path) -> None:
    a, b = _lens(tiny_models), _lens(tiny_models, seed=1)
    evaluate(a, [split], tmp_path / "a", batch_size=2, limit=3)
    before = (tmp_path / "a" / PER_SAMPLE_NAME).read_text()
    with pytest.raises(InvalidInput, match="holds records of another checkpoint .*new --output-dir"):
        evaluate(b, [split], tmp_path / "a", batch_size=2, limit=3)
    assert (tmp_path / "a" / PER_SAMPLE_NAME).read_text() == before  # untouched
    with pytest.raises(InvalidInput, match=r"synthetic/val records made with .*'limit': 3.*'limit': 2"):
        evaluate(a, [split], tmp_path / "a", batch_size=2, limit=2)
    with pytest.raises(InvalidInput, match="batch_size"):
        evaluate(a, [split], tmp_path / "a", batch_size=1, limit=3)
    # training's validation replaces stale records: the result is what a fresh directory gives
    fresh = evaluate(b, [split], tmp_path / "b", batch_size=2, limit=3)
    assert evaluate(b, [split], tmp_path / "a", batch_size=2, limit=3, replace_stale=True) == fresh
    assert (tmp_path / "a" / PER_SAMPLE_NAME).read_text() == (tmp_path / "b" / PER_SAMPLE_NAME).read_text()


def test_records_without_an_identity_are_refused(tiny_models, split, tmp_path) -> None:
    lens = _lens(tiny_models)
    evaluate(lens, [split], tmp_path, batch_size=2, limit=2)
    (tmp_path / IDENTITY_NAME).unlink()
    with pytest.raises(InvalidInput, match="unknown checkpoint"):
        evaluate(lens, [split], tmp_path, batch_size=2, limit=2)


def test_a_rerun_with_save_predictions_writes_them(tiny_models, split, tmp_path) -> None:
    lens = _lens(tiny_models)
    first = evaluate(lens, [split], tmp_path, batch_size=2, limit=3)
    assert evaluate(lens, [split], tmp_path, batch_size=2, limit=3, save_predictions=True) == first
    records = [json.loads(x) for x in (tmp_path / PER_SAMPLE_NAME).read_text().splitlines()]
    assert records and all(prediction_path(tmp_path, r).is_file() for r in records)


def test_altered_records_are_named_not_reused(tiny_models, split, tmp_path) -> None:
    """The merged records carry a SHA-256 in manifest.json: a byte changed after the run is caught on resume
    (a record that still parses would otherwise be reused as valid)."""
    from lens.errors import InvalidCheckpoint
    from lens.integrity import MANIFEST

    lens = _lens(tiny_models)
    evaluate(lens, [split], tmp_path, batch_size=2, limit=2)
    listed = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert {PER_SAMPLE_NAME, "results.json", IDENTITY_NAME} <= set(listed)
    path = tmp_path / PER_SAMPLE_NAME
    text = path.read_text()
    record = json.loads(text.splitlines()[0])
    record["iou"] = 1.0 - float(record.get("iou", 0.0))  # still valid JSON, different content
    path.write_text("\n".join([json.dumps(record), *text.splitlines()[1:]]) + "\n")
    with pytest.raises(InvalidCheckpoint, match=f"{PER_SAMPLE_NAME} is corrupted"):
        evaluate(lens, [split], tmp_path, batch_size=2, limit=2)


def test_a_crash_while_saving_a_prediction_leaves_no_file_that_counts_as_done(
    tiny_models, split, tmp_path, monkeypatch
) -> None:
    """A rerun with --save-predictions skips items whose PNG exists: a PNG cut short by a crash must never
    stand under its final name."""
    from PIL import Image

    lens = _lens(tiny_models)
    real_save = Image.Image.save

    def crash(self, fp, *args, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(b"\x89PNG\r\n")  # the first bytes, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        evaluate(lens, [split], tmp_path, batch_size=2, limit=2, save_predictions=True)
    assert not list((tmp_path / "predictions").rglob("*.png"))
    monkeypatch.setattr(Image.Image, "save", real_save)
    evaluate(lens, [split], tmp_path, batch_size=2, limit=2, save_predictions=True)
    records = [json.loads(line) for line in (tmp_path / PER_SAMPLE_NAME).read_text().splitlines()]
    for record in records:
        assert Image.open(prediction_path(tmp_path, record)).size == (80, 64)  # complete, readable
