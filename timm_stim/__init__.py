"""timm_stim: Stimulative Training (ST, NeurIPS 2022) and ST++ for timm models."""
import timm as _timm

# timm 1.0.31 added the checkpoint saver's resumable history, which run folders rely on (pyproject's lower bound)
if tuple(int(p) for p in _timm.__version__.split('.')[:3] if p.isdigit()) < (1, 0, 31):
    raise ImportError(f"timm_stim needs timm >= 1.0.31 (found {_timm.__version__}): pip install -U 'timm>=1.0.31'")
from .blocks import BlockLayout, NoResidualBlocksError, ResidualBlock, SubnetSpec, find_residual_blocks
from .bn import frozen_bn_stats, recalibrate_bn
from .losses import StimLoss, create_stim_loss, kl_distill_loss, standardize_logits
from .sampler import SubnetSampler, parse_space, space_k_list
from .skip import resolve_spec, subnet
from .sizes import SizeSampler, SmallerInputsError, check_smaller_inputs, resize_batch, smaller_input_kwargs
from .stimulator import STIM_PRESETS, StimConfig, Stimulator, create_stim_config, create_stimulator, stimulative_forward
from .task import StimulativeModule, StimulativeTask

__version__ = '0.1.0'
