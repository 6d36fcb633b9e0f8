"""Convert a LENS checkpoint written before the decoder contract (v1) to the current layout, in place.

v1 saved SAM's parts under ``bridge.`` and, because its trainable prefix covered the whole mask decoder, also
SAM's frozen IoU head and multimask hypernetworks. Now the keys are ``decoder.``, only what trains is saved
(``LensModel.trainable_state_dict``), the weights name their decoder in the safetensors metadata, and the
config names it in ``decoder.name``. Usage: ``python tools/convert_lens_v1.py src/lens/assets/synthetic/lens``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

# Never trained (they cannot reach LENS's single mask): the IoU head and the hypernetworks of masks 1-3.
FROZEN = re.compile(r"^decoder\.sam\.mask_decoder\.(iou_prediction_head\.|output_hypernetworks_mlps\.[1-9])")


def convert(directory: Path) -> None:
    weights, config = directory / "model.safetensors", directory / "lens_config.yaml"
    state = load_file(str(weights))
    if not any(k.startswith("bridge.") for k in state):
        raise SystemExit(f"{weights} has no bridge.* keys: already converted?")
    renamed = {
        ("decoder." + k.removeprefix("bridge.") if k.startswith("bridge.") else k): v
        for k, v in state.items()
    }
    kept = {k: v.contiguous() for k, v in renamed.items() if not FROZEN.match(k)}
    save_file(kept, str(weights), metadata={"decoder": "sam"})
    text = config.read_text()
    if "\ndecoder:\n  name:" not in text:
        config.write_text(text.replace("\ndecoder:\n", "\ndecoder:\n  name: sam\n", 1))
    print(
        f"{directory}: {len(state)} -> {len(kept)} tensors ({len(renamed) - len(kept)} frozen ones dropped)"
    )


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["src/lens/assets/synthetic/lens"]:
        convert(Path(arg))
