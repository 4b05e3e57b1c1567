"""Counted forward FLOPs of a model or one of its residual subnetworks.

FLOPs are counted, not estimated: one forward of one image runs under ``torch.utils.flop_counter.FlopCounterMode``,
which counts convolutions, matmuls and attention (element-wise ops are not counted). The model may live on the
``meta`` device (no memory, no compute), as the benchmarks' copy does. Used by the loafing evaluation (relative
FLOPs of every subnet) and benchmarks/step_cost.py (the FLOP-ideal step-cost ratio).
"""
from contextlib import nullcontext
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .blocks import BlockLayout, SubnetSpec
from .skip import subnet

__all__ = ['count_flops', 'count_relative_flops', 'forward_flops', 'try_forward_flops']

_FLOP_CACHE: Dict[tuple, int] = {}


def _counted_forward(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of ``model(x)``: under no_grad, else (FlopCounterMode's module tracking fails under no_grad on some
    models, e.g. CaiT's class-attention blocks, in plain torch too) with autograd on and the graph discarded."""
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    except Exception:
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    return int(counter.get_total_flops())


def forward_flops(
        model: nn.Module,
        input_size: Sequence[int],
        layout: Optional[BlockLayout] = None,
        spec: Optional[SubnetSpec] = None,
) -> int:
    """FLOPs of one forward on one image of ``input_size`` (C, H, W): of subnet ``spec`` if given, else of the model
    as it is (a plain model needs no layout).

    The model runs in eval mode (BatchNorm running statistics are not touched); its train/eval mode is restored.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with subnet(model, layout, spec) if spec is not None else nullcontext():
            return _counted_forward(model, torch.zeros(1, *input_size, device=device, dtype=dtype))
    finally:
        model.train(was_training)


def try_forward_flops(model: nn.Module, input_size: Sequence[int]) -> Tuple[Optional[int], str]:
    """``(forward_flops(model, input_size), '')``, or ``(None, reason)`` in one line when they cannot be counted:
    a report shows 'n/a' with the reason instead of failing the export."""
    try:
        return forward_flops(model, input_size), ''
    except Exception as e:  # a counting failure is a missing figure, never a failed export
        return None, f'{type(e).__name__}: {" ".join(str(e).split())}'[:200]


def _flop_key(model: nn.Module, layout: BlockLayout, spec: SubnetSpec, input_size: Sequence[int]) -> tuple:
    # FLOPs depend on the architecture and the input size, not on the weights: key on what defines them.
    n_params = sum(p.numel() for p in model.parameters())
    return (type(model).__qualname__, n_params, getattr(model, 'num_classes', None), layout.paths,
            spec.keep, tuple(int(s) for s in input_size))


def count_flops(model: nn.Module, layout: BlockLayout, spec: Optional[SubnetSpec], input_size: Sequence[int]) -> int:
    """``forward_flops`` of subnet ``spec`` (the full network if None), cached per architecture, keep-mask and
    input size."""
    spec = spec or layout.full_spec()
    key = _flop_key(model, layout, spec, input_size)
    if key not in _FLOP_CACHE:
        _FLOP_CACHE[key] = forward_flops(model, input_size, layout, spec)
    return _FLOP_CACHE[key]


def count_relative_flops(model: nn.Module, layout: BlockLayout, spec: SubnetSpec, input_size: Sequence[int]) -> float:
    """FLOPs of subnet ``spec`` over the full network's, both counted on one image of ``input_size``."""
    full = count_flops(model, layout, layout.full_spec(), input_size)
    return count_flops(model, layout, spec, input_size) / full if full else float('nan')
