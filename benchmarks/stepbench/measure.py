"""Measuring helpers of the step benchmark: device names, syncs, dynamo counters, FLOPs, memory, summaries."""
from __future__ import annotations

import logging
import os
import platform
import statistics
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from timm_stim.flops import forward_flops

OOM = getattr(torch.cuda, 'OutOfMemoryError', RuntimeError)


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'{_cpu_name()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})'


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class RecompileLimitCounter(logging.Handler):
    """Counts dynamo's 'hit config.recompile_limit' warnings (a block that silently fell back to eager)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hits = 0

    def emit(self, record):
        try:
            msg = record.getMessage()
        except Exception:
            return
        if 'hit config.' in msg and 'limit' in msg:
            self.hits += 1


def dynamo_stats() -> Dict[str, int]:
    try:
        from torch._dynamo.utils import counters
    except Exception:
        return {}
    return {
        'unique_graphs': int(counters['stats'].get('unique_graphs', 0)),
        'frames_total': int(counters['frames'].get('total', 0)),
        'frames_ok': int(counters['frames'].get('ok', 0)),
    }


def diff_stats(after: Dict[str, int], before: Dict[str, int]) -> Dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


class FlopTable:
    """Forward FLOPs of (subnet, input size) on a meta-device copy of the model, cached."""

    def __init__(self, create_fn: Callable[[], nn.Module], full_size: int, in_chans: int = 3):
        with torch.device('meta'):
            self.model = create_fn()
        self.model.eval()
        self.full_size = full_size
        self.in_chans = in_chans
        self.cache: Dict[Tuple[Any, int], int] = {}

    def flops(self, layout=None, spec=None, size: Optional[int] = None) -> int:
        size = int(size or self.full_size)
        key = (None if spec is None else tuple(spec.keep), size)
        if key not in self.cache:
            self.cache[key] = forward_flops(self.model, (self.in_chans, size, size), layout, spec)
        return self.cache[key]

    def ideal_ratio(self, layout, steps_draws: Sequence[Sequence[Tuple[Any, int]]]) -> Tuple[float, float]:
        """(ideal step-cost ratio vs plain, mean subnet FLOP fraction) over the recorded steps."""
        full = self.flops()
        ratios, fracs = [], []
        for draws in steps_draws:
            f = [self.flops(layout, spec, size) / full for spec, size in draws]
            ratios.append(1.0 + sum(f))
            fracs.extend(f)
        return statistics.fmean(ratios), statistics.fmean(fracs)


def cpu_step_peak_bytes(step_fn: Callable[[], Any]) -> Optional[int]:
    """Peak of the running sum of CPU tensor allocations during one step (torch.profiler), or None."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step_fn()
        allocs = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation and str(node.extra_fields.device).startswith('cpu'):
                allocs.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
            stack.extend(node.children)
        allocs.sort()
        cur = peak = 0
        for _, size in allocs:
            cur += size
            peak = max(peak, cur)
        return peak if allocs else None
    except Exception as e:  # private profiler API: report n/a rather than fail the benchmark
        logging.getLogger(__name__).warning(f'CPU memory measurement failed: {type(e).__name__}: {e}')
        return None


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def static_bytes(model: nn.Module, opt: torch.optim.Optimizer, extra=()) -> int:
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return tensor_bytes(list(model.parameters()) + list(model.buffers()) + state + list(extra))


def summarize(times: Sequence[float]) -> Dict[str, float]:
    ts = sorted(times)
    q = lambda p: ts[min(len(ts) - 1, max(0, int(round(p * (len(ts) - 1)))))]
    return {'median_ms': 1e3 * statistics.median(ts), 'mean_ms': 1e3 * statistics.fmean(ts), 'p10_ms': 1e3 * q(0.1),
            'p90_ms': 1e3 * q(0.9), 'min_ms': 1e3 * ts[0], 'n': len(ts), 'times_ms': [1e3 * t for t in times]}
