"""Average the trainable weights of LENS checkpoints with the same config (a "model soup") into a new one.

python notes/diagnostics/weight_average.py OUT_DIR CHECKPOINT CHECKPOINT [...]   # then lens eval OUT_DIR
"""

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from lens.assets import resolve_model_id
from lens.weights import CONFIG_NAME, WEIGHTS_NAME

out, sources = Path(sys.argv[1]), [Path(resolve_model_id(s)) for s in sys.argv[2:]]
if len(sources) < 2:
    sys.exit("usage: weight_average.py OUT_DIR CHECKPOINT CHECKPOINT [...]")
states = [load_file(s / WEIGHTS_NAME) for s in sources]
if any(state.keys() != states[0].keys() for state in states):
    sys.exit("the checkpoints hold different tensors: they are not the same model")
average = {
    k: (sum(state[k].double() for state in states) / len(states)).to(states[0][k].dtype) for k in states[0]
}
out.mkdir(parents=True, exist_ok=True)
shutil.copy(sources[0] / CONFIG_NAME, out / CONFIG_NAME)
save_file(average, out / WEIGHTS_NAME)
print(f"{out}: the mean of {len(sources)} checkpoints ({len(average)} tensors)")
