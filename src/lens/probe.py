"""The layer probe: which decoder layer of a frozen MLLM already looks at the target?

LENS reads the hidden states of one backbone layer k (LLaVA-1.5-7B: 14 of 32, paper §3.1), because shallow layers
lack semantics and deep ones attend little to the image. ``lens probe`` measures the second half of that claim
for any backbone, before training anything: for every decoder layer it takes the layer's *own* text→image
attention, averaged over heads and over the prompt's text tokens exactly as eq. 1 averages the head's, and asks

* **pointing**: how often its highest cell (among the cells that show the image) is on the target, i.e. the
  centre of that cell, mapped to the original image, lies on a target pixel (where a keypoint from that cell
  would prompt the mask decoder);
* **mass**: the share of its attention to the image that falls on the target: Σ_cells A·cover / Σ_cells A, where
  cover is the exact fraction of each cell the target mask covers (``ImageGeometry.mask_to_grid``);
* **image share**: how much of the text tokens' attention goes to image cells at all.

Everything goes through the backbone interface (``Backbone.layer_attentions``), so every family is probed the
same way. The recommended tap layer is the argmax of pointing, ties broken by mass; the layers whose pointing
is within one binomial standard error of the best are reported too, since the argmax among them is noise.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from lens.backbone.base import Backbone, BackboneFeatures
from lens.data.loader import ImageRow
from lens.geometry import ImageGeometry

if TYPE_CHECKING:
    from rich.console import Console

    from lens.config import DataConfig


@dataclass
class LayerScore:
    layer: int  # 1-based decoder layer
    pointing: float  # fraction of queries whose argmax cell's centre lies on the target
    mass: float  # mean share of the layer's image attention that lands on the target
    image_share: float  # mean share of the text tokens' attention that goes to image cells


@dataclass
class ProbeResult:
    model: str
    data: str
    queries: int  # queries with a non-empty target that were scored
    layers: list[LayerScore]
    chance_pointing: float  # pointing of a uniformly random valid cell (mean target share of cell centres)
    chance_mass: float  # mass of uniform attention (mean target area share of the image)
    seconds: float = 0.0
    recommended: int = field(init=False)
    # layers whose pointing is within one binomial standard error sqrt(p (1 - p) / queries) of the best
    within_error: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.recommended = recommend(self.layers)
        best = max(s.pointing for s in self.layers)
        error = math.sqrt(best * (1 - best) / max(self.queries, 1))
        self.within_error = [s.layer for s in self.layers if s.pointing >= best - error - 1e-12]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def recommend(layers: Sequence[LayerScore]) -> int:
    """The tap layer the probe supports: highest pointing, ties (to 1e-9) broken by higher mass."""
    if not layers:
        raise ValueError("no layers to recommend from")
    return max(layers, key=lambda s: (round(s.pointing, 9), s.mass)).layer


def text_rows_on_grid(probs: Tensor, b: int, features: BackboneFeatures) -> Tensor:
    """Prompt ``b``'s attention from its text tokens to its grid cells, averaged over the text tokens:
    ``probs`` (B, ..., Lq, L), whose Lq rows are the last Lq positions -> (..., gh_b, gw_b)."""
    gh, gw = (int(v) for v in features.grid_sizes[b])
    cells = features.image_positions[b, : gh * gw]  # (gh*gw,) sequence index of each cell
    t0, t1 = (int(v) for v in features.text_span[b])
    offset = probs.shape[-1] - probs.shape[-2]  # rows start at this sequence position
    if t0 < offset:
        raise ValueError(f"text tokens from {t0} but attention rows only from {offset}")
    rows = probs[b, ..., t0 - offset : t1 - offset, :].float()  # (..., L_t, L)
    on_cells = rows.mean(-2)[..., cells.to(rows.device)]  # (..., gh*gw)
    return on_cells.view(*on_cells.shape[:-1], gh, gw)


def text_image_maps(features: BackboneFeatures, attentions: Sequence[Tensor]) -> list[Tensor]:
    """Per prompt, every layer's text→image map (eq. 1): (num_layers, gh_i, gw_i), not renormalised.

    Arguments:
        features: the backbone's features of the batch (where the text and the grid cells are).
        attentions: per layer, attention probabilities averaged over heads, (B, Lq, L); the Lq rows are the
            last Lq positions of the prompt (Lq < L when a shared prefix ran from a cache).
    """
    return [
        torch.stack([text_rows_on_grid(probs, b, features) for probs in attentions]).cpu()
        for b in range(features.hidden_states.shape[0])
    ]


def cell_centres_on(geometry: ImageGeometry, target: Tensor) -> Tensor:
    """(gh, gw) bool: the centre of each grid cell, in the original image, lies on a target pixel."""
    gh, gw = geometry.grid.grid_h, geometry.grid.grid_w
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    centres = geometry.grid_to_image(torch.stack([xs, ys], -1).float())  # (gh, gw, 2) x, y pixels
    col, row = centres[..., 0].floor().long(), centres[..., 1].floor().long()
    height, width = target.shape
    inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
    hit = target.bool()[row.clamp(0, height - 1), col.clamp(0, width - 1)]
    return inside & hit


@dataclass
class QueryScores:
    hits: Tensor  # (num_layers,) 1.0 where the layer's argmax cell is on the target
    mass: Tensor  # (num_layers,)
    image_share: Tensor  # (num_layers,)
    chance_pointing: float
    chance_mass: float


def score_query(maps: Tensor, cover: Tensor, on_target: Tensor, valid: Tensor) -> QueryScores:
    """Scores of one query's maps.

    Arguments:
        maps: (num_layers, gh, gw) text→image attention (eq. 1, raw: sums to the image share).
        cover: (gh, gw) fraction of each cell covered by the target.
        on_target: (gh, gw) bool, cell centre on a target pixel.
        valid: (gh, gw) bool, cells that show the image (MLLM padding excluded from the argmax and the sums).
    """
    flat = maps.flatten(1) * valid.flatten()  # (layers, n)
    share = flat.sum(1)  # (layers,)
    mass = (flat * cover.flatten()).sum(1) / share.clamp_min(1e-12)
    best = flat.masked_fill(~valid.flatten(), -1.0).argmax(1)  # (layers,)
    hits = on_target.flatten()[best].float()
    n_valid = valid.sum().clamp_min(1)
    return QueryScores(
        hits=hits,
        mass=mass,
        image_share=share,
        chance_pointing=float((on_target & valid).sum() / n_valid),
        chance_mass=float((cover * valid).sum() / n_valid),
    )


def probe(
    backbone: Backbone,
    rows: Iterable[ImageRow],
    batch_size: int = 8,
    model: str = "",
    data: str = "",
) -> ProbeResult:
    """Probe every decoder layer of ``backbone`` on ``rows`` (dicts with ``image``, ``instruction``, ``mask``).

    Rows whose mask has no target pixel (mask == 1) are skipped: there is nothing to point at.
    """
    start = time.perf_counter()
    scored: list[QueryScores] = []
    batch: list[ImageRow] = []

    def run(batch: list[ImageRow]) -> None:
        images = [row.image for row in batch]
        features, attentions = backbone.layer_attentions(images, [row.instruction for row in batch])
        for b, (row, maps) in enumerate(zip(batch, text_image_maps(features, attentions), strict=True)):
            geometry = features.geometries[b]
            target = torch.from_numpy(np.asarray(row.mask) == 1)  # (H, W)
            cover = geometry.mask_to_grid(target.float())
            scored.append(
                score_query(maps, cover, cell_centres_on(geometry, target), geometry.valid_cells().bool())
            )

    for row in rows:
        if not (np.asarray(row.mask) == 1).any():
            continue
        batch.append(row)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    if not scored:
        raise ValueError("no query with a target to probe")
    hits = torch.stack([s.hits for s in scored]).mean(0)
    mass = torch.stack([s.mass for s in scored]).mean(0)
    share = torch.stack([s.image_share for s in scored]).mean(0)
    layers = [
        LayerScore(layer=i + 1, pointing=float(hits[i]), mass=float(mass[i]), image_share=float(share[i]))
        for i in range(len(hits))
    ]
    return ProbeResult(
        model=model,
        data=data,
        queries=len(scored),
        layers=layers,
        chance_pointing=float(np.mean([s.chance_pointing for s in scored])),
        chance_mass=float(np.mean([s.chance_mass for s in scored])),
        seconds=time.perf_counter() - start,
    )


def probe_rows(
    data: str, config_data: DataConfig | None = None, limit: int | None = None
) -> Iterator[ImageRow]:
    """Evaluation rows (reference prompts) of ``data`` = "dataset/split", e.g. "synthetic/val".

    The synthetic world needs no files (seed 0 unless ``config_data`` says otherwise); other datasets are read
    from the roots in ``config_data`` (a ``DataConfig``). ``limit`` counts rows with a target.
    """
    from lens.config import DataConfig
    from lens.data.loader import build_eval_dataset

    if "/" not in data:
        raise ValueError(f"--data must be dataset/split, e.g. synthetic/val; got {data!r}")
    dataset, split = data.split("/", 1)
    if config_data is None:  # a dataset that needs no files (the synthetic world) with its default options
        config_data = DataConfig(datasets={dataset: {}})
    source = build_eval_dataset(config_data, dataset, split)
    taken = 0
    for index in range(len(source)):
        for row in source.rows(index):
            if limit is not None and taken >= limit:
                return
            if (np.asarray(row.mask) == 1).any():
                taken += 1
                yield row


def run_probe(
    model: str,
    data: str = "synthetic/val",
    limit: int | None = 200,
    backbone: str | None = None,
    config_data: DataConfig | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
) -> ProbeResult:
    """``lens probe``: load the frozen MLLM ``model`` (hub id, directory or ``lens:`` asset) as a ``backbone``
    family and probe it on the first ``limit`` target queries of ``data``."""
    from lens.assets import resolve_model_id
    from lens.backbone import load_backbone
    from lens.config import BackboneConfig

    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    rows = probe_rows(data, config_data, limit)  # checks --data before the model loads
    first = next(rows, None)
    if first is None:
        raise ValueError(f"{data} has no query with a target")
    name = backbone or BackboneConfig.name  # the config's default family
    config = BackboneConfig(name=name, model_id=resolve_model_id(model), layer=1, dtype=dtype)
    mllm = load_backbone(config, device)
    return probe(mllm, itertools.chain([first], rows), batch_size=batch_size, model=model, data=data)


def print_table(result: ProbeResult, console: Console) -> None:
    from rich.table import Table

    table = Table(title=f"{result.model} on {result.data}", caption=f"{result.queries} queries with a target")
    for column in ("layer", "pointing", "mass", "image share"):
        table.add_column(column, justify="right")
    for s in result.layers:
        mark = " *" if s.layer == result.recommended else " ~" if s.layer in result.within_error else ""
        table.add_row(f"{s.layer}{mark}", f"{s.pointing:.3f}", f"{s.mass:.3f}", f"{s.image_share:.3f}")
    table.add_row("chance", f"{result.chance_pointing:.3f}", f"{result.chance_mass:.3f}", "", style="dim")
    console.print(table)
    console.print(
        f"recommended tap layer: {result.recommended} (*); within one standard error of its pointing (~): "
        f"{', '.join(map(str, result.within_error))}; {result.seconds:.0f} s"
    )
