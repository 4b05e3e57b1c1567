"""The functional core of Stimulative Training: usable in any training loop.

    stimulator = create_stimulator(model, create_stim_config('st++'))
    out = stimulative_forward(model, input, target, criterion, stimulator)
    out['loss'].backward()

`stimulative_forward` runs the full network, the main criterion, M sampled subnetworks (each on the
same batch resized to its own random size) and the stim loss between each subnet's logits and the
detached full-network logits: loss = main + weight * sum_k stim_k.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .blocks import BlockLayout, SubnetSpec, default_input_size, find_residual_blocks
from .bn import frozen_bn_stats
from .distill import full_forward, main_loss
from .losses import StimLoss
from .sampler import SubnetSampler, split_flat_layout
from .skip import subnet
from .sizes import (
    SizeSampler, SmallerInputsError, describe_kept_sizes, few_sizes_warning, kept_input_sizes, probe_input_sizes_once,
    resize_batch, size_multiple,
)

__all__ = ['StimConfig', 'STIM_PRESETS', 'create_stim_config', 'Stimulator', 'create_stimulator',
           'stimulative_forward']

_logger = logging.getLogger(__name__)


@dataclass
class StimConfig:
    """Options of stimulative training (names mirror train_stim.py's --stim-* flags)."""
    space: str = 'st++'             # 'st', 'st++', 'bernoulli[:p]' or a K-list '1,2,4,1'
    loss: str = 'kl-'               # 'kl' (ST) or 'kl-' (ST++)
    weight: float = 1.0             # lambda, per subnet (losses of the M subnets are summed, not averaged)
    temperature: float = 1.0
    amplitude: float = 1.0          # A of the KL- standardization
    num_subnets: int = 1            # M
    min_scale: Optional[float] = None  # smallest subnet input / training size; 1 = off; None: by resolution
    sizes: Optional[Sequence[int]] = None  # fixed subnet input sizes instead of the uniform range
    bn: str = 'freeze'              # 'freeze': subnet passes leave BN running stats alone; 'update': they don't
    standardize_main: Optional[bool] = None  # main criterion on standardized logits; default: loss == 'kl-'
    per_rank: bool = False          # independent subnets per rank (default: the same on every rank)
    seed: int = 0
    pseudo_stages: int = 4          # groups a flat (ViT) model is split into for the ST/ST++ rules
    size_fallback: bool = False     # models that cannot take smaller inputs train subnets at full size
    memory_lean: bool = False       # free each subnet's graph before the next (see Stimulator.subnet_loss)

    def __post_init__(self):
        if self.num_subnets < 1:
            raise ValueError(f'stim subnets must be >= 1 (got {self.num_subnets}); use --stim none to train plainly.')
        if self.bn not in ('freeze', 'update'):
            raise ValueError(f"stim bn must be 'freeze' or 'update' (got {self.bn!r}).")
        if self.min_scale is not None and not 0.0 < self.min_scale <= 1.0:
            raise ValueError(f'stim min scale must be in (0, 1] (got {self.min_scale}); 1 turns smaller inputs '
                             f'off, the authors\' ST++ range is 0.43.')
        if self.weight < 0:
            raise ValueError(f'stim weight must be >= 0 (got {self.weight}).')
        if self.standardize_main is None:
            self.standardize_main = self.loss == 'kl-'


STIM_PRESETS: Dict[str, Dict[str, Any]] = {
    'st': dict(space='st', loss='kl', min_scale=1.0),       # NeurIPS 2022: uniform depth, KL, full size
    'st++': dict(space='st++', loss='kl-', min_scale=None),  # arXiv 2305.02507: inter-stage rule, KL-, smaller inputs
}

# ST++'s smaller inputs, [floor(0.43 S), S], were tuned by the authors at S = 224. At 32 px (inputs of 13..32 px)
# they made the subnets and the full net worse, at 64 px (27..64 px) they did no measurable harm
# (docs/results/stpp_lowres.md), so the resolution-dependent default (min_scale None) turns them off below 64 px;
# --stim-min-scale 0.43 restores them.
AUTHORS_MIN_SCALE = 0.43
LOW_RES_SIZE = 64


def default_min_scale(full_size: int) -> float:
    """The ST++ preset's smaller-input range at training size `full_size`: the authors' 0.43 from 64 px up,
    off (1.0) below."""
    return AUTHORS_MIN_SCALE if full_size >= LOW_RES_SIZE else 1.0


# ST++'s main loss on KL-'s standardised logits (the authors' setting, StimConfig's default for 'kl-') learns slowly:
# on digits at 64 px it left the full net 0.56 points under the same run with raw logits after 10 epochs, and 31
# under plain training after 3 (docs/results/stpp_lowres.md). The authors use it on 200-epoch schedules, so
# train_stim.py uses it from there up and raw logits on shorter schedules (--stim-main-logits picks either).
AUTHORS_EPOCHS = 200


def default_standardize_main(epochs: int) -> bool:
    """train_stim.py's choice of ST++ main logits for a schedule of `epochs`: standardised (the authors') from
    AUTHORS_EPOCHS up, raw below."""
    return epochs >= AUTHORS_EPOCHS


def create_stim_config(preset: str = 'st++', **overrides) -> StimConfig:
    """A StimConfig from a preset ('st' or 'st++') with overrides; None-valued overrides are ignored."""
    if preset not in STIM_PRESETS:
        raise ValueError(f"unknown stim preset {preset!r}: use one of {sorted(STIM_PRESETS)} (or 'none' in "
                         f"train_stim.py to train plainly).")
    kwargs = dict(STIM_PRESETS[preset])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if kwargs.get('loss') == 'kl' and 'standardize_main' not in overrides:
        kwargs['standardize_main'] = False
    return StimConfig(**kwargs)


class Stimulator:
    """Everything a step needs to train subnetworks of one model: layout, samplers and the loss.

    Built once at set-up: discovers the residual blocks, builds the sampler and one size sampler per full
    (batch) size the loop may deliver, and keeps only the subnet input sizes the model takes (checked for every
    size before any training starts).
    """

    def __init__(
            self,
            model: nn.Module,
            config: StimConfig,
            layout: Optional[BlockLayout] = None,
            blocks: Optional[Sequence[str]] = None,
            full_size: Optional[int] = None,
            rank: int = 0,
            full_sizes: Optional[Sequence[int]] = None,
    ):
        """`full_size` is the primary training size S (default: the model's); `full_sizes` the batch heights the
        loop may deliver (timm's --train-img-sizes; default just S, which is always included). Each gets its own
        subnet size range [floor(r * S_i), S_i]; the resolution-dependent default r is decided on S."""
        self.config = config
        self.loss_fn = StimLoss(config.loss, config.temperature, config.amplitude)  # validates before any work
        if layout is None:
            input_size = None if full_size is None else (
                default_input_size(model)[0], int(full_size), int(full_size))
            layout = find_residual_blocks(model, blocks=blocks, input_size=input_size)
        self.layout = split_flat_layout(layout, config.pseudo_stages)  # the stages the ST/ST++ rules see
        self.sampler = SubnetSampler(self.layout, config.space, seed=config.seed, rank=rank, per_rank=config.per_rank)
        self.full_size = int(full_size or default_input_size(model)[1])
        self.full_sizes = tuple(sorted({self.full_size, *(int(s) for s in full_sizes or ())}))
        if len(self.full_sizes) > 1 and config.sizes:
            raise ValueError(f'--stim-sizes fixes subnet sizes for one training size, but batches come at '
                             f'{list(self.full_sizes)} px: drop --stim-sizes or --train-img-sizes.')
        if config.min_scale is None:  # the preset's resolution-dependent range, fixed now that S is known
            config = self.config = replace(config, min_scale=default_min_scale(self.full_size))
            if config.min_scale == 1.0 and not config.sizes:
                _logger.info(f'ST++ smaller subnet inputs off at {self.full_size} px (below {LOW_RES_SIZE} px they '
                             f'hurt: docs/results/stpp_lowres.md); --stim-min-scale {AUTHORS_MIN_SCALE} turns them on')
        size_seed = config.seed + 1 + (7919 * rank if config.per_rank else 0)
        multiple = size_multiple(model)

        def build(size: int, sizes: Optional[Sequence[int]]) -> SizeSampler:
            # the primary keeps the seed it always had; another full size S_i gets its own fixed offset
            seed = size_seed if size == self.full_size else size_seed + 104729 * size
            return SizeSampler(size, config.min_scale, sizes, multiple, seed)

        self.size_samplers: Dict[int, SizeSampler] = {s: build(s, config.sizes) for s in self.full_sizes}
        requested = {s: sampler.sizes for s, sampler in self.size_samplers.items() if sampler.enabled}
        if requested:  # every size any sampler could draw is probed now, once, so no draw can fail mid-training
            union = sorted(set().union(*requested.values()))
            # under torch.distributed rank 0 probes and broadcasts: one probe, the same sizes on every rank
            failures = probe_input_sizes_once(model, union, default_input_size(model)[0])
            for size, sizes in requested.items():
                try:
                    kept = kept_input_sizes(model, sizes, size, failures)
                except SmallerInputsError as e:
                    if not config.size_fallback:
                        raise
                    _logger.warning(f'{e} Falling back to full-size subnet inputs.')
                    kept = (size,)
                if kept != sizes:
                    self.size_samplers[size] = build(size, kept)
                at = f' at {size} px' if len(self.full_sizes) > 1 else ''
                _logger.info(f'Subnet input sizes{at}: {describe_kept_sizes(sizes, kept)}')
                few = few_sizes_warning(model, sizes, kept, size, failures)
                if few:  # training goes on, but the user is told the smaller-input branch is in effect off
                    _logger.warning(few)
        self.size_sampler = self.size_samplers[self.full_size]  # the primary: S's range
        self.enabled = True

    @property
    def subnet_sizes(self) -> Tuple[int, ...]:
        """Every subnet input size any size sampler can draw (sorted)."""
        return tuple(sorted({s for sampler in self.size_samplers.values() for s in sampler.sizes}))

    @property
    def smaller_inputs(self) -> bool:
        """Whether any size sampler draws sizes other than its full size."""
        return any(sampler.enabled for sampler in self.size_samplers.values())

    def size_sampler_for(self, height: Optional[int] = None) -> SizeSampler:
        """The size sampler of batches `height` pixels high (None: the primary full size)."""
        if height is None:
            return self.size_sampler
        sampler = self.size_samplers.get(int(height))
        if sampler is None:
            raise ValueError(f'a batch is {int(height)} px high but the stimulator knows full sizes '
                             f'{list(self.full_sizes)}: build it with full_sizes= every training size '
                             f'(--train-img-sizes) or feed batches at the input size.')
        return sampler

    def check_input(self, input: Any) -> None:
        """Refuse, before any compute, an input the subnet passes cannot resize (a NaFlex patch dict)."""
        if not isinstance(input, torch.Tensor) and self.smaller_inputs:
            raise ValueError(f'{type(input).__name__} input: smaller subnet inputs need image tensors; NaFlex batches '
                             f'are patch dicts: use --stim-min-scale 1')

    def main_logits(self, output: torch.Tensor) -> torch.Tensor:
        """Logits the main criterion sees: standardized under KL- when the recipe says so (authors' code)."""
        if self.enabled and self.config.standardize_main and self.loss_fn.standardizes:
            return self.loss_fn.transform(output)
        return output

    def sample(self, height: Optional[int] = None) -> List[Tuple[SubnetSpec, int]]:
        """Draw (subnet, input size) for each of the step's M subnets of a batch `height` px high (None: S)."""
        size_sampler = self.size_sampler_for(height)
        return [(self.sampler.sample(), size_sampler.sample()) for _ in range(self.config.num_subnets)]

    def subnet_loss(
            self,
            model: nn.Module,
            input: Union[torch.Tensor, Dict[str, torch.Tensor]],
            teacher_logits: torch.Tensor,
            draws: Optional[List[Tuple[SubnetSpec, int]]] = None,
            grad_multiplier: float = 1.0,
    ) -> Tuple[torch.Tensor, List[Tuple[SubnetSpec, int]]]:
        """Sum of the M subnets' stim losses against the detached full-network logits.

        With `config.memory_lean` (and always under gradient checkpointing), each subnet's gradients are computed
        right away and added to `.grad` (times `grad_multiplier`: the AMP loss scale divided by the
        gradient-accumulation steps, i.e. what the caller applies to the loss before backward), so only one
        subnet graph is alive at a time; the returned loss is then detached and only the full network's loss is
        back-propagated. Under torch.distributed this bypasses AccumulateGrad (`_accumulate_grads`), so DDP's
        gradient hooks fire only during that one backward, which all-reduces the sum.

        Sizes are drawn from the range of the batch's height. A non-tensor input (a NaFlex patch dict) reaches the
        subnets unchanged, with the primary full size recorded as their size; it needs smaller inputs off.
        """
        self.check_input(input)
        is_tensor = isinstance(input, torch.Tensor)
        draws = draws if draws is not None else self.sample(input.shape[-2] if is_tensor else None)
        teacher = teacher_logits.detach()
        bn_ctx = frozen_bn_stats if self.config.bn == 'freeze' else (lambda m: nullcontext())
        # Gradient checkpointing recomputes blocks during backward, so a subnet's backward must run while its
        # blocks are still skipped (and its BN still frozen): the same in-context path as memory-lean.
        backward_inside = self.config.memory_lean or uses_grad_checkpointing(model)
        params = [p for p in model.parameters() if p.requires_grad] if backward_inside else None
        total = teacher.new_zeros((), dtype=torch.float32)
        with bn_ctx(model):  # one walk over the modules per step, not per subnet (host time on small subnets)
            for spec, size in draws:
                with subnet(model, self.layout, spec):
                    loss = self.loss_fn(model(resize_batch(input, size) if is_tensor else input), teacher)
                    if params is not None and loss.requires_grad:
                        _accumulate_grads(loss * (self.config.weight * grad_multiplier), params)
                        loss = loss.detach()
                total = total + loss
        return total, draws

    def depth_summary(self, draws: List[Tuple[SubnetSpec, int]]) -> Dict[str, float]:
        """Mean kept-block fraction and mean input size of a step's subnets (for logging)."""
        n = len(self.layout.blocks)
        return {
            'depth_frac': sum(sum(s.keep) for s, _ in draws) / (n * len(draws)),
            'size': sum(sz for _, sz in draws) / len(draws),
        }

    def state_dict(self) -> Dict[str, Any]:
        """Sampler states; with several full sizes every size sampler under 'size_samplers' ({str(S_i): state})."""
        if len(self.size_samplers) == 1:  # the format of single-size runs, unchanged
            return {'sampler': self.sampler.state_dict(), 'size_sampler': self.size_sampler.state_dict()}
        return {
            'sampler': self.sampler.state_dict(),
            'size_samplers': {str(s): sampler.state_dict() for s, sampler in self.size_samplers.items()},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore sampler states; a state with only 'size_sampler' (a single-size run) restores the primary."""
        saved = state.get('size_samplers')
        if saved is not None and sorted(int(s) for s in saved) != list(self.full_sizes):
            raise ValueError(f'stimulator state was saved for full sizes {sorted(int(s) for s in saved)} but this run '
                             f'has {list(self.full_sizes)}; resume with the same input size and --train-img-sizes.')
        self.sampler.load_state_dict(state['sampler'])
        if saved is None:
            self.size_sampler.load_state_dict(state['size_sampler'])
            return
        for size, sampler_state in saved.items():
            self.size_samplers[int(size)].load_state_dict(sampler_state)

    def __repr__(self) -> str:
        size_samplers = ', '.join(str(s) for s in self.size_samplers.values())
        return f'Stimulator({self.sampler}, {size_samplers}, {self.loss_fn}, M={self.config.num_subnets})'


def uses_grad_checkpointing(model: nn.Module) -> bool:
    """Whether timm gradient checkpointing is on anywhere in `model` (refuses the reentrant variant)."""
    # vars(): a missing attribute on an nn.Module costs a raised AttributeError; timm sets this one in __init__
    if not any(vars(m).get('grad_checkpointing', False) for m in model.modules()):
        return False
    try:
        from timm.layers import use_reentrant_ckpt
    except ImportError:  # older timm: non-reentrant is its default
        return True
    if use_reentrant_ckpt():
        raise ValueError('stimulative training needs non-reentrant gradient checkpointing (subnet gradients are '
                         'taken inside the forward); call timm.layers.set_reentrant_ckpt(False).')
    return True


def _accumulate_grads(loss: torch.Tensor, params: List[torch.Tensor]) -> None:
    """Add d(loss)/d(params) to `.grad`; under torch.distributed without an AccumulateGrad pass.

    DDP's gradient hooks fire in AccumulateGrad, so with a process group the gradients are taken with
    `autograd.grad` (a fresh full-size buffer) and added to `.grad` by hand. Without one nothing can be
    listening, and `backward(inputs=...)` accumulates in place: no extra buffer, no extra pass over memory.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        torch.autograd.backward(loss, inputs=params)
        return
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    existing, new = [], []
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            # a fresh buffer in the parameter's layout, as AccumulateGrad makes one: autograd.grad may return an
            # expanded or differently strided tensor, on which `+=` fails or DDP's bucket views warn
            p.grad = torch.empty_like(p, memory_format=torch.preserve_format).copy_(g)
        else:
            existing.append(p.grad)
            new.append(g)
    if existing:
        torch._foreach_add_(existing, new)  # one fused launch per device instead of one add per parameter


def create_stimulator(model: nn.Module, config: Optional[StimConfig] = None, **kwargs) -> Stimulator:
    """Factory: a Stimulator for `model` (default config: ST++ with one subnet)."""
    return Stimulator(model, config or create_stim_config('st++'), **kwargs)


def stimulative_forward(
        model: nn.Module,
        input: Union[torch.Tensor, Dict[str, torch.Tensor]],
        target: torch.Tensor,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        stimulator: Optional[Stimulator],
        draws: Optional[List[Tuple[SubnetSpec, int]]] = None,
        grad_multiplier: float = 1.0,
        full_model: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Dict[str, Any]:
    """One stimulative training forward: full net + criterion + M subnets + stim loss.

    Returns a dict with 'loss' (to back-propagate), 'output' (full-network logits), 'main_loss',
    'stim_loss', and 'draws' ((SubnetSpec, input size) per subnet). With `stimulator` None or disabled
    it is plain training. `full_model` (e.g. `torch.compile(model)`) runs the full-network pass instead of
    `model`; the subnet passes always run `model`.
    """
    if stimulator is not None and stimulator.enabled:
        stimulator.check_input(input)
    output = full_forward(model if full_model is None else full_model, criterion, input)
    if stimulator is None or not stimulator.enabled:
        loss = main_loss(criterion, output, target, input, output)
        return {'loss': loss, 'output': output, 'main_loss': loss.detach(), 'draws': []}
    main = main_loss(criterion, stimulator.main_logits(output), target, input, output)
    stim_loss, draws = stimulator.subnet_loss(model, input, output, draws, grad_multiplier)
    loss = main + stimulator.config.weight * stim_loss
    return {
        'loss': loss,
        'output': output,
        'main_loss': main.detach(),
        'stim_loss': stim_loss.detach(),
        'draws': draws,
    }
