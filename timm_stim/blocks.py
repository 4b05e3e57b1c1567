"""Residual-block discovery and subnetwork execution for any timm model.

`find_residual_blocks` finds, with no per-model code, the residual blocks of a model, which of them
can be skipped (replaced by the identity) and how they group into stages. `subnet` runs the model
with some of those blocks skipped; outside it the model is exactly the original.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = [
    'ResidualBlock', 'BlockLayout', 'SubnetSpec', 'NoResidualBlocksError',
    'find_residual_blocks', 'subnet', 'resolve_spec',
]

_DROP_PATH_ATTRS = ('drop_path', 'drop_path1', 'drop_path2')
# Class-attention blocks read the patch tokens but update only the class token: not residual in the ST sense.
_CLASS_ATTENTION = re.compile(r'ClassAttn|ClassAttention')


class NoResidualBlocksError(ValueError):
    """Raised when a model has no residual block that a subnetwork could skip."""


@dataclass(frozen=True)
class ResidualBlock:
    """One residual block: its module path, its stage index and whether a subnet may skip it."""
    path: str
    stage: int
    skippable: bool
    reason: str = ''  # why the block is not skippable, empty when it is


@dataclass(frozen=True)
class SubnetSpec:
    """Which residual blocks run in a subnetwork: a keep flag per block of the layout, in order."""
    keep: Tuple[bool, ...]

    @property
    def num_skipped(self) -> int:
        return sum(not k for k in self.keep)


@dataclass(frozen=True)
class BlockLayout:
    """Residual blocks of a model in execution order, grouped into stages."""
    blocks: Tuple[ResidualBlock, ...]
    model_name: str = ''

    @property
    def num_stages(self) -> int:
        return 1 + max(b.stage for b in self.blocks)

    @property
    def stage_sizes(self) -> Tuple[int, ...]:
        """Blocks per stage, skippable or not (ResNet-50: 3, 4, 6, 3)."""
        return tuple(sum(b.stage == s for b in self.blocks) for s in range(self.num_stages))

    @property
    def skippable_sizes(self) -> Tuple[int, ...]:
        """Skippable blocks per stage (ResNet-50: 2, 3, 5, 2)."""
        return tuple(sum(b.stage == s and b.skippable for b in self.blocks) for s in range(self.num_stages))

    @property
    def num_skippable(self) -> int:
        return sum(b.skippable for b in self.blocks)

    @property
    def paths(self) -> Tuple[str, ...]:
        return tuple(b.path for b in self.blocks)

    def stage_indices(self, stage: int) -> List[int]:
        """Indices (into `blocks`) of the blocks of one stage, in order."""
        return [i for i, b in enumerate(self.blocks) if b.stage == stage]

    def full_spec(self) -> SubnetSpec:
        return SubnetSpec(keep=(True,) * len(self.blocks))

    def depths(self, spec: SubnetSpec) -> Tuple[int, ...]:
        """Blocks that run per stage under `spec`."""
        return tuple(sum(spec.keep[i] for i in self.stage_indices(s)) for s in range(self.num_stages))

    def spec_from_depths(self, depths: Sequence[int]) -> SubnetSpec:
        """Keep the first `depths[s]` blocks of every stage s (the prefix rule of ST)."""
        depths = tuple(int(d) for d in depths)
        if len(depths) != self.num_stages:
            raise ValueError(
                f'depth vector {depths} has {len(depths)} entries but {self._describe()} has '
                f'{self.num_stages} stages; give one depth per stage.')
        keep = [True] * len(self.blocks)
        for s, d in enumerate(depths):
            idx = self.stage_indices(s)
            fixed = sum(not self.blocks[i].skippable for i in idx)
            if not fixed <= d <= len(idx) or d < 1:
                raise ValueError(
                    f'depth {d} for stage {s + 1} of {self._describe()} is out of range: that stage has '
                    f'{len(idx)} blocks of which {len(idx) - fixed} can be skipped, so its depth must be in '
                    f'{max(1, fixed)}..{len(idx)}.')
            for i in idx[d:]:
                keep[i] = False
            if any(not self.blocks[i].skippable for i in idx[d:]):
                raise ValueError(
                    f'depth {d} for stage {s + 1} of {self._describe()} would skip a block that cannot be '
                    f'skipped; use a larger depth.')
        return SubnetSpec(keep=tuple(keep))

    def with_stages(self, stage_of_block: Sequence[int]) -> 'BlockLayout':
        """The same blocks regrouped into other stages (used for pseudo-stages of flat models)."""
        return BlockLayout(
            tuple(ResidualBlock(b.path, int(s), b.skippable, b.reason) for b, s in zip(self.blocks, stage_of_block)),
            self.model_name,
        )

    def modules(self, model: nn.Module) -> List[nn.Module]:
        return [model.get_submodule(p) for p in self.paths]

    def _describe(self) -> str:
        name = self.model_name or 'the model'
        return f"{name} (stages {'/'.join(map(str, self.stage_sizes))})"

    def __str__(self) -> str:
        return (f'{self._describe()}: {len(self.blocks)} residual blocks, {self.num_skippable} skippable '
                f"(per stage {'/'.join(map(str, self.skippable_sizes))})")


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


def _owns_drop_path(module: nn.Module) -> bool:
    return any(a in module._modules or a in module.__dict__ for a in _DROP_PATH_ATTRS)


def _block_patterns(model: nn.Module) -> List[re.Pattern]:
    """Block regexes of timm's fine-grained `group_matcher`, where the model has string patterns."""
    matcher_fn = getattr(model, 'group_matcher', None)
    if matcher_fn is None:
        return []
    try:
        matcher = matcher_fn(coarse=False)
    except Exception:  # some group matchers assert on arguments they do not support
        return []
    blocks = matcher.get('blocks') if isinstance(matcher, dict) else None
    if blocks is None or callable(blocks):
        return []
    if isinstance(blocks, str):
        blocks = [blocks]
    patterns = []
    for entry in blocks:
        pattern = entry[0] if isinstance(entry, (tuple, list)) else entry
        # Entries without a numbered group are singletons such as the final norm, not blocks.
        if isinstance(pattern, str) and re.compile(pattern).groups > 0:
            patterns.append(re.compile(pattern))
    return patterns


def _candidate_paths(model: nn.Module) -> List[str]:
    """Paths of modules that look like residual blocks, keeping only the innermost ones."""
    found = [path for path, module in model.named_modules() if path and _owns_drop_path(module)]
    if not found:
        # Models without stochastic-depth slots (legacy SENet): containers named like timm's block groups.
        patterns = _block_patterns(model)
        found = [
            path for path, module in model.named_modules()
            if path and len(module._modules) > 0
            and any((m := p.match(path)) is not None and m.end() == len(path) for p in patterns)
        ]
    found_set = set(found)
    return [p for p in found if not any(q.startswith(p + '.') for q in found_set)]


def _default_input_size(model: nn.Module) -> Tuple[int, int, int]:
    patch_embed = getattr(model, 'patch_embed', None)
    img_size = getattr(patch_embed, 'img_size', None)
    in_chans = getattr(model, 'in_chans', None) or 3
    if img_size is not None:
        img_size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        return (in_chans, int(img_size[0]), int(img_size[1]))
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return tuple(cfg.get('input_size', (in_chans, 224, 224)))


def _first_input(args: tuple, kwargs: dict):
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


def _skip_blocker(module: nn.Module) -> str:
    """Why a shape-preserving block is still not a residual block, or '' if it is one."""
    if getattr(module, 'has_skip', True) is False:
        return 'has_skip is False (no skip connection)'
    if _CLASS_ATTENTION.search(type(module).__name__):
        return 'class-attention block'
    identity = getattr(module, 'identity', None)
    if isinstance(identity, nn.modules.batchnorm._BatchNorm):
        return 'its identity branch is a BatchNorm (RepVGG/MobileOne style)'
    return ''


@torch.no_grad()
def _trace_blocks(model: nn.Module, paths: Sequence[str], input_size: Sequence[int]) -> Dict[str, dict]:
    """One eval-mode dry forward that records, per block, call order and input/output shapes."""
    records: Dict[str, dict] = {}
    handles = []

    def make_hook(path):
        def hook(module, args, kwargs, output):
            if path in records:  # called again (weight sharing): keep the first call
                return
            x = _first_input(args, kwargs)
            records[path] = dict(
                order=len(records),
                in_shape=tuple(x.shape) if torch.is_tensor(x) else None,
                in_dtype=x.dtype if torch.is_tensor(x) else None,
                out_shape=tuple(output.shape) if torch.is_tensor(output) else None,
                out_dtype=output.dtype if torch.is_tensor(output) else None,
            )
        return hook

    for path in paths:
        handles.append(model.get_submodule(path).register_forward_hook(make_hook(path), with_kwargs=True))
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        model.eval()
        model(torch.randn(2, *input_size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return records


def find_residual_blocks(
        model: nn.Module,
        blocks: Optional[Sequence[str]] = None,
        input_size: Optional[Sequence[int]] = None,
) -> BlockLayout:
    """Find the residual blocks of a timm model, in execution order, grouped into stages.

    Candidates are modules that own a stochastic-depth slot (`drop_path*`) or match the block regexes of
    the model's `group_matcher`; only the innermost are kept. One dry forward then tells which are
    executed, which keep their input's shape (skippable unless they have no real skip, e.g.
    `has_skip=False`, class attention, a BatchNorm "identity"), and stage boundaries (a block whose
    output shape differs from the previous block's, or whose parent container differs, starts a stage).

    Args:
        model: a timm (or any) model.
        blocks: explicit module paths to use instead of discovery (skippability is still checked).
        input_size: (C, H, W) of the dry forward; defaults to the model's configured input size.
    """
    name = _model_name(model)
    if blocks is not None:
        paths = list(blocks)
        known = dict(model.named_modules())
        missing = [p for p in paths if p not in known]
        if missing:
            raise ValueError(
                f'{name} has no module named {missing[0]!r}; pass paths as printed by model.named_modules() '
                f'(e.g. {next((p for p in known if p.count(".") == 1), "layer1.0")!r}).')
    else:
        paths = _candidate_paths(model)
    if not paths:
        raise NoResidualBlocksError(
            f'{name} has no residual blocks: no module owns a drop_path slot or matches the model\'s block '
            f'pattern; pass the block module paths explicitly (blocks=[...] / --stim-blocks).')

    records = _trace_blocks(model, paths, input_size or _default_input_size(model))
    executed = sorted((p for p in paths if p in records), key=lambda p: records[p]['order'])
    if not executed:
        raise NoResidualBlocksError(f'{name}: none of the {len(paths)} candidate blocks ran in a forward pass.')

    layout_blocks = []
    stage, prev_shape, prev_parent = -1, None, None
    for path in executed:
        rec = records[path]
        parent = path.rsplit('.', 1)[0] if '.' in path else ''
        if rec['out_shape'] != prev_shape or parent != prev_parent:
            stage += 1
        prev_shape, prev_parent = rec['out_shape'], parent
        if rec['out_shape'] is None:
            reason = 'output is not a single tensor'
        elif rec['out_shape'] != rec['in_shape'] or rec['out_dtype'] != rec['in_dtype']:
            reason = 'changes the shape of its input'
        else:
            reason = _skip_blocker(model.get_submodule(path))
        layout_blocks.append(ResidualBlock(path, stage, not reason, reason))

    layout = BlockLayout(tuple(layout_blocks), name)
    if layout.num_skippable == 0:
        reasons = sorted({b.reason for b in layout.blocks})
        raise NoResidualBlocksError(
            f'{name} has nothing to skip: found {len(layout.blocks)} candidate blocks but none is a residual '
            f"block that keeps its input's shape ({'; '.join(reasons)}); Stimulative Training needs a "
            f'residual network (ResNet/ViT family).')
    return layout


# ----------------------------------------------------------------------------------------------------
# Running a subnetwork

_SKIP_CLASSES: Dict[type, type] = {}


def _identity_forward(self, *args, **kwargs):
    """Forward of a skipped block: its first input passes straight through, nothing is computed."""
    return _first_input(args, kwargs)


def _new_unskipped(cls: type):
    return cls.__new__(cls)


def _reduce_as_original(self, protocol):
    """Copies and pickles of a skipped block are the original block: the skip belongs to the context only."""
    return _new_unskipped, (type(self).__bases__[0],), self.__dict__


def _skipped_class(cls: type) -> type:
    """A cached subclass of `cls` whose forward is the identity.

    Swapping a block's class (instead of wrapping it or patching `forward` on the instance) keeps its
    state_dict keys and its place in the parent container, and survives deepcopy and checkpointing.
    """
    skipped = _SKIP_CLASSES.get(cls)
    if skipped is None:
        skipped = type(f'Skipped{cls.__name__}', (cls,), {
            'forward': _identity_forward, '__reduce_ex__': _reduce_as_original, '__module__': __name__})
        _SKIP_CLASSES[cls] = skipped
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
        for module, keep in zip(layout.modules(model), resolved.keep):
            if not keep:
                cls = type(module)
                module.__class__ = _skipped_class(cls)
                swapped.append((module, cls))
        yield resolved
    finally:
        for module, cls in swapped:
            module.__class__ = cls
