"""Running a model as a subnetwork: the residual blocks a spec drops become the identity, in place.

Why a class swap: forward pre-hooks cannot skip a forward, wrapping a block renames its state_dict keys, and
replacing `forward` on the instance breaks `copy.deepcopy` (timm's EMA). Changing the block's class to a cached
subclass whose forward returns its input keeps the keys, survives deepcopy, gradient checkpointing and
channels_last, and works for blocks called with extra arguments.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Sequence, Tuple, Union

import torch.nn as nn

from .blocks import BlockLayout, SubnetSpec, first_input

__all__ = ['SpecLike', 'resolve_spec', 'subnet']

_SKIP_CLASSES: Dict[Tuple[type, bool], type] = {}


def _identity_forward(self, *args, **kwargs):
    """Forward of a skipped block: its first input passes straight through, nothing is computed."""
    return first_input(args, kwargs)


def _identity_tuple_forward(self, *args, **kwargs):
    """Forward of a skipped tuple-output block (mvitv2: (x, feat_size) in and out): its inputs pass through."""
    return args


def _new_unskipped(cls: type):
    return cls.__new__(cls)


def _reduce_as_original(self, protocol):
    """Copies and pickles of a skipped block are the original block: the skip belongs to the context only."""
    return _new_unskipped, (type(self).__bases__[0],), self.__dict__


def _skipped_class(cls: type, tuple_output: bool = False) -> type:
    """A cached subclass of `cls` whose forward is the identity (on its inputs tuple for tuple-output blocks).

    Swapping a block's class (instead of wrapping it or patching `forward` on the instance) keeps its
    state_dict keys and its place in the parent container, and survives deepcopy and checkpointing.
    """
    skipped = _SKIP_CLASSES.get((cls, tuple_output))
    if skipped is None:
        skipped = type(f'Skipped{cls.__name__}', (cls,), {
            'forward': _identity_tuple_forward if tuple_output else _identity_forward,
            '__reduce_ex__': _reduce_as_original, '__module__': __name__})
        _SKIP_CLASSES[(cls, tuple_output)] = skipped
    return skipped


SpecLike = Union[SubnetSpec, Sequence[int], Sequence[bool], None]


def resolve_spec(layout: BlockLayout, spec: SpecLike) -> SubnetSpec:
    """Turn a SubnetSpec, a per-stage depth vector or a per-block keep-mask into a checked SubnetSpec."""
    if spec is None:
        return layout.full_spec()
    if isinstance(spec, SubnetSpec):
        keep = spec.keep
    else:
        values = list(spec)
        if values and all(isinstance(v, bool) for v in values):
            keep = tuple(values)
        else:
            return layout.spec_from_depths(values)
    if len(keep) != len(layout.blocks):
        raise ValueError(
            f'keep-mask has {len(keep)} entries but {layout.model_name or "the model"} has '
            f'{len(layout.blocks)} residual blocks; give one flag per block.')
    bad = [b.path for b, k in zip(layout.blocks, keep) if not k and not b.skippable]
    if bad:
        raise ValueError(f'block {bad[0]!r} cannot be skipped ({layout.blocks[layout.paths.index(bad[0])].reason}).')
    return SubnetSpec(tuple(bool(k) for k in keep))


@contextmanager
def subnet(model: nn.Module, layout: BlockLayout, spec: SpecLike) -> Iterator[SubnetSpec]:
    """Run `model` as a subnetwork: inside the context the blocks that `spec` drops are the identity.

    `spec` is a SubnetSpec, a per-stage depth vector (prefix rule) or a per-block keep-mask. Skipped
    blocks do no compute and get no gradient. The original classes are restored on exit, exceptions
    included, so outside the context the model is exactly the original (a deepcopy or pickle taken
    inside it is the full model too). With gradient checkpointing, run the subnet's backward inside the
    context: checkpointed blocks are recomputed during backward and must still be skipped then.
    """
    resolved = resolve_spec(layout, spec)
    swapped: List[Tuple[nn.Module, type]] = []
    try:
        for block, module, keep in zip(layout.blocks, layout.modules(model), resolved.keep):
            if not keep:
                cls = type(module)
                module.__class__ = _skipped_class(cls, block.tuple_output)
                swapped.append((module, cls))
        yield resolved
    finally:
        for module, cls in swapped:
            module.__class__ = cls
