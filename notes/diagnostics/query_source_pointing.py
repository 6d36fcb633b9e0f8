"""Where does grounding break: the image tokens, or the query the text tokens carry?

Encodes train/val queries with the frozen MLLM (layer k), then trains three small pointers on the same image
tokens, each with its query from a different source, and reports how often the argmax cell lies on the target
(coverage > 0.5), on val queries with a target, overall and by how the query picks its target (attributes,
relation, extreme, reasoning clue):

- oracle:   the target's true colour and shape (learned embeddings): what the image tokens allow;
- mean:     a linear map of the mean of the text tokens' features: one query from the whole prompt;
- eq1:      every text token queries on its own and their image distributions are averaged (eq. 1's A_c,
            restricted to the image columns).

It also probes (linear, held out) how often the mean text feature names the target's colour and shape.

python notes/diagnostics/query_source_pointing.py [MLLM] [LAYER] [TRAIN_SCENES] [PROMPT]
    # defaults: lens:synthetic/mllm 5 1000 lens; PROMPT "vqa" asks "what is {query} in this image?" instead
"""

import re
import sys

import torch
from PIL import Image

from lens.config import LensConfig
from lens.data.synthetic import COLOURS, SHAPES, SyntheticWorld
from lens.data.templates import format_question
from lens.weights import build_lens

MODEL, LAYER, TRAIN_SCENES, PROMPT = (
    sys.argv[1:] + ["lens:synthetic/mllm", "5", "1000", "lens"][len(sys.argv) - 1 :]
)[:4]
MAX_TEXT = 64
torch.manual_seed(0)
config = LensConfig.from_yaml("configs/synthetic.yaml")
config.backbone.model_id, config.backbone.layer = MODEL, int(LAYER)
backbone = build_lens(config, torch.device("cpu")).backbone
COLOURS, SHAPES = list(COLOURS), list(SHAPES)
world = SyntheticWorld(seed=0)


def instruction(query: str, is_sentence: bool) -> str:
    """LENS's segmentation prompt, or (PROMPT "vqa") the identify question the MLLM may have been trained on."""
    if PROMPT == "lens":
        return format_question(query, is_sentence, None)
    return query if is_sentence else f"what is {query} in this image?"


PHRASES = ("attributes", "relation", "extreme", "clue")


def phrase_kind(kind: str, query: str) -> str:
    """How a query picks its target: by its attributes, a relation to another object, an extreme, or a clue."""
    if kind != "referring":
        return "clue"
    if re.search(r"\b(left of|right of|above|below)\b", query):
        return "relation"
    return "extreme" if "most " in query else "attributes"


def encode(split: str, scenes: int) -> dict[str, torch.Tensor]:
    queries = [
        q for s in world.split(split)[:scenes] for q in s.segmentation_queries() if q.kind != "no_target"
    ]
    out: dict[str, list] = {"image": [], "text": [], "text_mask": [], "target": [], "colour": [], "shape": []}
    out["phrase"] = [PHRASES.index(phrase_kind(q.kind, q.sample.query)) for q in queries]
    for i in range(0, len(queries), 64):
        batch = queries[i : i + 64]
        f = backbone.encode(
            [Image.fromarray(q.sample.image) for q in batch],
            [instruction(q.sample.query, q.sample.is_sentence) for q in batch],
        )
        rows = torch.arange(len(batch))
        n_image = f.grid_size[0] * f.grid_size[1]
        out["image"].append(
            f.hidden_states[rows[:, None], f.image_span[:, :1] + torch.arange(n_image)].half()
        )
        text = torch.zeros(len(batch), MAX_TEXT, f.hidden_states.shape[-1], dtype=torch.half)
        text_mask = torch.zeros(len(batch), MAX_TEXT, dtype=torch.bool)
        for r, (start, end) in enumerate(f.text_span.tolist()):
            text[r, : end - start], text_mask[r, : end - start] = f.hidden_states[r, start:end].half(), True
        out["text"].append(text)
        out["text_mask"].append(text_mask)
        masks = [torch.as_tensor(q.sample.mask, dtype=torch.uint8) for q in batch]
        out["target"].append(
            torch.stack([g.mask_to_grid(m) for g, m in zip(f.geometries, masks, strict=True)])
        )
        out["colour"].append(torch.tensor([COLOURS.index(q.target.colour) for q in batch]))
        out["shape"].append(torch.tensor([SHAPES.index(q.target.shape) for q in batch]))
    phrase = torch.tensor(out.pop("phrase"))
    return {"phrase": phrase} | {
        k: torch.cat(v).float() if k in ("image", "text") else torch.cat(v) for k, v in out.items()
    }


train, val = encode("train", int(TRAIN_SCENES)), encode("val", 60)
val["target"] = val["target"].flatten(1)
train["target"] = train["target"].flatten(1)


def rms(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)


def pointer(source: str) -> torch.Tensor:
    d = train["image"].shape[-1]
    keys = torch.nn.Linear(d, 64)
    parts = torch.nn.ModuleList(
        [keys, torch.nn.Embedding(len(COLOURS), 64), torch.nn.Embedding(len(SHAPES), 64)]
    )
    parts.append(torch.nn.Linear(d, 64))
    opt = torch.optim.Adam(parts.parameters(), 3e-3)

    def distribution(data: dict, idx: torch.Tensor) -> torch.Tensor:  # (b, n_image), sums to 1
        k = keys(rms(data["image"][idx]))
        if source == "oracle":
            q = parts[1](data["colour"][idx]) + parts[2](data["shape"][idx])
            return torch.einsum("bd,bnd->bn", q, k).softmax(1)
        q, m = parts[3](rms(data["text"][idx])), data["text_mask"][idx]  # (b, T, 64), (b, T)
        if source == "mean":
            q = (q * m[..., None]).sum(1) / m.sum(1, keepdim=True)
            return torch.einsum("bd,bnd->bn", q, k).softmax(1)
        p = torch.einsum("btd,bnd->btn", q, k).softmax(2)  # eq1: per-token, then averaged over text tokens
        return (p * m[..., None]).sum(1) / m.sum(1, keepdim=True)

    for _ in range(900):
        idx = torch.randint(len(train["target"]), (128,))
        t = train["target"][idx]
        loss = -(t / t.sum(1, keepdim=True) * distribution(train, idx).clamp(min=1e-9).log()).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        best = distribution(val, torch.arange(len(val["target"]))).argmax(1)
    return (val["target"][torch.arange(len(best)), best] > 0.5).float()  # (val queries,) 1 where on target


def text_probe(attribute: str, classes: int) -> float:
    m = train["text_mask"][..., None]
    x = (train["text"] * m).sum(1) / m.sum(1)
    mv = val["text_mask"][..., None]
    xv = (val["text"] * mv).sum(1) / mv.sum(1)
    mu, sd = x.mean(0), x.std(0) + 1e-5
    probe = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(probe.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(400):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(probe((x - mu) / sd), train[attribute]).backward()
        opt.step()
    return (probe((xv - mu) / sd).argmax(1) == val[attribute]).float().mean().item()


print(
    f"{MODEL} layer {LAYER}, {PROMPT} prompts: {len(train['target'])} train / {len(val['target'])} val queries with a target"
)
print(
    f"  ceiling (val targets with a cell > 0.5 covered): {(val['target'].max(1).values > 0.5).float().mean():.3f}"
)
counts = ", ".join(f"{name} {(val['phrase'] == i).sum()}" for i, name in enumerate(PHRASES))
print(f"  val queries by phrase kind: {counts}")
for source in ("oracle", "mean", "eq1"):
    hits = pointer(source)
    by_kind = " / ".join(f"{hits[val['phrase'] == i].mean():.3f}" for i in range(len(PHRASES)))
    print(f"  pointing, query from {source}: {hits.mean():.3f} ({'/'.join(PHRASES)}: {by_kind})", flush=True)
print(
    f"  mean text feature -> target colour {text_probe('colour', len(COLOURS)):.3f}, "
    f"shape {text_probe('shape', len(SHAPES)):.3f} (chance {1 / len(COLOURS):.3f} / {1 / len(SHAPES):.3f})"
)
