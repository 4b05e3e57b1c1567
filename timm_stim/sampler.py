"""Subnetwork sampling rules of ST and ST++ (see docs/METHOD.md and the README's method card).

A rule is a list K with one entry per stage: stage s drops r_s blocks, r_s uniform on {0..K_s-1},
always the last r_s skippable blocks of the stage (so every subnet keeps a prefix of each stage).

- `st`: K_s = (skippable blocks of s) + 1, capped so every stage keeps at least one block.
  ResNet-50 (3/4/6/3): d_s uniform on {1..n_s}, 216 subnets.
- `st++` (the authors' "space3" inter-stage rule, generalised): the first stage and the last stage never
  lose blocks (trailing stages of class-token blocks, CaiT's class attention, are not counted); a middle stage
  may drop down to 3 blocks, and at least one block if it has a skippable one:
  r_max = min(m_s, max(1, n_s - 3)). ResNet-50 gives K = 1,2,4,1: d = (3, {3,4}, {3..6}, 3), 8 subnets.
- a K-list such as `1,2,4,1` (validated against the model's stages).
- `bernoulli[:p]`: every skippable block is dropped independently with probability p (default 0.5).

Flat models (all skippable blocks in one stage, e.g. ViT) are split into `pseudo_stages` (default 4)
consecutive groups of near-equal size, and the rules above apply to those groups. ViT-S/12 thus gets
3/3/3/3: `st` gives 81 subnets, `st++` K = 1,2,2,1 (drops block 6 and/or 9: 4 subnets). So is the run of
transformer blocks after a hybrid's conv stem stages (ViTamin: 2/4/14 becomes 2/4/4/4/3/3).
"""
from __future__ import annotations

import itertools

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .blocks import BlockLayout, SubnetSpec

__all__ = ['SubnetSampler', 'parse_space', 'space_k_list', 'split_flat_layout']

SpaceLike = Union[str, Sequence[int]]


def _flat_stage(layout: BlockLayout) -> Optional[int]:
    """The stage to cut into pseudo-stages: the one stage with skippable blocks (ViT), or a hybrid's transformer run.

    A hybrid (ViTamin, ViT-ResNet) has conv stem stages before a run of transformer blocks: its last stage with
    skippable blocks is flat if all its blocks are skippable and return tokens, and no earlier block does.
    """
    stages_with_skips = [s for s, m in enumerate(layout.skippable_sizes) if m > 0]
    if len(stages_with_skips) == 1:
        return stages_with_skips[0]
    if not stages_with_skips:
        return None
    last = stages_with_skips[-1]
    run = [layout.blocks[i] for i in layout.stage_indices(last)]
    stem = [b for b in layout.blocks if b.stage < last]
    return last if all(b.skippable and b.tokens for b in run) and not any(b.tokens for b in stem) else None


def split_flat_layout(layout: BlockLayout, pseudo_stages: int = 4) -> BlockLayout:
    """Regroup a flat layout's run of blocks (see `_flat_stage`) into near-equal pseudo-stages."""
    flat = _flat_stage(layout)
    if flat is None or pseudo_stages <= 1:
        return layout
    idx = layout.stage_indices(flat)
    groups = max(1, min(pseudo_stages, len(idx) // 2))  # at least 2 blocks per group, so st can drop one
    new_stage = []
    for s in range(layout.num_stages):
        for pos, i in enumerate(layout.stage_indices(s)):
            if s < flat:
                new_stage.append((i, s))
            elif s == flat:
                new_stage.append((i, s + pos * groups // len(idx)))
            else:
                new_stage.append((i, s + groups - 1))
    stage_of_block = [s for _, s in sorted(new_stage)]
    return layout.with_stages(stage_of_block)


def parse_space(space: SpaceLike) -> Union[str, Tuple[int, ...], Tuple[str, float]]:
    """Parse 'st', 'st++', 'bernoulli[:p]' or a K-list ('1,2,4,1' or a sequence of ints)."""
    if isinstance(space, str):
        text = space.strip().lower()
        if text in ('st', 'st++'):
            return text
        if text.startswith('bernoulli'):
            _, _, p = text.partition(':')
            try:
                prob = float(p) if p else 0.5
            except ValueError:
                prob = -1.0
            if not 0.0 < prob < 1.0:
                raise ValueError(f"invalid stim space {space!r}: the drop probability must be in (0, 1), "
                                 f"e.g. 'bernoulli:0.25'.")
            return ('bernoulli', prob)
        parts = [p for p in text.replace(' ', '').split(',') if p]
        if not parts or not all(p.isdigit() for p in parts):
            raise ValueError(
                f"invalid stim space {space!r}: use 'st', 'st++', 'bernoulli[:p]' or a K-list of positive "
                f"integers, one per stage, e.g. '1,2,4,1'.")
        space = [int(p) for p in parts]
    k_list = tuple(int(k) for k in space)
    if not k_list or any(k < 1 for k in k_list):
        raise ValueError(f'invalid stim space {k_list}: every K must be >= 1 (K_s = 1 means stage s never '
                         f'loses a block).')
    return k_list


def space_k_list(layout: BlockLayout, space: SpaceLike) -> Optional[Tuple[int, ...]]:
    """The per-stage K-list a space means on `layout` (None for the Bernoulli rule); validates K-lists."""
    parsed = parse_space(space)
    n, m = layout.stage_sizes, layout.skippable_sizes
    # The last stage of the residual body: trailing stages of class-token blocks only (CaiT's class attention,
    # named explicitly) are head, not body; a last stage whose blocks are all fixed (HGNet's) is still the last.
    last = max((s for s in range(layout.num_stages)
                if not all(layout.blocks[i].class_token_only for i in layout.stage_indices(s))), default=0)
    if parsed == 'st':
        return tuple(1 + min(m_s, n_s - 1) for n_s, m_s in zip(n, m))
    if parsed == 'st++':
        k = []
        for s, (n_s, m_s) in enumerate(zip(n, m)):
            r_max = 0 if s in (0, last) else min(m_s, max(1, n_s - 3))
            k.append(1 + r_max)
        return tuple(k)
    if isinstance(parsed, tuple) and parsed and parsed[0] == 'bernoulli':
        return None
    k_list = parsed
    if len(k_list) != layout.num_stages:
        raise ValueError(
            f"stim space K={','.join(map(str, k_list))} has {len(k_list)} entries but {layout.model_name} has "
            f"{layout.num_stages} stages ({'/'.join(map(str, n))} blocks); give one K per stage.")
    for s, (k_s, n_s, m_s) in enumerate(zip(k_list, n, m)):
        if k_s - 1 > min(m_s, n_s - 1):
            raise ValueError(
                f"stim space K={','.join(map(str, k_list))} does not fit {layout.model_name}: stage {s + 1} has "
                f"{n_s} blocks of which {m_s} can be skipped, so K_{s + 1} must be in 1..{1 + min(m_s, n_s - 1)} "
                f"(got {k_s}).")
    return k_list


class SubnetSampler:
    """Seeded, resumable sampler of residual subnetworks under an ST / ST++ / K-list / Bernoulli rule.

    Args:
        layout: residual-block layout the rules apply to: `find_residual_blocks`'s, with a flat model's blocks
            already grouped into pseudo-stages (`split_flat_layout`, which `Stimulator` applies).
        space: 'st', 'st++', 'bernoulli[:p]' or a K-list.
        seed: base seed of the sampler's own generator (independent of the global RNG).
        rank: process rank; only used when `per_rank` is True.
        per_rank: sample independent subnets on every rank (default: the same subnets on all ranks).
    """

    def __init__(
            self,
            layout: BlockLayout,
            space: SpaceLike = 'st++',
            seed: int = 0,
            rank: int = 0,
            per_rank: bool = False,
    ):
        self.layout = layout
        self.space = space
        parsed = parse_space(space)
        self.drop_prob = parsed[1] if isinstance(parsed, tuple) and parsed and parsed[0] == 'bernoulli' else None
        self.k_list = space_k_list(self.layout, space)
        if self.k_list is not None and all(k == 1 for k in self.k_list):
            # suggest only spaces that do drop a block here (the message used to offer 'st' when 'st' had failed)
            others = [s for s in ('st', 'st++') if s != space and any(k > 1 for k in space_k_list(layout, s) or ())]
            raise ValueError(
                f"stim space {space!r} never drops a block on {self.layout.model_name} "
                f"(K={','.join(map(str, self.k_list))}, "
                f"stages {'/'.join(map(str, self.layout.stage_sizes))}); use --stim-space "
                f"{', '.join(others + ['bernoulli'])} or a K-list.")
        self.seed = int(seed) + (7919 * int(rank) if per_rank else 0)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._skippable_per_stage = [
            [i for i in self.layout.stage_indices(s) if self.layout.blocks[i].skippable]
            for s in range(self.layout.num_stages)
        ]

    def sample(self) -> SubnetSpec:
        if self.drop_prob is not None:
            drops = torch.rand(len(self.layout.blocks), generator=self.generator) < self.drop_prob
            return SubnetSpec(tuple(not (b.skippable and bool(d)) for b, d in zip(self.layout.blocks, drops)))
        drops = [int(torch.randint(k, (1,), generator=self.generator)) if k > 1 else 0 for k in self.k_list]
        return self._drop_last(drops)

    def support(self) -> List[SubnetSpec]:
        """Every subnet the rule can produce (for K-list rules; Bernoulli enumerates all keep-masks)."""
        if self.drop_prob is not None:
            choices = [(True, False) if b.skippable else (True,) for b in self.layout.blocks]
            return [SubnetSpec(keep) for keep in itertools.product(*choices)]
        return [self._drop_last(drops) for drops in itertools.product(*(range(k) for k in self.k_list))]

    def _drop_last(self, drops: Sequence[int]) -> SubnetSpec:
        """The subnet that skips the last `drops[s]` skippable blocks of every stage s (the prefix rule)."""
        keep = [True] * len(self.layout.blocks)
        for skippable, r in zip(self._skippable_per_stage, drops):
            for i in skippable[len(skippable) - r:] if r else []:
                keep[i] = False
        return SubnetSpec(tuple(keep))

    def expected_kept_fraction(self) -> float:
        """Expected fraction of residual blocks a sampled subnet runs."""
        if self.drop_prob is not None:
            return 1.0 - self.drop_prob * self.layout.num_skippable / len(self.layout.blocks)
        dropped = sum((k - 1) / 2 for k in self.k_list)
        return 1.0 - dropped / len(self.layout.blocks)

    def state_dict(self) -> Dict[str, Any]:
        return {'seed': self.seed, 'space': str(self.space), 'generator': self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if str(state.get('space')) != str(self.space):
            raise ValueError(f"sampler state was saved for stim space {state.get('space')!r} but this run uses "
                             f"{self.space!r}; resume with the same --stim-space.")
        self.seed = state['seed']
        self.generator.set_state(state['generator'])

    def __repr__(self) -> str:
        rule = f'bernoulli:{self.drop_prob}' if self.drop_prob is not None else 'K=' + ','.join(map(str, self.k_list))
        return f'SubnetSampler({self.space!r}, {rule}, stages={self.layout.stage_sizes})'
