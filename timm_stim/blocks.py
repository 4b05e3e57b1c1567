"""Residual-block discovery for any timm model.

`find_residual_blocks` finds, with no per-model code, the residual blocks of a model, which of them
can be skipped (replaced by the identity) and how they group into stages. `timm_stim.skip.subnet` runs the
model with some of those blocks skipped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'ResidualBlock', 'BlockLayout', 'SubnetSpec', 'NoResidualBlocksError',
    'find_residual_blocks', 'default_input_size', 'describe_error', 'first_input',
]

_DROP_PATH_ATTRS = ('drop_path', 'drop_path1', 'drop_path2')
# Reasons that say a module is no residual block at all (not even a fixed one of a residual kind).
CLASS_TOKEN_ONLY = 'updates only the class token (patch tokens pass through or are not returned)'
IDENTITY_FUNCTION = 'has no parameters: an identity or activation function, not a residual block'
_SHAPE_CHANGE = 'changes the shape of its input'
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_HEAD = '<forward_head>'  # trace record marking where the model's head starts
# Parameters that scale the shortcut itself (MetaFormer's res_scale): one, not zero, in the identity test.
_SHORTCUT_SCALE = re.compile(r'(^|\.)res_scale\d*\.')
# What a block with its residual branch silenced may return: its input, or its input after the post-add activation.
_POST_ADD_ACTIVATIONS = (
    lambda x: x, F.relu, F.relu6, F.silu, F.gelu, lambda x: F.gelu(x, approximate='tanh'), F.leaky_relu,
    lambda x: F.leaky_relu(x, 0.1), lambda x: F.leaky_relu(x, 0.2), F.hardswish, F.elu, F.mish,
)

# Elements of the strided sample that screens the identity test before the whole tensors are compared
_SAMPLE_ELEMENTS = 4096


class NoResidualBlocksError(ValueError):
    """Raised when a model has no residual block that a subnetwork could skip."""


@dataclass(frozen=True)
class ResidualBlock:
    """One residual block: its module path, its stage index and whether a subnet may skip it."""
    path: str
    stage: int
    skippable: bool
    reason: str = ''  # why the block is not skippable, empty when it is
    tuple_output: bool = False  # returns a tuple such as mvitv2's (x, feat_size): skipped, it returns its inputs
    tokens: bool = False  # its output is a token sequence (batch, tokens, channels), not a feature map

    @property
    def class_token_only(self) -> bool:
        """A class-attention block (CaiT, VOLO), named explicitly: it belongs to the head, not the residual body."""
        return self.reason == CLASS_TOKEN_ONLY


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
            tuple(ResidualBlock(b.path, int(s), b.skippable, b.reason, b.tuple_output, b.tokens)
                  for b, s in zip(self.blocks, stage_of_block)),
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


def _innermost(paths: Sequence[str]) -> List[str]:
    path_set = set(paths)
    return [p for p in paths if not any(q.startswith(p + '.') for q in path_set)]


def _hinted_paths(model: nn.Module) -> List[str]:
    """Modules timm marks as blocks: owners of a drop_path slot, else matches of the group_matcher block regexes."""
    found = [path for path, module in model.named_modules() if path and _owns_drop_path(module)]
    if not found:  # models without stochastic-depth slots (legacy SENet, DLA)
        patterns = _block_patterns(model)
        found = [
            path for path, module in model.named_modules()
            if path and len(module._modules) > 0
            and any((m := p.match(path)) is not None and m.end() == len(path) for p in patterns)
        ]
    return _innermost(found)


def _structural_paths(model: nn.Module) -> List[str]:
    """Every module that could be a block: it has children and is not a plain container (Sequential, ModuleList)."""
    return [path for path, module in model.named_modules()
            if path and len(module._modules) > 0 and type(module) not in _CONTAINERS]


def _feature_stages(model: nn.Module) -> List[Tuple[str, int]]:
    """(module path, stage index) of timm's `feature_info`; entries at the same reduction share a stage (flat ViTs)."""
    info = getattr(model, 'feature_info', None)
    if not isinstance(info, (list, tuple)):
        return []
    known = dict(model.named_modules())
    out, stage, prev_reduction = [], -1, None
    for entry in info:
        if not isinstance(entry, dict) or entry.get('module') not in known or not entry.get('module'):
            continue
        reduction = entry.get('reduction')
        if reduction != prev_reduction or stage < 0:
            stage += 1
        prev_reduction = reduction
        out.append((entry['module'], stage))
    return out


def default_input_size(model: nn.Module) -> Tuple[int, int, int]:
    """(C, H, W) the model is configured for: its patch embedding's img_size, else its pretrained_cfg."""
    patch_embed = getattr(model, 'patch_embed', None)
    img_size = getattr(patch_embed, 'img_size', None)
    in_chans = getattr(model, 'in_chans', None) or 3
    if img_size is not None:
        img_size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        return (in_chans, int(img_size[0]), int(img_size[1]))
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return tuple(cfg.get('input_size', (in_chans, 224, 224)))


def describe_error(error: BaseException) -> str:
    """`Type: first line of the message`, also for errors with an empty message (timm's bare asserts)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f'{type(error).__name__}: {lines[0][:120]}' if lines else f'{type(error).__name__} (no message)'


def first_input(args: tuple, kwargs: dict):
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


def _main_output(output):
    """The tensor a block hands on: itself, or the first entry of a tuple output such as mvitv2's (x, feat_size)."""
    return output[0] if isinstance(output, (tuple, list)) and output else output


def _skip_blocker(module: nn.Module) -> str:
    """Why a block is excluded by its kind, whatever its identity test says; '' if it is not."""
    if getattr(module, 'has_skip', True) is False:
        return 'has_skip is False (no skip connection)'
    identity = getattr(module, 'identity', None)
    if isinstance(identity, nn.modules.batchnorm._BatchNorm):
        return 'its identity branch is a BatchNorm (RepVGG/MobileOne style)'
    return ''


def _clone_tensors(values):
    """Inputs are kept for the identity test: clone them so later in-place ops of the forward don't change them."""
    if torch.is_tensor(values):
        return values.clone()
    if isinstance(values, (tuple, list)):
        return type(values)(_clone_tensors(v) for v in values)
    if isinstance(values, dict):
        return {k: _clone_tensors(v) for k, v in values.items()}
    return values


@torch.no_grad()
def _trace_modules(model: nn.Module, paths: Sequence[str], input_size: Sequence[int]) -> Dict[str, dict]:
    """One eval-mode dry forward that records, per module, completion order, inputs and output shape."""
    records: Dict[str, dict] = {}
    handles = []

    def make_hook(path):
        def hook(module, args, kwargs, output):
            if path in records:  # called again (weight sharing): keep the first call
                return
            x, y = first_input(args, kwargs), _main_output(output)
            records[path] = dict(
                order=len(records),
                args=_clone_tensors(args), kwargs=_clone_tensors(kwargs),
                # positional args that are the input itself (DLA passes its shortcut as a second argument)
                aliases=[i for i, a in enumerate(args) if i and a is x],
                in_shape=tuple(x.shape) if torch.is_tensor(x) else None,
                in_dtype=x.dtype if torch.is_tensor(x) else None,
                out_shape=tuple(y.shape) if torch.is_tensor(y) else None,
                out_dtype=y.dtype if torch.is_tensor(y) else None,
                tuple_output=isinstance(output, (tuple, list)),
                changed_prefix=_changed_token_prefix(x, y),
                num_outputs=len(output) if isinstance(output, (tuple, list)) else 1,
            )
        return hook

    for path in paths:
        handles.append(model.get_submodule(path).register_forward_hook(make_hook(path), with_kwargs=True))
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    forward_head = getattr(model, 'forward_head', None)
    if callable(forward_head):  # mark where the head starts: nothing in it is a block
        def head_marker(*args, **kwargs):
            records.setdefault(_HEAD, dict(order=len(records)))
            return forward_head(*args, **kwargs)
        model.forward_head = head_marker
    try:
        model.eval()
        model(torch.randn(2, *input_size, device=device, dtype=dtype))
    except Exception as e:  # noqa: BLE001 -- one line, also for timm's bare asserts
        raise ValueError(f'{_model_name(model)} cannot run on {tuple(input_size)} inputs ({describe_error(e)}); '
                         f'use an input size the model supports (--img-size / --input-size).') from None
    finally:
        model.train(was_training)
        if callable(forward_head):
            del model.forward_head
        for h in handles:
            h.remove()
    return records


def _random_call(module: nn.Module, rec: dict,
                 params: Dict[str, torch.Tensor]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(x, y): the module run on a unit-scale random input of its traced input's shape with `params`; y None on error.

    A unit-scale input, as traced activations can be tiny (1e-4 deep in an EfficientNet), which would let 0.5 * x
    pass the identity test. Buffers are cloned: nothing may write to the model's buffers.
    """
    args, kwargs = list(rec['args']), dict(rec['kwargs'])
    x = first_input(args, kwargs)
    if not torch.is_tensor(x) or not x.is_floating_point():
        return None, None
    gen = torch.Generator(device=x.device).manual_seed(0)
    x = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    if args:
        for i in [0] + rec['aliases']:
            args[i] = x
    else:
        kwargs[next(iter(kwargs))] = x
    params = {**params, **{n: b.clone() for n, b in module.named_buffers()}}
    try:
        y = _main_output(torch.func.functional_call(module, params, tuple(args), kwargs))
    except Exception:  # noqa: BLE001 -- a block that cannot run on this input has no testable identity path
        return x, None
    return x, y if torch.is_tensor(y) else None


@torch.no_grad()
def _passes_input_through(module: nn.Module, rec: dict) -> bool:
    """The positive residual test: with its parameters zeroed, does the block return its input (up to an activation)?

    Zeroing weights, biases, norm affine parameters and layer scales silences every residual branch, so a block
    with an identity skip returns act(x) (act: the identity or the activation after the add); a plain layer, an
    aggregation node or a block with a non-residual part (TinyViT's local_conv, a stage-end norm) does not.
    Shortcut scales (convformer/caformer `res_scale`) are set to one instead: they sit on the skip itself.
    """
    params = {n: (torch.ones_like(p) if _SHORTCUT_SCALE.search(n) else torch.zeros_like(p))
              for n, p in module.named_parameters()}
    x, y = _random_call(module, rec, params)
    if y is None or y.shape != x.shape:
        return False
    tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 2e-2
    y, x = y.float().flatten(), x.float().flatten()
    # The activations are elementwise: an evenly strided sample of the elements rejects a non-identity block
    # cheaply (most traced modules are not blocks, and their tensors are large); a candidate is then checked whole.
    step = max(1, x.numel() // _SAMPLE_ELEMENTS)
    ys, xs = y[::step], x[::step]
    return any(torch.allclose(ys, act(xs), rtol=tol, atol=tol) and torch.allclose(y, act(x), rtol=tol, atol=tol)
               for act in _POST_ADD_ACTIVATIONS)


def _changed_token_prefix(x, y) -> int:
    """k > 0 when y differs from x at exactly the first k token positions (dim 1 of (batch, tokens, channels)).

    A transformer block changes every token; a class-attention block that returns cat(updated class token,
    patch tokens) changes only the first one(s) (VOLO's post_network). 0 for anything else, also for a module
    that returns its (in-place modified) input, where the comparison says nothing.
    """
    if not (torch.is_tensor(x) and torch.is_tensor(y)) or x.dim() != 3 or y.shape != x.shape or x.shape[1] < 2 \
            or y.data_ptr() == x.data_ptr():
        return 0
    changed = (y != x).flatten(2).any(-1).any(0)  # per token position
    k = int(changed.logical_not().int().argmax())  # first position that did not change (0 if all changed)
    return k if k > 0 and bool(changed[0]) and not bool(changed[k:].any()) else 0


def _block_reason(model: nn.Module, path: str, rec: dict) -> str:
    """'' if the traced block can be skipped (an identity skip, same structure in and out), else why not."""
    if rec['out_shape'] is None:
        return 'output is not a tensor'
    module = model.get_submodule(path)
    if rec['out_shape'] != rec['in_shape'] or rec['out_dtype'] != rec['in_dtype']:
        # CaiT's class attention: blk(patch_tokens, cls_tokens) returns the updated class token(s) only
        others = [a for a in rec['args'][1:] if torch.is_tensor(a)]
        if len(rec['out_shape']) == 3 and any(tuple(a.shape) == rec['out_shape'] for a in others) \
                and rec['in_shape'] is not None and len(rec['in_shape']) == 3 \
                and rec['out_shape'][1] < rec['in_shape'][1]:
            return CLASS_TOKEN_ONLY
        return _SHAPE_CHANGE
    if rec['tuple_output'] and rec['num_outputs'] != len(rec['args']):
        return 'returns a tuple that is not the structure of its inputs'
    blocker = _skip_blocker(module)
    if blocker:
        return blocker
    if not _passes_input_through(module, rec):
        return 'no identity path (with its parameters zeroed it does not return its input)'
    if next(module.parameters(), None) is None:  # NextViT's patch_embed of Identity children
        return IDENTITY_FUNCTION
    return CLASS_TOKEN_ONLY if rec['changed_prefix'] else ''


def _select_blocks(model: nn.Module, paths: Sequence[str], reasons: Dict[str, str], records: Dict[str, dict],
                   features: Sequence[str]) -> List[str]:
    """Residual blocks: the outermost modules with an identity skip below the stage level, plus their kind's others.

    A module is at stage level when it holds a feature_info module that has children (a stage or a block), or is
    a feature_info module or holds a leaf one and holds residual modules (a ConvNeXt/Swin stage); a ViT block that
    is its own feature_info entry is a block, and so is an Xception block in which timm taps an activation (a
    leaf feature module). Outermost, so a MaxViT block counts once (not its three sub-blocks) and a ResNet block
    is not split at its SE/GC module. Modules of the same class as a residual block that cannot be skipped (the
    strided first block of a stage, a projection-shortcut Xception block) are blocks too, so stages count every
    block; other modules (DLA's aggregation nodes, a final ConvBnAct, a parameter-free identity, a class-token
    block) are not, nor is anything that runs in the model's `forward_head` (a global pool of a 1x1 map keeps its
    shape).
    """
    head = records.get(_HEAD, {}).get('order', len(records))
    def inside(p, q):  # p strictly inside q
        return p.startswith(q + '.')

    composite = [f for f in features if model.get_submodule(f)._modules]
    leaves = [f for f in features if f not in composite]

    def below_stage_level(p, residual):
        holds_residual = any(inside(q, p) for q in residual)
        return not any(inside(f, p) for f in composite) and not (
            (p in features or any(inside(f, p) for f in leaves)) and holds_residual)

    residual = [p for p in paths if reasons[p] == '' and records[p]['order'] < head]
    eligible = [p for p in residual if below_stage_level(p, residual)]
    chosen = [p for p in eligible if not any(inside(p, q) for q in eligible)]
    kinds = {type(model.get_submodule(p)) for p in chosen}
    chosen += [p for p in paths if reasons[p] and reasons[p] not in (CLASS_TOKEN_ONLY, IDENTITY_FUNCTION)
               and type(model.get_submodule(p)) in kinds
               and below_stage_level(p, residual) and records[p]['order'] < head]
    return [p for p in paths if p in chosen and not any(inside(p, q) for q in chosen)]


def _same_grid(a: Optional[Tuple[int, ...]], b: Optional[Tuple[int, ...]]) -> bool:
    """Two traced outputs at one resolution and layout: same token count (B, N, C), or one differing dim (channels)."""
    if a is None or b is None or len(a) != len(b):
        return False
    if len(a) == 3:
        return a[1] == b[1]
    return sum(x != y for x, y in zip(a, b)) <= 1


def _assign_stages(model: nn.Module, paths: Sequence[str], records: Dict[str, dict],
                   features: Sequence[Tuple[str, int]]) -> List[int]:
    """Stage of every block: that of the first feature_info module at or after it in execution order.

    A block outside every feature_info module (EfficientNet's blocks.3, ViTamin's conv stem) joins the stage
    of the block after it if both are of one class at one resolution and layout (`_same_grid`), else that of the
    block before it on the same condition, else a stage of its own: blocks at another resolution or of another
    kind never share a stage. The blocks of one container next to the feature_info modules (MobileViT's
    stages.4: a strided conv block and transformer blocks) stay together, as timm's listed stages do.
    feature_info entries at one reduction form one stage when each holds at most one block (a flat ViT); entries
    that hold several blocks each are stages of their own (VOLO's and Sequencer's stages at one resolution).
    Without feature_info: a new stage whenever the output shape or the parent container changes.
    """
    groups: Dict[int, List[str]] = {}
    for f, s in features:
        groups.setdefault(s, []).append(f)

    def holds_blocks(f: str) -> bool:
        return sum(p == f or p.startswith(f + '.') for p in paths) > 1
    unmerged = {s: len(fs) > 1 and any(holds_blocks(f) for f in fs) for s, fs in groups.items()}
    ran = [(records[f]['order'], (s, groups[s].index(f) if unmerged[s] else 0)) for f, s in features if f in records]
    if ran:
        ran.sort()
        last = (ran[-1][1][0] + 1, 0)  # blocks after the last feature module form a stage of their own
        base = [next((s for o, s in ran if o >= records[p]['order']), last) for p in paths]
        feature_paths = [f for f, _ in features]

        def same(i: int, j: int) -> bool:  # blocks i and j are of one class at one resolution and layout
            return (type(model.get_submodule(paths[i])) is type(model.get_submodule(paths[j]))
                    and _same_grid(records[paths[i]]['out_shape'], records[paths[j]]['out_shape']))

        outside = [not any(p == f or p.startswith(f + '.') for f in feature_paths) for p in paths]
        # Containers next to feature_info modules that timm does not list (MobileViT's stages.4, EfficientNet's
        # blocks.3) are stages of their own making: their blocks stay together, whatever their kind.
        parents = {f.rsplit('.', 1)[0] for f in feature_paths if '.' in f}
        parents = [q for q in parents if isinstance(model.get_submodule(q), _CONTAINERS)]

        def unit(p: str) -> str:
            q = next((q for q in parents if p.startswith(q + '.')), None)
            return p if q is None else q + '.' + p[len(q) + 1:].split('.')[0]
        units = [unit(p) for p in paths]
        keys: List[Tuple[Tuple[int, int], int]] = [((0, 0), 0)] * len(paths)  # (feature stage, sub-stage)
        for i in reversed(range(len(paths))):
            if i == len(paths) - 1 or base[i] != base[i + 1]:
                keys[i] = (base[i], 0)
                continue
            split = outside[i] and units[i] != units[i + 1] and not same(i, i + 1)
            keys[i] = (base[i], keys[i + 1][1] - 1) if split else keys[i + 1]
        # a stage of outside blocks only joins the stage before it if it matches its last block (GhostNet: timm
        # taps the /4 features after blocks.1, blocks.2 is at /4 too; RepGhost's blocks.8 after the last entry)
        for k in sorted(set(keys)):
            run = [i for i, key in enumerate(keys) if key == k]
            if all(outside[i] for i in run) and run[0] > 0 and same(run[0] - 1, run[0]):
                for i in run:
                    keys[i] = keys[run[0] - 1]
        renumber = {k: i for i, k in enumerate(sorted(set(keys)))}
        return [renumber[k] for k in keys]
    stages = []
    stage, prev_shape, prev_parent = -1, None, None
    for p in paths:
        parent = p.rsplit('.', 1)[0] if '.' in p else ''
        if records[p]['out_shape'] != prev_shape or parent != prev_parent:
            stage += 1
        prev_shape, prev_parent = records[p]['out_shape'], parent
        stages.append(stage)
    return stages


def find_residual_blocks(
        model: nn.Module,
        blocks: Optional[Sequence[str]] = None,
        input_size: Optional[Sequence[int]] = None,
) -> BlockLayout:
    """Find the residual blocks of a timm model, in execution order, grouped into stages.

    One eval-mode dry forward records every candidate module's input and output. A module is a residual
    block when it keeps its input's shape and passes a positive test of its identity skip (see
    `_passes_input_through`), minus kinds that are not residual in the ST sense (`has_skip=False`, a BatchNorm
    "identity", a parameter-free module, a block that changes only the class token). Blocks are the outermost
    such modules below timm's stage modules; stages come from the model's `feature_info` (see `_assign_stages`:
    the stage of a block is that of the first feature module at or after it; entries at one reduction with one
    block each form one stage, so a plain ViT is one stage; blocks at another resolution or of another kind
    outside the feature modules form stages of their own).

    Args:
        model: a timm (or any) model.
        blocks: explicit module paths to use instead of discovery (skippability is still checked).
        input_size: (C, H, W) of the dry forward; defaults to the model's configured input size.
    """
    name = _model_name(model)
    features = _feature_stages(model)
    feature_paths = [f for f, _ in features]
    hinted = [] if blocks is not None else _hinted_paths(model)
    if blocks is not None:
        paths = list(blocks)
        known = dict(model.named_modules())
        missing = [p for p in paths if p not in known]
        if missing:
            raise ValueError(
                f'{name} has no module named {missing[0]!r}; pass paths as printed by model.named_modules() '
                f'(e.g. {next((p for p in known if p.count(".") == 1), "layer1.0")!r}).')
    elif features:
        paths = list(dict.fromkeys(_structural_paths(model) + hinted))
    else:
        paths = hinted
    if not paths:
        raise NoResidualBlocksError(
            f'{name} has no residual blocks: no module owns a drop_path slot or matches the model\'s block '
            f'pattern; pass the block module paths explicitly (blocks=[...] / --stim-blocks).')

    records = _trace_modules(model, list(dict.fromkeys(paths + feature_paths)), input_size or default_input_size(model))
    executed = sorted((p for p in paths if p in records), key=lambda p: records[p]['order'])
    if not executed:
        raise NoResidualBlocksError(f'{name}: none of the {len(paths)} candidate blocks ran in a forward pass.')
    was_training = model.training
    try:
        model.eval()
        reasons = {p: _block_reason(model, p, records[p]) for p in executed}
    finally:
        model.train(was_training)
    marked = [(p, reasons[p]) for p in executed if p in set(hinted)]  # timm's own block modules that ran
    if blocks is None and any(f in records for f in feature_paths):
        executed = _select_blocks(model, executed, reasons, records, feature_paths)
    elif blocks is None:  # no feature_info module ran: timm's block markers (drop_path slots, group_matcher)
        executed = [p for p in executed if p in set(hinted)]
    if not executed:
        raise NoResidualBlocksError(_nothing_to_skip(name, marked, len({s for _, s in features})))
    stages = _assign_stages(model, executed, records, features)
    layout_blocks = tuple(
        ResidualBlock(p, s, not reasons[p], reasons[p], records[p]['tuple_output'] and not reasons[p],
                      len(records[p]['out_shape'] or ()) == 3)
        for p, s in zip(executed, stages))
    layout = BlockLayout(layout_blocks, name)
    if layout.num_skippable == 0:
        raise NoResidualBlocksError(_nothing_to_skip(
            name, [(b.path, b.reason) for b in layout.blocks], len({s for _, s in features})))
    return layout


def _nothing_to_skip(name: str, found: Sequence[Tuple[str, str]], num_stages: int) -> str:
    """One-line refusal of a model without a skippable block: what was found, and what would work.

    `found`: (path, why not skippable) of the blocks found; `num_stages`: the model's feature_info stages.
    """
    if not found:
        return (f"{name} has nothing to skip: no module keeps its input's shape and passes its input through with "
                f'its parameters zeroed (no identity shortcut), so it is not a residual network; Stimulative '
                f'Training needs one (ResNet, ViT, ConvNeXt and the other families of docs/models.md).')
    counts: Dict[str, int] = {}
    for _, reason in found:
        counts[reason] = counts.get(reason, 0) + 1
    described = {_SHAPE_CHANGE: "change their input's shape (downsampling, a projection shortcut or a "
                                "concatenation), so they always run"}
    parts = [f'{"all " if n == len(found) > 1 else ""}{n} {described[r]}' if r in described else f'{n}: {r}'
             for r, n in counts.items()]
    paths = ', '.join(p for p, _ in found[:4]) + (', ...' if len(found) > 4 else '')
    if set(counts) == {_SHAPE_CHANGE} and len(found) <= num_stages:  # one block per stage (ResNeSt-14)
        advice = 'a deeper variant, with more than one block per stage, has blocks with an identity shortcut to skip'
    else:
        advice = ('Stimulative Training skips blocks with an identity shortcut (ResNet, ViT, ConvNeXt and the '
                  'other families of docs/models.md)')
    noun = 'block' if len(found) == 1 else 'blocks'
    return f"{name} has nothing to skip: found {len(found)} {noun} ({paths}), {'; '.join(parts)}; {advice}."


# ----------------------------------------------------------------------------------------------------
# Running a subnetwork
