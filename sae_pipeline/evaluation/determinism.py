"""Deterministic execution for evaluation: seeds, deterministic kernels, no TF32, math-only attention on CUDA."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

# cuBLAS reads this when CUDA initialises, so it must be in the environment before any CUDA call.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed python/numpy/torch and force deterministic algorithms for the block; restore the global flags after
    (training code elsewhere may legitimately use non-deterministic kernels)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    saved_sdp = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if torch.cuda.is_available():
        # flash / memory-efficient SDPA kernels may pick tilings per run; the math kernel is reproducible
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic,
         torch.backends.cudnn.benchmark) = saved[1:]
        torch.backends.cuda.enable_flash_sdp(saved_sdp[0])
        torch.backends.cuda.enable_mem_efficient_sdp(saved_sdp[1])
