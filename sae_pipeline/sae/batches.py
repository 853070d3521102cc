"""Training batches for the SAE: one seeded permutation per epoch, delivered on the device the SAE trains on."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch


def training_batches(train_ND: torch.Tensor, batch_tokens: int, seed: int, first_step: int, total_steps: int,
                     device: torch.device) -> Iterator[torch.Tensor]:
    """Raw (B, D) batches on `device` for steps first_step..total_steps-1, in the data's dtype; one permutation
    of the tokens per epoch.

    Host-resident data bound for a GPU (the SAE stage's case) is gathered a batch ahead by a background thread into
    pinned memory and copied without blocking: the step waits neither for the host's gather nor for a pageable
    copy, which would hold the host until the GPU had drained its queue. Elsewhere a batch is a plain gather."""
    steps_per_epoch = train_ND.shape[0] // batch_tokens
    prefetch = train_ND.device.type == "cpu" and device.type == "cuda"
    orders: dict[int, torch.Tensor] = {}

    def gather(step: int) -> torch.Tensor:
        epoch, offset = divmod(step, steps_per_epoch)
        if epoch not in orders:  # derived from the seed alone, so a resume sees the same; made on the CPU (the same
            # on every device) and moved once to the data, so a GPU-resident batch needs no per-step index copy
            orders.clear()
            orders[epoch] = torch.randperm(train_ND.shape[0], generator=torch.Generator().manual_seed(
                seed * 1000 + epoch)).to(train_ND.device)
        batch_ids = orders[epoch][offset * batch_tokens:(offset + 1) * batch_tokens]
        if not prefetch:
            return train_ND[batch_ids].to(device)
        pinned_BD = torch.empty((batch_tokens, train_ND.shape[1]), dtype=train_ND.dtype, pin_memory=True)
        return torch.index_select(train_ND, 0, batch_ids, out=pinned_BD)

    if not prefetch:
        yield from (gather(step) for step in range(first_step, total_steps))
        return
    # One worker: gathers run in step order. The caching host allocator keeps a pinned block until the copy that
    # read it has finished, so a block is never refilled under a copy in flight.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sae-batches") as worker:
        upcoming = worker.submit(gather, first_step) if first_step < total_steps else None
        for step in range(first_step, total_steps):
            pinned_BD = upcoming.result()
            upcoming = worker.submit(gather, step + 1) if step + 1 < total_steps else None
            yield pinned_BD.to(device, non_blocking=True)
