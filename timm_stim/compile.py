"""Regional torch.compile for stimulative training: every residual block compiled on its own.

Compiling the whole model specialises on the skip pattern (a new graph per subnet, and dynamo's recompile
limit is 8). Here each block gets its own compiled entry points, the skip decision stays in Python (a block
skipped by `subnet()` runs its identity forward outside dynamo), so skip patterns never recompile.

Why per-block entry points rather than `nn.Module.compile()`: dynamo keys its cache and recompile limit on the
code object, which `nn.Module.compile` shares among all blocks of a class (all ResNet Bottlenecks); stage
widths x BN mode (subnet passes freeze BN statistics) x input sizes then hit the limit within the first step
and the remaining blocks silently run eagerly. Calls with the shape of the block's first call (the full pass)
go to a static-shape entry point; other shapes (ST++ smaller inputs, a smaller last batch) to a second one,
static per shape when there are at most `max_static_sizes` subnet sizes (`--stim-sizes` buckets), else
`dynamic=True`. Known limit (torch 2.14, inductor): dynamic conv backward graphs are still specialised per
spatial size, so convnets with many random sizes recompile per size until the limit, after which new sizes run
eagerly: compile convnets with bucketed sizes. Avoiding dynamo's automatic-dynamic recompile also avoids an
inductor error in torch 2.14 ("Cannot convert expression to float" when a stride-2 block recompiles at 3x3).
"""
from __future__ import annotations

import logging
import types
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from .blocks import BlockLayout

__all__ = ['compile_blocks']

_logger = logging.getLogger(__name__)


def _block_call(module, *args, **kwargs):
    return module._call_impl(*args, **kwargs)


def _compiled_entry(name: str, **compile_kwargs) -> Callable:
    """torch.compile of a fresh copy of `_block_call` (a new code object: its own dynamo cache and limit)."""
    try:
        code = _block_call.__code__.replace(co_name=name, co_qualname=name)
    except TypeError:  # Python < 3.11 has no co_qualname
        code = _block_call.__code__.replace(co_name=name)
    return torch.compile(types.FunctionType(code, _block_call.__globals__, name), **compile_kwargs)


class _RegionalCall:
    """A block's `_compiled_call_impl`: a plain object, so deepcopy (EMA) re-targets the copy."""

    def __init__(self, module: nn.Module, static_fn: Callable, other_fn: Optional[Callable]):
        self.module, self.cls = module, type(module)
        self.static_fn, self.other_fn = static_fn, other_fn
        self.shape = None  # input shape of the first call (the full pass)

    def __call__(self, *args, **kwargs):
        module = self.module
        if type(module) is not self.cls:  # skipped by subnet(): identity, no dynamo
            return module._call_impl(*args, **kwargs)
        if self.other_fn is None:
            return self.static_fn(module, *args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()), None)
        shape = tuple(x.shape) if torch.is_tensor(x) else None
        if self.shape is None:
            self.shape = shape
        fn = self.static_fn if shape == self.shape else self.other_fn
        return fn(module, *args, **kwargs)


def compile_blocks(
        model: nn.Module,
        layout: BlockLayout,
        subnet_sizes: Sequence[int] = (),
        backend: str = 'inductor',
        mode: Optional[str] = None,
        max_static_sizes: int = 6,
        **compile_kwargs,
) -> nn.Module:
    """Compile every residual block of `layout` in place (see module docstring); returns `model`.

    Passing `dynamic=` uses that one setting for every call instead of the static/other split.
    """
    modules = layout.modules(model)
    split = 'dynamic' not in compile_kwargs
    other_dynamic = len(subnet_sizes) > max_static_sizes
    if split and other_dynamic and backend == 'inductor' and any(
            isinstance(m, nn.modules.conv._ConvNd) for b in modules for m in b.modules()):
        _logger.warning(
            f'compiling a convnet with {len(subnet_sizes)} random subnet input sizes: inductor specialises conv '
            f'backward graphs per size, so each block recompiles per size up to the recompile limit (8) and then runs '
            f'new sizes eagerly; use a few fixed sizes instead (--stim-sizes, e.g. 96 128 160 192 224 for 224 px).')
    kwargs = dict(backend=backend, mode=mode, **compile_kwargs)
    for i, (path, block) in enumerate(zip(layout.paths, modules)):
        name = f'stim_block_{i}_' + ''.join(c if c.isalnum() else '_' for c in path)
        if split:
            static_fn = _compiled_entry(name, dynamic=False, **kwargs)
            other_fn = _compiled_entry(name + '_other', dynamic=other_dynamic, **kwargs)
        else:
            static_fn, other_fn = _compiled_entry(name, **kwargs), None
        block._compiled_call_impl = _RegionalCall(block, static_fn, other_fn)
    return model
