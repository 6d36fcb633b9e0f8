"""The synthetic world's own pretrained models (small MLLM, small SAM) and the LENS head trained on them."""
