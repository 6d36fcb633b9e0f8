"""Feature cache: run the frozen MLLM (to layer k) and SAM's image encoder once, train the head many times.

A cache is one folder per (dataset, split): ``manifest.json`` plus ``shard_00000.safetensors``, ... Each shard
holds the items ``[s * shard_size, (s + 1) * shard_size)`` of the dataset (rows drawn at epoch 0), with
per-row *unpadded* tensors concatenated along their first axis and offsets to cut them apart::

    hidden (T, d)  position_ids (T,) or (T, 3)  token_offsets (R + 1,)  # real tokens of layer k, rows back to back
    grid_sizes (R, 2)  image_positions (C,)      # per row its grid (gh, gw) and the gh * gw cells' token indices
    text_span (R, 2)  answer_index (R,)          # per row, in the row's own token frame
    decoder_0 (I, ...)  [decoder_1 ...]  row_image (R,)  # the decoder's embedding(s) per image, shared by its rows
    masks (P,) uint8  mask_offsets (R + 1,)  item_rows (n + 1,)  # flattened targets; rows of each item

plus the rows' text and geometry (``ImageGeometry.to_dict``: grid and decoder frames) as JSON in the safetensors
metadata. The decoder's embeddings are opaque: one tensor (SAM) or several (SAM 2), stored as ``decoder_j``.
Shards are written atomically
(temporary file + rename), so an interrupted build resumes at the first missing shard. The manifest carries a
``CacheKey``; a cache is only ever read with the key it was built with.

Training on a cache needs no MLLM in memory: ``lens.weights.build_lens_for_cache`` makes a LENS model whose
backbone is a ``SpecBackbone`` (the layer's shape, read from the MLLM's config on the meta device) and whose SAM
has no image encoder; ``stack_cached`` turns cached rows (``CachedRow``) back into the padded ``LensInputs`` the backbone would
give.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from lens.backbone import BackboneFeatures, first_of_each, shared_prefix_length
from lens.config import LensConfig
from lens.data.loader import ImageRow, ItemSource, Row
from lens.data.registry import get_dataset, registered_names
from lens.data.templates import LONG_QUESTION_TEMPLATES, SHORT_QUESTION_TEMPLATES
from lens.errors import InvalidCheckpoint
from lens.geometry import ImageGeometry
from lens.integrity import sha256_file
from lens.io import atomic_write, atomic_write_text
from lens.model import LensInputs, LensModel

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: per-row grids and image positions, decoder embeddings as decoder_j, geometry frames
MANIFEST_NAME = "manifest.json"
SHARD_NAME = "shard_{:05d}.safetensors"
META_FIELDS = ("instruction", "query", "name", "source", "is_sentence", "kind", "held_out", "index", "part")


@dataclass
class CachedRow(Row):
    """A row read back from a cache: the frozen stages' outputs instead of the image."""

    hidden_states: Tensor  # (L_i, d): layer-k hidden states of the row's real tokens
    position_ids: Tensor  # (L_i,), or (3, L_i) for the mrope kinds
    grid_size: Tensor  # (2,) (gh, gw) of the row's image grid
    image_positions: Tensor  # (gh * gw,) token index of each grid cell, row-major
    text_span: Tensor  # (2,)
    answer_index: Tensor  # ()
    decoder_embedding: Tensor | tuple[Tensor, ...]  # the decoder's image embedding(s), opaque to LENS
    geometry: ImageGeometry
    image_id: tuple[str, int, int] | None = None  # (cache, shard, image): rows of one image share it


@dataclass(frozen=True)
class CacheKey:
    """Everything that changes the cached tensors. A mismatch in any field makes a cache unusable."""

    backbone_id: str
    backbone_revision: str | None
    layer: int
    dtype: str  # of the cached hidden states (the backbone's dtype)
    decoder_id: str
    decoder_revision: str | None
    prompt_template: str  # see prompt_template_id
    dataset: str
    split: str
    options: str = (
        "{}"  # JSON of the dataset's own settings that change its items (DatasetSpec.cache_options)
    )
    decoder: str = "sam"  # DecoderConfig.name: whose image embeddings the cache holds

    @classmethod
    def from_config(
        cls, config: LensConfig, dataset: str, split: str, train: bool, seed: int = 0
    ) -> CacheKey:
        b, d = config.backbone, config.decoder
        template = prompt_template_id(train, seed)
        # a dataset handed in directly (not registered) has no options of its own
        spec = get_dataset(dataset) if dataset in registered_names() else None
        options = json.dumps(
            {} if spec is None else spec.cache_options(config.data, split, train), sort_keys=True
        )
        return cls(
            b.model_id,
            b.revision,
            b.layer,
            b.dtype,
            d.model_id,
            d.revision,
            template,
            dataset,
            split,
            options,
            d.name,
        )

    def check(self, found: dict[str, Any], where: str | Path) -> None:
        """Raise ``ValueError`` naming every field where ``found`` (a manifest's key) differs from this key."""
        expected = dataclasses.asdict(self)
        bad = [f for f in expected if found.get(f) != expected[f]]
        if bad:
            detail = ", ".join(f"{f}: cache has {found.get(f)!r}, expected {expected[f]!r}" for f in bad)
            raise ValueError(f"feature cache {where} was built for another setting ({detail})")


def prompt_template_id(train: bool, seed: int = 0) -> str:
    """Names how instructions were made: the template lists (hashed) and how one was picked."""
    digest = hashlib.sha1(
        json.dumps([SHORT_QUESTION_TEMPLATES, LONG_QUESTION_TEMPLATES]).encode()
    ).hexdigest()
    return f"lisa-{'train-seed' + str(seed) if train else 'eval'}-{digest[:12]}"


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=1))


def _item_batches(items: list[list[ImageRow]], batch_size: int) -> list[list[ImageRow]]:
    """Rows in batches of up to ``batch_size`` (more if one item has more), never splitting an item.

    An item's rows show one image; encoded together, their shared prompt start runs once and comes out bitwise
    equal in every row, which is what lets ``stack_cached`` share it again in the head.
    """
    batches: list[list[ImageRow]] = [[]]
    for item in items:
        if batches[-1] and len(batches[-1]) + len(item) > batch_size:
            batches.append([])
        batches[-1].extend(item)
    return [b for b in batches if b]


def _encode_shard(
    model: LensModel, items: list[list[ImageRow]], batch_size: int
) -> tuple[dict[str, Tensor], dict]:
    """Run the frozen stages on the rows of ``items`` and lay the results out as one shard."""
    rows = [row for item in items for row in item]
    item_rows = np.cumsum([0] + [len(item) for item in items])
    first_rows = [item[0] for item in items if item]
    embedded = [_as_tuple(model.decoder.embed_images([r.image for r in first_rows[i : i + batch_size]]))
                for i in range(0, len(first_rows), batch_size)]  # fmt: skip
    row_image = [k for k, item in enumerate(it for it in items if it) for _ in item]
    hidden, positions, spans, lengths, geometries, cells = [], [], [], [], [], []
    for batch in _item_batches(items, batch_size):
        f = model.backbone.encode(
            [r.image for r in batch], [r.instruction for r in batch], decoder_frame=model.decoder.frame
        )
        for i in range(len(batch)):
            n = int(f.attention_mask[i].sum())
            if not f.attention_mask[i, :n].all():
                raise ValueError("the cache expects right padding (real tokens first)")
            hidden.append(f.hidden_states[i, :n].cpu())
            row_positions = f.position_ids[:, i, :n].T if f.position_ids.dim() == 3 else f.position_ids[i, :n]
            positions.append(row_positions.cpu())  # (n,) or (n, 3)
            gh, gw = (int(x) for x in f.grid_sizes[i])
            cells.append(f.image_positions[i, : gh * gw].cpu())
            spans.append((f.grid_sizes[i].cpu(), f.text_span[i].cpu(), f.answer_index[i].cpu()))
            lengths.append(n)
        geometries += [g.to_dict() for g in f.geometries]
    masks = [np.asarray(r.mask, np.uint8).reshape(-1) for r in rows]
    tensors = {
        "hidden": torch.cat(hidden) if hidden else torch.zeros(0, 0),
        "position_ids": torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long),
        "token_offsets": torch.tensor(np.cumsum([0, *lengths])),
        "grid_sizes": torch.stack([s[0] for s in spans]) if spans else torch.zeros(0, 2, dtype=torch.long),
        "image_positions": torch.cat(cells) if cells else torch.zeros(0, dtype=torch.long),
        "text_span": torch.stack([s[1] for s in spans]) if spans else torch.zeros(0, 2, dtype=torch.long),
        "answer_index": torch.stack([s[2] for s in spans]) if spans else torch.zeros(0, dtype=torch.long),
        **{
            f"decoder_{j}": torch.cat([e[j].cpu() for e in embedded])
            for j in range(len(embedded[0]) if embedded else 0)
        },
        "row_image": torch.tensor(row_image, dtype=torch.long),
        "masks": torch.from_numpy(np.concatenate(masks)) if masks else torch.zeros(0, dtype=torch.uint8),
        "mask_offsets": torch.tensor(np.cumsum([0] + [m.size for m in masks])),
        "item_rows": torch.tensor(item_rows),
    }
    meta = [
        {**{k: getattr(r, k) for k in META_FIELDS}, "geometry": g}
        for r, g in zip(rows, geometries, strict=True)
    ]
    return {k: v.contiguous() for k, v in tensors.items()}, {"rows": json.dumps(meta)}


@torch.inference_mode()
def build_cache(
    model: LensModel,
    dataset: ItemSource,
    out_dir: str | Path,
    key: CacheKey,
    shard_size: int = 256,
    batch_size: int = 8,
    process_index: int = 0,
    num_processes: int = 1,
) -> Path:
    """Cache layer-k features and SAM embeddings of every item of ``dataset`` (rows at epoch 0).

    Resumes an interrupted build: finished shards are kept, never recomputed. Refuses (``ValueError``) a folder
    holding a cache with another key or layout. With several processes, shard s is built by process
    ``s % num_processes``; call it on every process, then once more (or ``finalize_cache``) for the manifest.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_items = len(dataset)
    num_shards = -(-num_items // shard_size)
    manifest = {"format": CACHE_FORMAT, "key": dataclasses.asdict(key), "num_items": num_items,
                "shard_size": shard_size, "shards": [], "complete": False}  # fmt: skip
    if (out_dir / MANIFEST_NAME).is_file():
        found = json.loads((out_dir / MANIFEST_NAME).read_text())
        key.check(found["key"], out_dir)
        layout = {f: found.get(f) for f in ("format", "num_items", "shard_size")}
        if layout != {f: manifest[f] for f in layout}:
            raise ValueError(
                f"feature cache {out_dir} has layout {layout}, expected {num_items} items of {shard_size}"
            )
    elif process_index == 0:
        _write_manifest(out_dir, manifest)
    for shard in range(process_index, num_shards, num_processes):
        path = out_dir / SHARD_NAME.format(shard)
        if path.is_file():
            logger.info("cache %s: shard %d already done", out_dir, shard)
            continue
        items = [dataset.rows(i) for i in range(shard * shard_size, min((shard + 1) * shard_size, num_items))]
        tensors, metadata = _encode_shard(model, items, batch_size)
        found_dtype = str(tensors["hidden"].dtype).removeprefix("torch.")
        if tensors["hidden"].numel() and found_dtype != key.dtype:
            raise ValueError(
                f"the backbone produced {found_dtype} features but the cache key says {key.dtype}"
            )
        atomic_write(path, lambda p, t=tensors, m=metadata: save_file(t, p, metadata=m))
        logger.info("cache %s: wrote shard %d / %d", out_dir, shard + 1, num_shards)
    if process_index == 0 and num_processes == 1:
        finalize_cache(out_dir)
    return out_dir


def finalize_cache(out_dir: str | Path) -> None:
    """Mark a cache complete once every shard exists (after all processes of a sharded build)."""
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    num_shards = -(-manifest["num_items"] // manifest["shard_size"])
    shards = [SHARD_NAME.format(s) for s in range(num_shards)]
    missing = [s for s in shards if not (out_dir / s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"feature cache {out_dir}: {len(missing)} shard(s) missing, e.g. {missing[0]}"
        )
    # SHA-256 of every shard: a shard corrupted after the build is named when read, never used
    sums = {s: sha256_file(out_dir / s) for s in shards}
    _write_manifest(out_dir, {**manifest, "shards": shards, "sha256": sums, "complete": True})


class CachedDataset:
    """Rows read back from a cache (``ItemSource``): tensors instead of an image, same metadata as rows.

    Shards are opened lazily and memory-mapped, so DataLoader workers read only what they are asked for.
    """

    def __init__(self, directory: str | Path, key: CacheKey | None = None):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no feature cache at {self.directory} (no {MANIFEST_NAME})")
        self.manifest = json.loads(manifest_path.read_text())
        if key is not None:
            key.check(self.manifest["key"], self.directory)
        if not self.manifest["complete"]:
            raise ValueError(
                f"feature cache {self.directory} is incomplete: run the cache build again to finish it"
            )
        self.shard_size = self.manifest["shard_size"]
        self._open: dict[int, tuple[Any, list[dict[str, Any]], Tensor]] = {}

    def __len__(self) -> int:
        return self.manifest["num_items"]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}  # memory maps stay in the process that opened them

    def _shard(self, shard: int) -> tuple[Any, list[dict[str, Any]], Tensor]:
        if shard not in self._open:
            path = self.directory / self.manifest["shards"][shard]
            expected = self.manifest.get("sha256", {}).get(path.name)  # caches built before checksums: None
            if expected is not None and (not path.is_file() or sha256_file(path) != expected):
                raise InvalidCheckpoint(
                    f"{path} is {'corrupted' if path.is_file() else 'missing'}: "
                    f"its checksum differs from {self.directory / MANIFEST_NAME}; rebuild the cache"
                )
            handle = safe_open(str(path), framework="pt")
            meta = json.loads(handle.metadata()["rows"])
            self._open[shard] = (handle, meta, handle.get_tensor("item_rows"))
        return self._open[shard]

    def rows(self, index: int, epoch: int = 0) -> list[CachedRow]:
        """Rows of item ``index``; ``epoch`` is ignored: a cache holds the draws of epoch 0."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for the {len(self)} items of {self.directory}")
        handle, meta, item_rows = self._shard(index // self.shard_size)
        names = [k for k in handle.keys() if k.startswith("decoder_")]  # noqa: SIM118 (not a dict)
        decoder_keys = sorted(names, key=lambda k: int(k.removeprefix("decoder_")))
        cell_counts = handle.get_tensor("grid_sizes").prod(1)  # (R,) cells of each row's grid
        local = index % self.shard_size
        out: list[CachedRow] = []
        for r in range(int(item_rows[local]), int(item_rows[local + 1])):
            t0, t1 = (int(x) for x in handle.get_slice("token_offsets")[r : r + 2])
            m0, m1 = (int(x) for x in handle.get_slice("mask_offsets")[r : r + 2])
            geometry = ImageGeometry.from_dict(meta[r]["geometry"])
            image = int(handle.get_slice("row_image")[r : r + 1][0])
            grid = handle.get_slice("grid_sizes")[r : r + 1][0]  # (2,)
            c0 = int(cell_counts[:r].sum())
            positions = handle.get_slice("position_ids")[t0:t1].clone()
            embedding = tuple(handle.get_slice(k)[image : image + 1][0].clone() for k in decoder_keys)
            # clone(): a slice is a view into the whole shard's storage, which pickling (DataLoader workers
            # hand rows to the main process) would copy in full for every row
            out.append(
                CachedRow(
                    **{k: meta[r].get(k, False) for k in META_FIELDS},  # older caches lack held_out
                    mask=handle.get_slice("masks")[m0:m1]
                    .numpy()
                    .reshape(geometry.height, geometry.width)
                    .copy(),
                    hidden_states=handle.get_slice("hidden")[t0:t1].clone(),  # (L_i, d)
                    position_ids=positions.T if positions.dim() == 2 else positions,  # (L_i,) or (3, L_i)
                    grid_size=grid.clone(),  # (2,) (gh, gw)
                    image_positions=handle.get_slice("image_positions")[
                        c0 : c0 + int(cell_counts[r])
                    ].clone(),
                    text_span=handle.get_slice("text_span")[r : r + 1][0].clone(),  # (2,)
                    answer_index=handle.get_slice("answer_index")[r : r + 1][0].clone(),
                    decoder_embedding=embedding[0] if len(embedding) == 1 else embedding,
                    geometry=geometry,
                    image_id=(str(self.directory), index // self.shard_size, image),
                )
            )
        return out


def _shared_prefix(
    rows: list[CachedRow],
    hidden: Tensor,  # (B, L, d)
    positions: Tensor,  # (B, L) or (3, B, L)
    attention_mask: Tensor,  # (B, L)
) -> tuple[Tensor | None, int]:
    """Which stored image each row shows, and P: how many first tokens every row shares with the first row
    of its image, bitwise, before any text (0: none).

    Rows sharing the first P hidden states and positions give the head the same first P outputs, so it may run
    them once per image (``SegmentationHead``); exact equality makes that safe whatever encoded the cache.
    """
    if any(r.image_id is None for r in rows):
        return None, 0
    ids: dict[Any, int] = {}
    image_index = torch.tensor([ids.setdefault(r.image_id, len(ids)) for r in rows])  # (B,)
    if len(ids) == len(rows):
        return image_index, 0
    lead = torch.tensor(first_of_each(image_index))[image_index]  # (B,) first row of each row's image
    same_positions = (positions == positions[..., lead, :]).reshape(-1, *hidden.shape[:2]).all(0)  # (B, L)
    same = (hidden == hidden[lead]).all(-1) & same_positions
    text_start = torch.stack([r.text_span for r in rows])[:, 0]
    return image_index, shared_prefix_length(same, attention_mask, text_start)


def stack_cached(rows: list[CachedRow]) -> LensInputs:
    """Cached rows → a padded batch, exactly as the backbone would have produced it (right padding)."""
    length = max(r.hidden_states.shape[0] for r in rows)
    d = rows[0].hidden_states.shape[1]
    hidden = rows[0].hidden_states.new_zeros(len(rows), length, d)  # (B, L, d)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.bool)  # (B, L)
    lead = rows[0].position_ids.shape[:-1]  # () for 1-D RoPE, (3,) for the mrope kinds
    positions = torch.zeros(*lead, len(rows), length, dtype=torch.long)  # (B, L) or (3, B, L)
    cells = max(r.image_positions.shape[0] for r in rows)
    image_positions = torch.full((len(rows), cells), -1, dtype=torch.long)  # (B, N)
    for i, r in enumerate(rows):
        n = r.hidden_states.shape[0]
        hidden[i, :n], attention_mask[i, :n], positions[..., i, :n] = r.hidden_states, True, r.position_ids
        pad = r.position_ids[..., n - 1 :] + 1 + torch.arange(length - n)  # pads continue the count
        positions[..., i, n:] = pad
        image_positions[i, : r.image_positions.shape[0]] = r.image_positions
    image_index, shared = _shared_prefix(rows, hidden, positions, attention_mask)
    features = BackboneFeatures(
        hidden_states=hidden,
        attention_mask=attention_mask,
        position_ids=positions,
        image_positions=image_positions,
        grid_sizes=torch.stack([r.grid_size for r in rows]),
        text_span=torch.stack([r.text_span for r in rows]),
        answer_index=torch.stack([r.answer_index for r in rows]),
        geometries=[r.geometry for r in rows],
        image_index=image_index,
        shared_length=shared,
    )
    embeddings = [r.decoder_embedding for r in rows]
    if isinstance(embeddings[0], Tensor):
        stacked = torch.stack(embeddings)  # (B, ...)
    else:
        stacked = tuple(torch.stack(parts) for parts in zip(*embeddings, strict=True))
    return LensInputs(features, stacked, [torch.from_numpy(np.asarray(r.mask, np.uint8)) for r in rows])


def _as_tuple(embeddings: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (embeddings,) if isinstance(embeddings, Tensor) else tuple(embeddings)
