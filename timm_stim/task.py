"""`StimulativeTask`: stimulative training as a timm.task.TrainingTask."""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from timm.task import TrainingTask
from timm.utils import ModelEmaV3, unwrap_model

from .stimulator import Stimulator, stimulative_forward, uses_grad_checkpointing

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
        self.grad_scaler = None
        self._multiplier_cache = None  # (value, the value as a device tensor)
        self.set_compiled(None)

    def set_compiled(self, compiled: Optional[Callable], subnets: bool = False) -> None:
        """A compiled `module` for the full-network pass, and with `subnets` for the subnet passes too.

        Stored outside the submodule registry: a compiled wrapper shares `module`'s parameters, and
        registering it would list them (and the state_dict keys) twice.
        """
        object.__setattr__(self, 'compiled', compiled)
        self.compile_subnets = subnets

    def forward(self, input: Any, target: torch.Tensor) -> Dict[str, Any]:
        multiplier = self.grad_multiplier
        if self.grad_scaler is not None and self._backward_inside() and torch.is_grad_enabled():
            # subnet losses back-propagated inside forward get the loop's AMP scale, which stays on the device
            # (reading it as a number would sync host and device every step)
            multiplier = self.grad_scaler.scale(self._device_multiplier(target.device))
        if self.compiled is not None and self.compile_subnets:
            # subnet() swaps block classes on the shared modules, so the compiled callable runs subnets too
            return stimulative_forward(self.compiled, input, target, self.criterion, self.stimulator,
                                       grad_multiplier=multiplier)
        return stimulative_forward(self.module, input, target, self.criterion, self.stimulator,
                                   grad_multiplier=multiplier, full_model=self.compiled)

    def _backward_inside(self) -> bool:
        """Whether this step's subnet passes back-propagate inside forward (memory-lean, gradient checkpointing):
        only then is the multiplier used."""
        stimulator = self.stimulator
        return stimulator is not None and stimulator.enabled and (
            stimulator.config.memory_lean or uses_grad_checkpointing(self.module))

    def _device_multiplier(self, device: torch.device) -> torch.Tensor:
        """grad_multiplier as a float32 tensor on `device`, made when the value changes (no copy per step)."""
        multiplier = self.grad_multiplier
        if torch.is_tensor(multiplier):
            return multiplier
        cached = self._multiplier_cache
        if cached is None or cached[0] != multiplier or cached[1].device != device:
            cached = (multiplier, torch.full((), multiplier, dtype=torch.float32, device=device))
            self._multiplier_cache = cached
        return cached[1]


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
        """Loss multiplier the caller applies before backward besides AMP scaling: 1 / accumulation steps.

        Only memory-lean (or gradient-checkpointed) subnet passes use it: they back-propagate inside forward.
        A tensor (a per-rank weight computed on the device) stays a tensor: converting it would sync.
        """
        self._stim_module().grad_multiplier = multiplier if torch.is_tensor(multiplier) else float(multiplier)

    def set_loss_scaler(self, scaler: Optional[Any]) -> None:
        """The AMP loss scaler of the loop (torch GradScaler or timm's NativeScaler), handed over once, so that
        subnet losses back-propagated inside forward get the same scale as the loop's backward."""
        self._stim_module().grad_scaler = getattr(scaler, '_scaler', scaler)  # NativeScaler wraps a GradScaler

    def _stim_module(self) -> StimulativeModule:
        module = self.trainable_module
        while not isinstance(module, StimulativeModule):
            module = getattr(module, 'module', None) or getattr(module, '_orig_mod')
        return module

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'StimulativeTask':
        """Wrap the trainable module in DDP. A distillation teacher (frozen, in the loss) stays out of DDP's
        reach, as timm keeps it outside the wrapped module: no broadcast of its weights at wrap, none of its
        BatchNorm buffers every step."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        module = self.trainable_module
        teacher = getattr(self.criterion, 'teacher', None)
        if teacher is not None:
            ignored = [f'{name}.{key}' for name, sub in module.named_modules() if sub is teacher
                       for key, _ in list(sub.named_parameters()) + list(sub.named_buffers())]
            DDP._set_params_and_buffers_to_ignore_for_model(module, ignored)
        self.trainable_module = DDP(module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, scope: str = 'full',
                max_graphs: int = 64, **compile_kwargs) -> nn.Module:
        """torch.compile for training; returns the model to evaluate with.

        scope='full' (default): one whole-model compile runs the full-network pass (and evaluation); subnet
        passes run eagerly. The graph only ever sees the full network at the full size: it never recompiles.
        scope='subnets': the same compiled model also runs every subnet pass. Dynamo guards on the block
        classes that `subnet()` swaps, so it builds one graph per (subnet, input size) pair it meets. That is
        bounded only for a small subnet space with a few fixed sizes (ST++ on ResNet-50: 8 subnets; give
        `--stim-sizes` buckets), so the bound is checked here and dynamo's recompile limit raised to it.
        Graphs are static per size (`dynamic=False` unless given).
        Plain training (no stimulator) always compiles the whole model.
        """
        if scope not in ('full', 'subnets'):
            raise ValueError(f"compile scope must be 'full' or 'subnets', got {scope!r}")
        subnets = self.stimulator is not None and scope == 'subnets'
        if subnets:
            self._raise_recompile_limit(self.subnet_graph_bound(), max_graphs)
            # static graphs per size bucket: dynamo's automatic dynamic shapes would turn the first size change
            # into a symbolic-size graph, whose conv kernels are slower (and re-specialised by inductor anyway)
            compile_kwargs.setdefault('dynamic', False)
        compiled = torch.compile(self.model, backend=backend, mode=mode, **compile_kwargs)
        self._stim_module().set_compiled(compiled, subnets=subnets)
        self.eval_model = compiled
        return compiled

    def subnet_graph_bound(self) -> int:
        """Most graphs scope='subnets' can build: full net (training at each full size, and eval) + subnets x
        subnet input sizes (the union over the full sizes' ranges).

        A training full pass and an evaluation pass differ in BN mode, hence 1 + the full sizes; a subnet drawn at
        full depth and full size is the full network with BN statistics frozen, hence counted among the subnets.
        """
        sampler = self.stimulator.sampler
        num_subnets = math.prod(sampler.k_list) if sampler.k_list is not None else 2 ** sampler.layout.num_skippable
        return 1 + len(self.stimulator.full_sizes) + num_subnets * len(self.stimulator.subnet_sizes)

    @staticmethod
    def _raise_recompile_limit(bound: int, max_graphs: int) -> None:
        if bound > max_graphs:
            raise ValueError(
                f'compiling the subnet passes could build up to {bound} graphs (subnets x input sizes), more than '
                f'{max_graphs}: use fixed subnet sizes (--stim-sizes, e.g. 3 buckets), a smaller space (st++), or '
                f"--stim-compile full.")
        config = torch._dynamo.config
        name = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'
        setattr(config, name, max(getattr(config, name), bound))
        if hasattr(config, 'accumulated_recompile_limit'):
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, bound)

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
        """The model's parameters (without the classifier's two for AGC), then the loss's trainable ones (a
        feature-distillation projection), as timm clips them."""
        params = list(self.model.parameters())
        params = params[:-2] if exclude_head else params
        return params + [p for p in getattr(self.criterion, 'parameters', list)() if p.requires_grad]

    @property
    def criterion(self) -> Callable:
        """The main loss (a distillation loss holds its teacher and, for features, a trained projection)."""
        return self._stim_module().criterion

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        if ema:
            return {}
        state = {} if self.stimulator is None else {'stimulator': self.stimulator.state_dict()}
        loss_state = self.criterion.task_state() if hasattr(self.criterion, 'task_state') else {}
        return dict(state, distillation=loss_state) if loss_state else state

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        if not state or ema:
            return
        if 'distillation' in state and hasattr(self.criterion, 'load_task_state'):
            self.criterion.load_task_state(state['distillation'])
        elif strict and hasattr(self.criterion, 'task_state') and self.criterion.task_state():
            raise RuntimeError('checkpoint has no feature-distillation projection; resume with the same --kd-* flags')
        if self.stimulator is None:
            if strict and 'stimulator' in state:
                raise RuntimeError('checkpoint has stimulative-training state but this run trains plainly '
                                   '(--stim none); resume with the same --stim setting.')
            return
        self.stimulator.load_state_dict(state['stimulator'])

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, Any]:
        return self.trainable_module(input, target)
