"""`train.compile`: the loss computation of a training step (forward + loss terms, and through
AOTAutograd their backward) run by `torch.compile`.

The step's loss is many small ops; on CUDA each is a kernel launch, and a launch-bound step gains
from fusing them and from replaying them as one CUDA graph (mode "reduce-overhead").  On CPU the
default inductor mode fuses elementwise work into C++ loops (it needs a C++ compiler).

What the schedule changes between steps must not recompile every step:
- k (graduated sparsity), m (curriculum) and the penalties' warm-up factors are plain attributes of
  the model.  Dynamo guards on such values; with `allow_unspec_int_on_nn_module` and its automatic
  dynamic shapes, the first change of each makes it symbolic, so the anneal costs one recompile,
  not one per value.  A branch on a value (pair path on / off, a penalty weight reaching 0) costs
  one recompile per side.
- the batch size of an epoch's last batch becomes symbolic the same way, after one recompile.
- AuxK's dead count, read on the host in eager mode, is not read at all here (`auxk_loss` takes its
  fixed-shape form while compiling): no graph break, no host sync.
With CUDA graphs a symbolic size still records one graph per value it takes (each k of the anneal
once, then replays), which costs a warm-up run and a capture, not a compilation.  The attention
composer's fused node runs eagerly between compiled pieces (`composer._received_attention_eager`).
Models trained one after another in one process share dynamo's cache (it is kept per code
object): a model whose config matches an earlier one's reuses its graphs (a seed grid compiles
once), and each other config adds its recompiles to the same count.  `RECOMPILE_LIMIT` bounds
that count; past it dynamo warns and runs the step eagerly (same results, no speed-up): measured,
six models of four kinds in a row (pair, topk, relu, compsae, pair, topk) made 10 graphs.

The model itself is not wrapped: its state dict keeps its own names (no `_orig_mod.` prefix), so
checkpoints written with and without compile are the same files."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compsae.errors import UserError

RECOMPILE_LIMIT = 32  # per compiled frame; a full run needs about ten (see the module docstring)


def compile_mode(device: torch.device, data_parallel: bool = False) -> str:
    """The torch.compile mode for `device`: CUDA graphs on CUDA (the step is launch-bound), the
    default inductor mode elsewhere and in a data-parallel job (DistributedDataParallel's
    gradient all-reduce runs from autograd hooks between the compiled pieces, which a captured
    graph would not replay)."""
    return "reduce-overhead" if device.type == "cuda" and not data_parallel else "default"


def check_compiler(device: torch.device) -> None:
    """Raise a one-line `UserError` when `torch.compile` cannot build kernels for `device`."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise UserError(
                "train.compile on CUDA needs triton (pip install triton, the version your torch "
                "wheel names); or set train.compile=false"
            )
        return
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None and shutil.which("clang++") is None:
        raise UserError(
            f"train.compile on CPU needs a C++ compiler ({cxx} not found): install g++ "
            "(apt-get install g++) or set train.compile=false"
        )


class CompiledLoss:
    """Callable like the loss module it wraps (`(x, dead_mask) -> (terms, out)`), compiled.

    Outputs of a CUDA-graph replay live in memory the next replay overwrites: use them (backward,
    metrics, dead-latent counts) before the next call, as the trainer does."""

    def __init__(
        self, module: nn.Module, device: torch.device, data_parallel: bool = False
    ) -> None:
        check_compiler(device)
        self.mode = compile_mode(device, data_parallel)
        self.cuda_graphs = self.mode == "reduce-overhead"
        self.fn = torch.compile(module, mode=self.mode, dynamic=None)

    def __call__(self, x: torch.Tensor, dead_mask: torch.Tensor | None) -> Any:
        if self.cuda_graphs:
            # a new training step: the previous step's graph outputs are no longer needed
            torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(
            allow_unspec_int_on_nn_module=True, recompile_limit=RECOMPILE_LIMIT
        ):
            return self.fn(x, dead_mask)


def loss_step(
    module: nn.Module, device: torch.device, compile: bool, data_parallel: bool = False
) -> Callable[..., Any]:
    """The function a trainer calls for a step's loss: `module` itself, or compiled (`compile`;
    `data_parallel`: `module` is a DistributedDataParallel wrapper)."""
    return CompiledLoss(module, device, data_parallel) if compile else module
