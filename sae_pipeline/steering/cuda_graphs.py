"""CUDA graphs for a hook's decode step: the steering rule's handful of small kernels replayed as one launch.

A decode step hands each hooked layer one token per row; on a GPU the rule's ~8 kernels then cost their launches,
not their arithmetic (H200, Mistral-7B-shaped model, five layers: eager ~100 us a layer, 2.25 % of the decode step;
replayed ~24 us, 0.53 %). `DecodeGraphs.run(key, body, x)` captures `body` once per key (the caller puts into it
everything the body decides in Python: shape, dtype, device, strengths, mode, inference mode) after a warm-up on a
side stream, then replays it: the input is copied into the graph's static buffer and the graph's static output is
returned, valid until the same graph replays (the decoder adds it to the residual stream at once). Tensors the body
reads must keep their storage between calls: state that changes per request is copied into a fixed buffer, never
rebound; settings it reads otherwise (a LayerSteering's epsilon) are fixed once patched. A capture synchronises the
GPU and costs a few milliseconds, so each layer keeps its most recent `MAX_GRAPHS` (a server seeing many batch sizes
re-captures the ones it evicted)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class _Captured(NamedTuple):
    graph: torch.cuda.CUDAGraph
    static_in: torch.Tensor
    static_out: torch.Tensor
    keep: tuple  # what the captured kernels read by address (the caller's buffers), kept alive with the graph


MAX_GRAPHS = 16


class DecodeGraphs:
    def __init__(self) -> None:
        self.captured: dict[tuple, _Captured] = {}  # in capture order: the oldest is evicted first

    def run(self, key: tuple, body: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
            keep: tuple = ()) -> torch.Tensor:
        with torch.cuda.device(x.device):  # a model split over GPUs: capture and replay on the layer's own
            entry = self.captured.get(key)
            if entry is None:
                static_in = x.clone()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up: lazy casts, cuBLAS handles and workspaces, not captured
                    body(static_in)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = body(static_in)
                if len(self.captured) >= MAX_GRAPHS:
                    del self.captured[next(iter(self.captured))]
                entry = self.captured[key] = _Captured(graph, static_in, static_out, keep)
            entry.static_in.copy_(x)
            entry.graph.replay()
        return entry.static_out
