"""`StimulativeTask`: stimulative training as a timm.task.TrainingTask."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from timm.task import TrainingTask
from timm.utils import ModelEmaV3, unwrap_model

from .compile import compile_blocks
from .stimulator import Stimulator, stimulative_forward

__all__ = ['StimulativeModule', 'StimulativeTask']

_logger = logging.getLogger(__name__)


class StimulativeModule(nn.Module):
    """What DDP wraps: ONE forward runs the full model, the criterion and every sampled subnet.

    Keeping all passes inside one forward of the wrapped module, followed by one backward, gives every
    parameter a gradient from the full pass, so DDP works with `find_unused_parameters=False` and does
    a single all-reduce per step. The model is stored as `.module` so that timm's `unwrap_model` (used
    for checkpoints and EMA) reaches the plain timm model and state_dict keys stay unprefixed.
    """

    def __init__(self, model: nn.Module, criterion: Callable, stimulator: Optional[Stimulator]):
        super().__init__()
        self.module = model
        self.criterion = criterion
        self.stimulator = stimulator
        self.grad_multiplier = 1.0
        self.set_full_model(None)

    def set_full_model(self, full_model: Optional[Callable]) -> None:
        """What runs the full-network pass (a compiled `module`), or None for `module` itself.

        Stored outside the submodule registry: a compiled wrapper shares `module`'s parameters, and
        registering it would list them (and the state_dict keys) twice.
        """
        object.__setattr__(self, 'full_model', full_model)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        return stimulative_forward(self.module, input, target, self.criterion, self.stimulator,
                                   grad_multiplier=self.grad_multiplier, full_model=self.full_model)


class StimulativeTask(TrainingTask):
    """Stimulative training (ST / ST++) of a timm model as a timm TrainingTask.

    forward(input, target) returns 'loss', 'output' (full-network logits), 'main_loss', 'stim_loss' and
    'draws' (sampled subnet and input size per subnet). `stimulator=None` trains plainly through the same
    code path (train_stim.py --stim none). Task state (sampler RNGs) goes into checkpoints, so a resumed
    run samples the same subnet sequence.

    Args:
        model: the timm model to train.
        criterion: main loss on (logits, target), e.g. timm's SoftTargetCrossEntropy with mixup.
        stimulator: a `Stimulator` for `model`, or None for plain training.
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: Callable,
            stimulator: Optional[Stimulator] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.trainable_module = StimulativeModule(model, criterion, stimulator)
        self.stimulator = stimulator
        if verbose:
            _logger.info(f'StimulativeTask: {stimulator if stimulator is not None else "plain training"}')

    @property
    def model(self) -> nn.Module:
        """The plain timm model being trained (unwrapped from DDP/compile)."""
        return unwrap_model(self.trainable_module)

    def set_stim_enabled(self, enabled: bool) -> None:
        """Turn the subnet passes on or off (e.g. before --stim-start-epoch)."""
        if self.stimulator is not None:
            self.stimulator.enabled = enabled

    def set_grad_multiplier(self, multiplier: float) -> None:
        """Loss multiplier the caller applies before backward (AMP scale / accumulation steps).

        Only the memory-lean path needs it, because it back-propagates subnet losses inside forward.
        """
        self._stim_module().grad_multiplier = float(multiplier)

    def _stim_module(self) -> StimulativeModule:
        module = self.trainable_module
        while not isinstance(module, StimulativeModule):
            module = getattr(module, 'module', None) or getattr(module, '_orig_mod')
        return module

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'StimulativeTask':
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, scope: str = 'full',
                **compile_kwargs) -> nn.Module:
        """torch.compile for training; returns the model to evaluate with.

        scope='full' (default): one whole-model compile that runs the full-network pass (and evaluation);
        the subnet passes run eagerly. The compiled graph only ever sees the full network at the full size,
        so it never recompiles, and the full pass (the plain-training part of a step) gets the whole-model
        speed-up. scope='blocks': regional compile (`compile_blocks`), every residual block compiled on its
        own with the skip decision kept in Python, so subnet passes are compiled too; measured slower than
        eager for ResNet-50 on an H200 (BENCHMARKS.md). Plain training (no stimulator) always compiles the
        whole model.
        """
        if scope not in ('full', 'blocks'):
            raise ValueError(f"compile scope must be 'full' or 'blocks', got {scope!r}")
        model = self.model
        if self.stimulator is None or scope == 'full':
            compiled = torch.compile(model, backend=backend, mode=mode, **compile_kwargs)
            self._stim_module().set_full_model(compiled)
            self.eval_model = compiled
            return compiled
        compile_blocks(model, self.stimulator.layout, self.stimulator.size_sampler.sizes, backend=backend, mode=mode,
                       **compile_kwargs)
        self.eval_model = model
        return model

    def setup_ema(self, decay: float = 0.9999, use_warmup: bool = False, device: Optional[torch.device] = None,
                  **kwargs) -> nn.Module:
        """EMA of the plain model (not of the task wrapper), so EMA checkpoints are plain timm weights."""
        self.trainable_module_ema = ModelEmaV3(self.model, decay=decay, use_warmup=use_warmup, device=device, **kwargs)
        return self.trainable_module_ema

    def update_ema(self, step: Optional[int] = None) -> None:
        if self.has_ema():
            self.trainable_module_ema.update(self.model, step=step)

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        if module is None:
            attr = 'eval_model_ema' if ema else 'eval_model'
            if hasattr(self, attr):
                return getattr(self, attr)
            if ema:
                return self.get_trainable_module(ema=True)
            return self._stim_module().module
        return module

    def get_clip_parameters(self, exclude_head: bool = False):
        params = list(self.model.parameters())
        return params[:-2] if exclude_head else params

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        if ema or self.stimulator is None:
            return {}
        return {'stimulator': self.stimulator.state_dict()}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        if not state or ema:
            return
        if self.stimulator is None:
            if strict and 'stimulator' in state:
                raise RuntimeError('checkpoint has stimulative-training state but this run trains plainly '
                                   '(--stim none); resume with the same --stim setting.')
            return
        self.stimulator.load_state_dict(state['stimulator'])

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        return self.trainable_module(input, target)
