"""Systems LENS is compared with, each behind the same evaluation entry point as LENS (``lens.evaluation``).

``training_free``: the frozen MLLM's own attention peaks clicked into the pretrained SAM (nothing trains).
"""
