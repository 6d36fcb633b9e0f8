"""Mean training losses over the WINDOW steps before chosen steps of a run, from its ``train_log.jsonl``.

python notes/diagnostics/loss_windows.py RUN_DIR [STEP ...] [--window 200]

Without STEPs: every 1000th step and the last one logged. This is how docs/pretraining.md compares runs
("mean Dice loss over the 200 steps before step 8000"): one step's loss is too noisy (24 queries).
"""

import json
import sys
from pathlib import Path

args = sys.argv[1:]
window = 200
if "--window" in args:
    at = args.index("--window")
    window = int(args[at + 1])
    del args[at : at + 2]
if not args:
    sys.exit("usage: loss_windows.py RUN_DIR [STEP ...] [--window 200]")
log = Path(args[0]) / "train_log.jsonl"
if not log.is_file():
    sys.exit(f"no train_log.jsonl in {args[0]}")
records = {r["step"]: r for r in map(json.loads, log.read_text().splitlines())}
last = max(records)
steps = [int(s) for s in args[1:]] or [*range(1000, last + 1, 1000), last]
print(f"{log} ({last} steps): mean over the {window} steps before each step")
print("step      dice    bce     attention  lr at the step")
for step in sorted(set(steps)):
    rows = [records[s] for s in range(max(1, step - window + 1), step + 1) if s in records]
    if not rows:
        print(f"{step:<9} not logged")
        continue
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("dice_loss", "bce_loss", "attention_loss")}
    lr = records[step]["lr"] if step in records else float("nan")
    print(
        f"{step:<9} {mean['dice_loss']:.3f}   {mean['bce_loss']:.3f}   {mean['attention_loss']:.3f}"
        f"      {lr:.2e}"
    )
