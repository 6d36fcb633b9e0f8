"""Every family answers the agent's router the same way: the likelihood of an answer start is the chain rule
over the untouched model's own next-token distributions."""

from __future__ import annotations

import pytest
import torch

from backbone_checks import random_image
from lens.backbone import BACKBONES
from lens.tiny_families import TINY_FAMILIES, build_family


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_score_continuations_is_the_chain_of_next_token_log_probs(family):
    model, processor = build_family(family)
    backbone = BACKBONES[family](model, processor, layer=2)
    image, prompt = random_image(40, 24, seed=0), "the ring"
    tokenizer = backbone.processor.tokenizer
    vocab = [t for t in tokenizer.get_vocab() if t.isalpha()][:2]
    two = " ".join(vocab)
    ids = tokenizer(two, add_special_tokens=False)["input_ids"]
    scores = backbone.score_continuations(image, prompt, [two])
    inputs = backbone._inputs([image], [prompt])
    total = 0.0
    for n, token in enumerate(ids):  # one forward pass per token: prompt + the tokens before it
        step = {  # per-token inputs (ids, mask, Qwen's token types) grown by n text tokens
            k: torch.cat(
                [
                    v,
                    torch.tensor(
                        [ids[:n]] if k == "input_ids" else [[int(k != "mm_token_type_ids")] * n],
                        dtype=v.dtype,
                    ),
                ],
                1,
            )
            if isinstance(v, torch.Tensor) and v.shape == inputs["input_ids"].shape
            else v
            for k, v in inputs.items()
        }
        with torch.inference_mode():
            logits = backbone.model(**step).logits[0, -1].float()
        total += float(logits.log_softmax(-1)[token])
    assert float(scores[0]) == pytest.approx(total, abs=1e-4)
