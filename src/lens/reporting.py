"""gIoU / cIoU tables from per-query records: every split and subset, and the paper's Table 2 / Table 3 layouts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from lens.metrics import IoUAccumulator

REASON_SEG = "reason_seg"
REFER_TABLE: tuple[tuple[str, tuple[str, ...]], ...] = (  # the columns of the paper's Table 3
    ("refcoco", ("val", "testA", "testB")),
    ("refcoco+", ("val", "testA", "testB")),
    ("refcocog", ("val", "test")),
)
OVERALL, SHORT, LONG = "overall", "short", "long"
HELD_OUT = "held_out"  # queries whose target is of a kind held out of training (Sample.held_out)
PERCENT = 100.0  # tables show percentages, JSON keeps fractions


def _metrics(records: list[dict[str, Any]]) -> dict[str, float | int]:
    acc = IoUAccumulator()
    acc.load_state_dict({**acc.state_dict(), "per_sample": [
        {k: r[k] for k in ("key", "intersection", "union", "iou")} for r in records
    ]})  # fmt: skip
    return acc.compute()


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | int]]]:
    """gIoU / cIoU / count per split label and subset: overall, short / long queries, per query kind, and
    targets of a kind held out of training (``held_out``, e.g. the synthetic world's colour x shape pairs)."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in records:
        subsets = groups.setdefault(f"{r['dataset']}/{r['split']}", {})
        names = [OVERALL, LONG if r["is_sentence"] else SHORT] + ([f"kind:{r['kind']}"] if r["kind"] else [])
        names += [HELD_OUT] if r.get("held_out") else []  # records written before the flag existed lack it
        for name in names:
            subsets.setdefault(name, []).append(r)
    return {
        label: {name: _metrics(rs) for name, rs in sorted(subsets.items())}
        for label, subsets in sorted(groups.items())
    }


def table2(summary: dict[str, Any]) -> dict[str, dict[str, float] | None] | None:
    """ReasonSeg in the paper's Table 2 layout: val overall; test short / long / overall (gIoU, cIoU)."""
    cells = {
        "val": ("val", OVERALL),
        "test_short": ("test", SHORT),
        "test_long": ("test", LONG),
        "test_overall": ("test", OVERALL),
    }
    table = {name: _cell(summary, f"{REASON_SEG}/{split}", subset) for name, (split, subset) in cells.items()}
    return table if any(table.values()) else None


def table3(summary: dict[str, Any]) -> dict[str, float | None] | None:
    """RefCOCO / RefCOCO+ / RefCOCOg cIoU in the paper's Table 3 layout."""
    table = {}
    for dataset, splits in REFER_TABLE:
        for split in splits:
            cell = _cell(summary, f"{dataset}/{split}", OVERALL)
            table[f"{dataset}/{split}"] = None if cell is None else cell["ciou"]
    return table if any(v is not None for v in table.values()) else None


def _cell(summary: dict[str, Any], label: str, subset: str) -> dict[str, float] | None:
    found = summary.get(label, {}).get(subset)
    return None if found is None else {"giou": found["giou"], "ciou": found["ciou"]}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{PERCENT * value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(results: dict[str, Any], method: str = "LENS") -> str:
    """Results as Markdown: Table 2 / Table 3 layouts when present, then every split and subset."""
    lines: list[str] = []
    if results.get("table2"):
        t2 = results["table2"]
        header = ["Method"] + [f"{name.replace('_', ' ')} {m}" for name in t2 for m in ("gIoU", "cIoU")]
        cells = [_pct(None if t2[name] is None else t2[name][m]) for name in t2 for m in ("giou", "ciou")]
        lines += ["## ReasonSeg (Table 2 layout)", "", *_table(header, [[method, *cells]]), ""]
    if results.get("table3"):
        t3 = results["table3"]
        lines += ["## Referring segmentation, cIoU (Table 3 layout)", ""]
        lines += [*_table(["Method", *t3], [[method, *(_pct(v) for v in t3.values())]]), ""]
    rows = [
        [label, subset, str(m["count"]), _pct(m["giou"]), _pct(m["ciou"])]
        for label, subsets in results["splits"].items()
        for subset, m in subsets.items()
    ]
    lines += ["## All splits", "", *_table(["Split", "Subset", "Queries", "gIoU", "cIoU"], rows), ""]
    return "\n".join(lines)
