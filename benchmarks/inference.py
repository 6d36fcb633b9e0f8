"""LENS against LISA-style and F-LMM-style pipelines, at one size, in one run: latency, memory, floor.

What LENS must do for a mask is one prefill of the MLLM *up to layer k*, two head layers, keypoints, a small
descriptor and SAM (image encoder + mask decoder). A LISA-style system runs the *whole* MLLM and then decodes
"Sure, it is [SEG]." token by token; an F-LMM-style one runs the whole MLLM with the attention maps of every
layer and head gathered for the query, a small CNN, then SAM with box + mask prompts. All three here use the
same Hugging Face SAM and the same MLLM, so the ratios compare the methods, not implementations. Random weights
time exactly like trained ones, so ``--preset real`` builds LLaVA-1.5-7B + SAM ViT-H from their configs with
random weights (nothing is downloaded).

    python benchmarks/inference.py --preset real --device cuda --dtype bfloat16   # one call, < 10 min on an H100/H200
    python benchmarks/inference.py --preset shipped --threads 2                   # the shipped small models, CPU
    python benchmarks/inference.py --preset tiny --reps 1 --batches 1 --queries 1,2   # CI smoke test (seconds)

Printed last, one table: median latency (ms), throughput (masks/s) and peak memory per row; then the stage
shares of LENS at batch 1, the arithmetic floor (FLOPs of LENS's work over the GEMM rate measured in the same
run), and the headline ratios. ``--json PATH`` writes the same numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import platform
import resource
import statistics
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import lens.model as lens_model
from lens.config import LensConfig
from lens.model import LensModel

logger = logging.getLogger("inference")
QUERY = "Please segment the red ring on the left of the square."
SEG_ANSWER = "Sure, it is [SEG]."


# ----- models --------------------------------------------------------------------------------------------------
def _llava_spec(preset: str):
    from lens.tiny import TinyLlavaSpec

    if preset == "real":  # LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B (Llama-2 shape)
        return TinyLlavaSpec(
            image_size=336,
            patch_size=14,
            vision_hidden=1024,
            vision_layers=24,
            vision_heads=16,
            text_hidden=4096,
            text_layers=32,
            text_heads=32,
            text_kv_heads=32,
            text_intermediate=11008,
            max_positions=4096,
        )
    if preset == "mid":  # the same token counts (576 image tokens) at a size a CPU runs in seconds
        return TinyLlavaSpec(
            image_size=336,
            patch_size=14,
            vision_hidden=256,
            vision_layers=6,
            vision_heads=4,
            text_hidden=512,
            text_layers=8,
            text_heads=8,
            text_kv_heads=8,
            text_intermediate=1376,
            max_positions=2048,
        )
    return TinyLlavaSpec()


def _sam_spec(preset: str):
    from lens.tiny import TinySamSpec

    if preset == "real":  # SAM ViT-H
        return TinySamSpec(
            image_size=1024,
            patch_size=16,
            vision_hidden=1280,
            vision_layers=32,
            vision_heads=16,
            prompt_hidden=256,
            decoder_layers=2,
            decoder_heads=8,
            decoder_mlp=2048,
        )
    if preset == "mid":  # SAM's 64×64 token grid, narrower and shallower
        return TinySamSpec(
            image_size=1024,
            patch_size=16,
            vision_hidden=256,
            vision_layers=4,
            vision_heads=4,
            prompt_hidden=256,
            decoder_layers=2,
            decoder_heads=8,
            decoder_mlp=2048,
        )
    return TinySamSpec()


def _build_sam(preset: str):
    """SAM from ``_sam_spec`` with SAM's own block layout: 14 x 14 windows and evenly spaced global blocks
    (ViT-H: 7, 15, 23, 31), which ``lens.tiny.build_sam`` does not set (its windows are half the grid)."""
    from transformers import SamModel

    from lens.tiny import build_sam

    spec = _sam_spec(preset)
    if preset not in ("real", "mid"):
        return build_sam(spec)
    layers = spec.vision_layers
    small, processor = build_sam(dataclasses.replace(spec, vision_layers=1))  # one block: config + processor
    config = small.config
    vision = config.vision_config
    vision.num_hidden_layers = layers
    vision.window_size = 14
    vision.global_attn_indexes = [(i + 1) * layers // 4 - 1 for i in range(4)]  # 7, 15, 23, 31 at 32 blocks
    torch.manual_seed(0)
    return SamModel(config).eval(), processor


def build_model(preset: str, device: torch.device, dtype: torch.dtype, layer: int | None) -> LensModel:
    """The shipped LENS, or a randomly initialised one from configs (``tiny`` / ``mid`` / ``real``)."""
    if preset == "shipped":
        from lens.weights import load_lens

        return load_lens("lens:synthetic/lens", device=device).eval()
    from lens.backbone import BACKBONES
    from lens.decoders import DECODERS
    from lens.tiny import build_llava

    # A vocabulary of LLaVA-1.5's size, so the LM head costs what it costs at 7B (LISA decodes with it).
    vocab = 32064 if preset == "real" else 2000
    words = [*QUERY.lower().replace(".", " .").split(), "sure", "it", "[", "seg", "]", "?"]
    words += [f"w{i}" for i in range(vocab - len(words) - 9)]
    with torch.device(device):  # 7B random weights are initialised on the GPU, not in host memory
        llava, llava_processor = build_llava(words, _llava_spec(preset))
        sam, sam_processor = _build_sam(preset)
    llava, sam = llava.to(dtype).eval(), sam.to(dtype).eval()
    depth = llava.config.text_config.num_hidden_layers
    layer = layer or max(1, round(depth * 14 / 32))  # the paper's layer 14 of 32, at this depth
    config = LensConfig()
    config.backbone.layer = layer
    backbone = BACKBONES["llava"](llava, llava_processor, layer=layer)
    decoder = DECODERS["sam"](sam, sam_processor)
    model = LensModel(config, backbone, decoder).to(device)
    for name, part in (("head", model.head), ("descriptor", model.descriptor)):
        part.to(dtype)
        logger.debug("%s in %s", name, dtype)
    model.decoder.cls_position.data = model.decoder.cls_position.data.to(dtype)
    return model.eval()


def scene(index: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A deterministic test image (content does not change the time; size and aspect ratio do)."""
    rng = np.random.default_rng(index)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ----- timing --------------------------------------------------------------------------------------------------
def clock(device: torch.device) -> Callable[[], float]:
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def measure(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> tuple[float, float]:
    """(median seconds, peak memory bytes) of ``fn`` over ``reps`` calls after ``warmup`` untimed ones.

    Peak memory is the CUDA allocator's peak on a GPU and the process's peak resident size on a CPU.
    """
    now = clock(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        t0 = now()
        fn()
        times.append(now() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return statistics.median(times), peak


@contextlib.contextmanager
def stage_timers(model: LensModel, device: torch.device) -> Iterator[dict[str, float]]:
    """Accumulated seconds per LENS stage while the block runs (synchronising at every stage boundary)."""
    now = clock(device)
    totals: dict[str, float] = {}
    restore: list[Callable[[], None]] = []

    def timed(name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            t0 = now()
            out = fn(*args, **kwargs)
            totals[name] = totals.get(name, 0.0) + now() - t0
            return out

        return wrapper

    def patch(owner: object, attr: str, name: str) -> None:
        original = getattr(owner, attr)
        setattr(owner, attr, timed(name, original))
        if isinstance(owner, types.ModuleType):
            restore.append(lambda: setattr(owner, attr, original))
        else:  # an instance attribute shadowing the method: removing it restores the method
            restore.append(lambda: owner.__dict__.pop(attr, None))

    patch(model.backbone, "encode", "MLLM to layer k")
    vision = getattr(model.backbone.model.model, "vision_tower", None)
    if vision is not None:  # the vision tower runs inside encode: reported apart, subtracted in run()
        patch(vision, "forward", "vision tower")
    patch(model.decoder, "embed_images", "SAM image encoder")
    patch(model.head, "forward", "head (2 layers)")
    patch(lens_model, "extract_keypoints", "keypoints (NMS + sub-pixel)")
    patch(lens_model, "sample_neighbourhood", "descriptor")
    patch(model.descriptor, "forward", "descriptor")
    patch(model.decoder, "forward", "SAM mask decoder")
    try:
        yield totals
    finally:
        for undo in restore:
            undo()


# ----- the three pipelines -----------------------------------------------------------------------------------
def lens_run(model: LensModel, images: Sequence[Image.Image], texts: Sequence[str]) -> None:
    """LENS end to end on one query per image: binary masks at the original size."""
    with torch.inference_mode():
        inputs = model.prepare(images, texts)
        out = model(inputs)
        [(logits > 0).cpu() for logits in out.mask_logits]


def _mllm_inputs(model: LensModel, images: Sequence[Image.Image], texts: Sequence[str]) -> dict:
    """The MLLM's own processor inputs for (image, text) prompts, as the adapter builds them."""
    backbone = model.backbone
    return backbone._inputs(list(images), list(texts))


class SegProjection(nn.Module):
    """LISA's text_hidden_fcs: the [SEG] hidden state to one SAM prompt."""

    def __init__(self, d: int, d_s: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d_s))

    def forward(self, x):
        return self.fc(x)


def lisa_run(model: LensModel, proj: nn.Module, images: Sequence[Image.Image], texts: Sequence[str]) -> None:
    """Full 32-layer prefill + greedy decoding of "Sure, it is [SEG]." (8 tokens) + SAM from the [SEG] state."""
    llava = model.backbone.model
    with torch.inference_mode():
        inputs = _mllm_inputs(model, images, texts)
        new_tokens = len(SEG_ANSWER.replace(".", " .").replace("[", " [ ").replace("]", " ] ").split())
        out = llava.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
        seg = out.hidden_states[-1][-1][:, -1]  # (B, d) last layer at the last generated token
        prompt = proj(seg.to(next(proj.parameters()).dtype))[:, None]  # (B, 1, d_s)
        embeddings = model.decoder.embed_images(list(images))
        B = prompt.shape[0]
        points = torch.zeros(B, 0, 2, device=prompt.device, dtype=prompt.dtype)
        valid = torch.zeros(B, 0, dtype=torch.bool, device=prompt.device)
        low_res, _ = model.decoder(embeddings, prompt, points, valid)
        frames = [model.decoder.frame(im.width, im.height) for im in images]
        [(f.postprocess_masks(x.float()) > 0).cpu() for f, x in zip(frames, low_res, strict=True)]


class SmallUNet(nn.Module):
    """F-LMM's mask head in miniature: a two-level U-Net from stacked attention maps to mask logits."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.GELU())
        self.down2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU())
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.out = nn.Conv2d(2 * width, 1, 1)

    def forward(self, x):  # (B, C, gh, gw) -> (B, 1, gh, gw)
        a = self.down1(x)
        b = self.up(self.down2(a))[..., : a.shape[-2], : a.shape[-1]]
        return self.out(torch.cat([a, b], 1))


def flmm_spans(model: LensModel, images: Sequence[Image.Image], texts: Sequence[str]):
    """Where the image cells and the query sit in each prompt (bookkeeping, computed before timing)."""
    with torch.inference_mode():
        return model.backbone.encode(list(images), list(texts))


def flmm_run(
    model: LensModel, unet: nn.Module, images: Sequence[Image.Image], texts: Sequence[str], features
) -> None:
    """Full prefill with every layer's and head's attention gathered for the query, a U-Net, SAM box + mask.

    Attention probabilities exist only in eager attention (fused kernels never materialise them): that is the
    price F-LMM pays, so the MLLM runs eager here and in SDPA for LENS and LISA-style.
    """
    llava = model.backbone.model
    sam = model.decoder.sam
    with torch.inference_mode():
        inputs = _mllm_inputs(model, images, texts)
        # Eager attention (see run); logits only at the last position (F-LMM reads no logits at all).
        out = llava(**inputs, output_attentions=True, use_cache=False, logits_to_keep=1)
        B = inputs["input_ids"].shape[0]
        maps = []
        for b in range(B):
            cells = features.image_positions[b]
            cells = cells[cells >= 0]
            start, end = (int(v) for v in features.text_span[b])
            per_layer = [a[b, :, start:end][..., cells].mean(1) for a in out.attentions]  # (h, n) each
            gh, gw = (int(v) for v in features.grid_sizes[b])
            maps.append(torch.cat(per_layer).view(-1, gh, gw))  # (layers * heads, gh, gw)
        stack = torch.stack(maps).to(next(unet.parameters()).dtype)
        logits = unet(stack)  # (B, 1, gh, gw)
        embeddings = model.decoder.embed_images(list(images))
        side = 4 * embeddings.shape[-1]  # SAM's mask-prompt input: 4x its embedding grid (256 for SAM)
        low = F.interpolate(logits.float(), (side, side), mode="bilinear").to(
            embeddings.dtype
        )  # (B, 1, 4h, 4w)
        size = sam.config.prompt_encoder_config.image_size
        boxes = torch.tensor([[[0.0, 0.0, size / 2, size / 2]]] * B, device=low.device, dtype=low.dtype)
        masks = sam(image_embeddings=embeddings, input_boxes=boxes, input_masks=low, multimask_output=False)
        frames = [model.decoder.frame(im.width, im.height) for im in images]
        pred = masks.pred_masks[:, 0, 0]
        [(f.postprocess_masks(x.float()) > 0).cpu() for f, x in zip(frames, pred, strict=True)]


# ----- the arithmetic floor --------------------------------------------------------------------------------------
def _vit_flops(tokens: int, d: int, mlp: int, layers: int, attn_tokens: Sequence[int]) -> float:
    """Multiply-accumulate work (×2 = FLOPs) of ``layers`` ViT blocks over ``tokens`` tokens; attention over
    ``attn_tokens[i]`` keys per query in block i (a window's size for windowed blocks)."""
    linear = 2 * tokens * (4 * d * d + 2 * d * mlp) * layers
    attention = sum(4 * tokens * n * d for n in attn_tokens)
    return float(linear + attention)


def lens_flops(model: LensModel, prompt_length: int) -> dict[str, float]:
    """FLOPs of one LENS query, by stage, from the models' configs (the work any implementation must do)."""
    llava_config = model.backbone.model.config
    v, t = llava_config.vision_config, llava_config.text_config
    patches = (v.image_size // v.patch_size) ** 2
    depth = v.num_hidden_layers + 1 + llava_config.vision_feature_layer  # CLIP blocks LLaVA reads
    vision = _vit_flops(patches + 1, v.hidden_size, v.intermediate_size, depth, [patches + 1] * depth)
    vision += 2 * patches * (v.hidden_size * t.hidden_size + t.hidden_size * t.hidden_size)  # projector
    hd = t.hidden_size // t.num_attention_heads
    per_token = 2 * (
        t.hidden_size * t.num_attention_heads * hd * 2
        + 2 * t.hidden_size * t.num_key_value_heads * hd
        + 3 * t.hidden_size * t.intermediate_size
    )
    L = prompt_length
    causal_attention = 2 * 2 * (L * (L + 1) / 2) * t.num_attention_heads * hd  # QKᵀ and PV, causal
    k = model.backbone.layer
    mllm = k * (per_token * L + causal_attention)
    head = 2 * (per_token * L + causal_attention)
    s = model.decoder.sam.config.vision_config
    grid = s.image_size // s.patch_size
    window = s.window_size or grid
    padded = -(-grid // window) * window
    sam_encoder = 2.0 * grid * grid * 3 * s.patch_size**2 * s.hidden_size  # patch embedding
    for i in range(s.num_hidden_layers):  # windowed blocks run on the grid padded to whole windows
        tokens, keys = (grid * grid, grid * grid) if i in s.global_attn_indexes else (padded**2, window**2)
        sam_encoder += _vit_flops(tokens, s.hidden_size, s.mlp_dim, 1, [keys])
    sam_encoder += 2 * grid * grid * (s.hidden_size * s.output_channels + 9 * s.output_channels**2)  # neck
    sam_decoder = _sam_decoder_flops(model.decoder.sam.config.mask_decoder_config, grid * grid)
    return {
        "vision tower": vision,
        "MLLM layers 1..k": mllm,
        "head": head,
        "SAM image encoder": sam_encoder,
        "SAM mask decoder": float(sam_decoder),
    }


def _sam_decoder_flops(config, image_tokens: int, prompt_tokens: int = 24) -> float:
    """SAM's two-way transformer + upscaling. The work is in the image tokens: two attention projections per
    cross-attention (at the downsampled width), attention against the ~24 prompt + output tokens, and the two
    2x2 stride-2 transposed convolutions; the prompt tokens' own MLPs and self-attention are negligible."""
    d = config.hidden_size
    inner = d // config.attention_downsample_rate
    per_cross = 2 * image_tokens * d * inner + 2 * image_tokens * prompt_tokens * inner  # MACs
    layers = (
        config.num_hidden_layers * 2 * per_cross + per_cross
    )  # both directions per layer + final attention
    side = int(image_tokens**0.5)
    upscale = (2 * side) ** 2 * (d // 4) * d + (4 * side) ** 2 * (d // 8) * (d // 4)
    return 2.0 * (layers + upscale)


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Achieved FLOP/s of an n×n×n matrix multiply in ``dtype`` on ``device``: the floor's denominator."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds, _ = measure(lambda: a @ b, device, reps=20, warmup=3)
    return 2 * n**3 / seconds


# ----- the run -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    name: str
    batch: int
    seconds: float
    peak_bytes: float
    masks: int

    def cells(self) -> list[str]:
        return [
            self.name,
            str(self.batch),
            f"{self.seconds * 1000:.1f}",
            f"{self.masks / self.seconds:.1f}",
            f"{self.peak_bytes / 2**30:.2f}",
        ]


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_model(args.preset, device, dtype, args.layer)
    model.decoder.configure_image_encoder(attention="sdpa", compile=args.compile)
    reps, warmup = args.reps, args.warmup
    rows: list[Row] = []
    d = model.backbone.layer_spec().hidden_size
    proj = SegProjection(d, model.decoder.prompt_dim).to(device, dtype)
    n_maps = model.backbone.model.config.text_config.num_hidden_layers
    n_maps *= model.backbone.model.config.text_config.num_attention_heads
    unet = SmallUNet(n_maps).to(device, dtype)

    for batch in args.batches:
        images = [scene(i) for i in range(batch)]
        texts = [QUERY] * batch
        spans = flmm_spans(model, images, texts)
        for name, fn in (
            ("LENS", lambda im=images, tx=texts: lens_run(model, im, tx)),
            ("LISA-style", lambda im=images, tx=texts: lisa_run(model, proj, im, tx)),
            ("F-LMM-style", lambda im=images, tx=texts, f=spans: flmm_run(model, unet, im, tx, f)),
        ):
            llava = model.backbone.model
            implementation = llava.config._attn_implementation
            if name == "F-LMM-style":
                llava.set_attn_implementation("eager")
            try:
                seconds, peak = measure(fn, device, reps, warmup)
            finally:
                llava.set_attn_implementation(implementation)
            rows.append(Row(name, batch, seconds, peak, batch))
            logger.info("%-12s batch %2d: %8.1f ms", name, batch, seconds * 1000)

    # Stage shares of LENS at batch 1.
    image = scene(0)
    now = clock(device)
    with stage_timers(model, device) as stages:
        t0 = now()
        for _ in range(reps):
            lens_run(model, [image], [QUERY])
        staged_total = (now() - t0) / reps
    t_e2e = next(r.seconds for r in rows if r.name == "LENS" and r.batch == min(args.batches))
    stages = {k: v / reps for k, v in stages.items()}
    if "vision tower" in stages:  # exclusive times: the MLLM row is preprocessing + LLM layers 1..k
        stages["MLLM to layer k"] -= stages["vision tower"]
        stages = {
            ("preprocess + LLM layers 1..k" if k == "MLLM to layer k" else k): v for k, v in stages.items()
        }
    stages["rest (mask post-processing, glue)"] = max(staged_total - sum(stages.values()), 0.0)

    # Queries per image: each query cold (its own image embedding and prefix) against embed-once.
    per_query = []
    embed_once, _ = measure(lambda: model.embed_image(image), device, reps, warmup)
    embedded = model.embed_image(image)
    for q in args.queries:
        texts = [f"{QUERY} ({i})" for i in range(q)]
        cold, _ = measure(lambda tx=texts: [model.predict(image, t) for t in tx], device, reps, warmup)
        hot, _ = measure(lambda tx=texts: [model.predict(embedded, t) for t in tx], device, reps, warmup)
        batched, _ = measure(lambda tx=texts: model.predict(embedded, tx), device, reps, warmup)
        per_query.append(
            {
                "queries": q,
                "cold_ms": 1000 * cold / q,
                "set_image_ms": 1000 * hot / q,
                "set_image_batched_ms": 1000 * batched / q,
            }
        )
        logger.info(
            "%2d queries: %.1f ms/query cold, %.1f after embed_image", q, 1000 * cold / q, 1000 * hot / q
        )

    # Training step from cached features (the frozen encoders' outputs are inputs, as with a feature cache).
    train = train_step(model, device, reps, warmup)

    # The floor.
    with torch.inference_mode():
        prompt_length = int(model.backbone.encode([image], [QUERY]).attention_mask.sum())
    flops = lens_flops(model, prompt_length)
    rate = gemm_rate(device, dtype, args.gemm_size)
    floor = {b: b * sum(flops.values()) / rate for b in args.batches}
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "preset": args.preset,
        "compile": args.compile,
        "dtype": args.dtype,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "rows": [dataclasses.asdict(r) for r in rows],
        "stages_ms": {k: 1000 * v for k, v in stages.items()},
        "lens_e2e_ms": 1000 * t_e2e,
        "per_query": per_query,
        "embed_image_ms": 1000 * embed_once,
        "train": train,
        "flops": flops,
        "gemm_flops_per_s": rate,
        "floor_ms": {str(b): 1000 * s for b, s in floor.items()},
    }


def train_step(model: LensModel, device: torch.device, reps: int, warmup: int) -> dict:
    """Seconds and peak memory of one LENS step (forward, backward, AdamW) on precomputed frozen features."""
    images = [scene(i) for i in range(2)]
    masks = [np.zeros((im.height, im.width), np.uint8) for im in images]
    for m in masks:
        m[100:200, 150:300] = 1
    inputs = model.prepare(images, [QUERY] * 2, masks)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()

    def step():
        out = model(inputs)
        out.loss.float().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = measure(step, device, reps, warmup)
    model.eval()
    return {"batch": 2, "step_ms": 1000 * seconds, "peak_gib": peak / 2**30}


def table(result: dict) -> str:
    """The printed report: one table of rows, then stages, embed-once, floor and the headline ratios."""
    lines = [
        f"device {result['device']} ({result['threads']} threads), preset {result['preset']}, {result['dtype']}, "
        f"torch {result['versions']['torch']}, transformers {result['versions']['transformers']}",
        "",
        f"{'pipeline':<14}{'batch':>6}{'median ms':>12}{'masks/s':>10}{'peak GiB':>10}",
    ]
    for r in result["rows"]:
        cells = Row(**r).cells()
        lines.append(f"{cells[0]:<14}{cells[1]:>6}{cells[2]:>12}{cells[3]:>10}{cells[4]:>10}")
    lines += [
        "",
        f"LENS stages at batch 1 (end to end {result['lens_e2e_ms']:.1f} ms; stages synchronised, "
        f"{sum(result['stages_ms'].values()):.1f} ms in all):",
    ]
    total = sum(result["stages_ms"].values())
    for name, ms in result["stages_ms"].items():
        lines.append(f"  {name:<48}{ms:9.2f} ms {100 * ms / total:6.1f} %")
    lines += [
        "",
        f"queries on one image, ms per query (embed_image once: {result['embed_image_ms']:.1f} ms, not counted):",
        f"  {'queries':>7}{'cold':>10}{'embedded':>10}{'cheaper':>9}{'batched':>10}",
    ]
    for q in result["per_query"]:
        ratio = q["cold_ms"] / q["set_image_ms"]
        lines.append(
            f"  {q['queries']:>7}{q['cold_ms']:>10.1f}{q['set_image_ms']:>10.1f}{ratio:>8.1f}x"
            f"{q['set_image_batched_ms']:>10.1f}"
        )
    t = result["train"]
    lines += [
        "",
        f"training step on cached inputs (batch {t['batch']}): {t['step_ms']:.1f} ms, peak {t['peak_gib']:.2f} GiB",
    ]
    gflops = sum(result["flops"].values()) / 1e9
    lines += [
        "",
        f"floor: {gflops:.1f} GFLOP a query at {result['gemm_flops_per_s'] / 1e12:.2f} TFLOP/s (GEMM)",
    ]
    by_batch = {r["batch"]: r for r in result["rows"] if r["name"] == "LENS"}
    for b, floor_ms in result["floor_ms"].items():
        lens_ms = by_batch[int(b)]["seconds"] * 1000
        lines.append(
            f"  batch {b:>3}: floor {floor_ms:9.2f} ms, LENS {lens_ms:9.1f} ms = {lens_ms / floor_ms:.1f}x floor"
        )
    lines.append("")
    for b in sorted(by_batch):
        get = {r["name"]: r["seconds"] for r in result["rows"] if r["batch"] == b}
        lines.append(
            f"batch {b:>3}: LISA-style / LENS = {get['LISA-style'] / get['LENS']:.2f}x, "
            f"F-LMM-style / LENS = {get['F-LMM-style'] / get['LENS']:.2f}x"
        )
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("tiny", "mid", "real", "shipped"), default="shipped")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--layer", type=int, default=None, help="tap layer k (random presets; default 14/32 of depth)"
    )
    parser.add_argument("--batches", type=_ints, default=[1, 16])
    parser.add_argument("--queries", type=_ints, default=[1, 4, 16])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--gemm-size", type=int, default=None, help="GEMM side for the floor (default by device)"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the SAM image encoder")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.gemm_size = args.gemm_size or (8192 if args.device.startswith("cuda") else 1024)
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
