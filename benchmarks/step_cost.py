#!/usr/bin/env python3
"""Cost of one training step: plain training vs ST vs ST++ (vs ST++ memory-lean), in one process.

For every config and every M in --subnets it measures the median step time (forward + backward +
optimizer step) and the peak memory, and compares the time with the FLOP-ideal ratio

    ideal = 1 + mean over timed steps of sum_k FLOPs(subnet_k at size_k) / FLOPs(full net at full size)

where the subnets and sizes are the ones the fixed-seed Stimulator actually drew during the timed steps and
FLOPs are counted with torch.utils.flop_counter.FlopCounterMode (forward FLOPs of a meta-device copy of the
model; the same ratio holds for forward + backward). Resizing, losses and optimizer are not in the ideal.

It also checks that `train_stim.py --stim none`'s per-step path (StimulativeTask(model, criterion,
stimulator=None)) costs the same as a hand-written `criterion(model(x), y).backward(); opt.step()` loop
and as timm's ClassificationTask: the three are interleaved (rotating order) in the same process.

Memory: CUDA: torch.cuda.max_memory_allocated over the timed steps (reset per config). CPU: PyTorch has
no CPU allocator statistics, so two extra steps per config run under torch.profiler(profile_memory=True);
the peak of the running sum of CPU tensor allocations during a step is added to the bytes alive before the
step (parameters, optimizer state, input); gradients are allocated inside the step (zero_grad sets them to
None). That counts tensors only (no allocator caching / fragmentation); 'n/a' if the profiler API fails.

Timing: 'meas/id' = median step time ratio / ideal; 'mean m/i' = mean step time ratio / ideal (the ideal is a
mean over the timed steps, and total training time is a sum of steps, so with draws of very different cost, as
ST++ M=1, the mean-based figure is the one to trust; both are in the JSON with every step's time).

--compile: plain = whole-model torch.compile (ClassificationTask.compile / StimulativeTask.compile without
stimulator / torch.compile(model)); ST/ST++ = StimulativeTask.compile(scope=...) for each --compile-scope:
'full' (whole-model compile of the full pass, subnets eager) and 'subnets' (the same compiled model also runs
every subnet pass: one static graph per (subnet, input size); needs --stim-sizes buckets, refused otherwise and
reported as an error row). Before its warm-up, a 'subnets' row pre-compiles every (subnet, size) pair the
stimulator can draw (steps whose draws are forced to the enumerated pairs), so timed steps never compile.
Compiled rows report first-step time, compile overhead (pre-compile + warm-up time minus those steps at steady
state; 'compile_vs_plain' divides it by the compiled plain row's), steady-state time, dynamo graph counts per
step and the graph bound task.subnet_graph_bound(); with --graph-steps N an extra compiled ST++ M=1 run (scope
'subnets', needs --stim-sizes) of N sampled steps records torch._dynamo.utils.counters['stats']['unique_graphs']
after every step and compares the final count with 1 + distinct (subnet, size) pairs met and with the bound.

Examples:
    python benchmarks/step_cost.py --model resnet50 --batch-size 256 --img-size 224 --device cuda \\
        --amp-dtype bfloat16 --channels-last --subnets 1 6 --repeats 30 --warmup 10 --compile --json out.json
    OMP_NUM_THREADS=1 python benchmarks/step_cost.py --model resnet18 --img-size 64 --batch-size 16 \\
        --device cpu --repeats 5 --warmup 2 --subnets 1 6
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import os
import platform
import socket
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import timm  # noqa: E402
from timm_stim import StimulativeTask, create_stim_config, create_stimulator, smaller_input_kwargs  # noqa: E402
from timm_stim.flops import forward_flops  # noqa: E402

_OOM = getattr(torch.cuda, 'OutOfMemoryError', RuntimeError)
CONFIGS = ('plain', 'none', 'hand', 'st', 'st++', 'st++lean')
CONFIG_HELP = {
    'plain': "timm ClassificationTask: task(x, y)['loss'].backward(); opt.step()",
    'none': 'StimulativeTask(model, criterion, stimulator=None) (train_stim.py --stim none)',
    'hand': 'hand-written loop: criterion(model(x), y).backward(); opt.step()',
    'st': "ST: space 'st', loss 'kl', full-size subnets",
    'st++': "ST++: space 'st++', loss 'kl-', subnet sizes uniform in [0.43 S, S]",
    'st++lean': 'ST++ with memory_lean=True (per-subnet autograd.grad, one graph alive at a time)',
}


# ----------------------------------------------------------------------------------------------------
# helpers

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


# ----------------------------------------------------------------------------------------------------
# benchmark

class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.amp_dtype = {'none': None, 'float32': None, 'bfloat16': torch.bfloat16,
                          'float16': torch.float16}[args.amp_dtype]
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.create_kwargs = self._create_kwargs()
        g = torch.Generator().manual_seed(args.seed)
        self.x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(
            self.device, memory_format=self.memory_format)
        self.y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(self.device)
        self.flop_table = FlopTable(self._new_model_raw, args.img_size)
        self.recompile_counter = RecompileLimitCounter()
        logging.getLogger('torch._dynamo').addHandler(self.recompile_counter)
        self.clock = 'wall' if self.device.type == 'cuda' or args.clock == 'wall' else 'cpu'
        self.wall_log: List[float] = []

    def _create_kwargs(self) -> Dict[str, Any]:
        kw = dict(num_classes=self.args.num_classes)
        kw.update(smaller_input_kwargs(self.args.model))  # ViT: dynamic_img_size=True (plain rows use it too)
        try:
            with torch.device('meta'):
                timm.create_model(self.args.model, img_size=self.args.img_size, **kw)
            kw['img_size'] = self.args.img_size
        except TypeError:
            pass
        return kw

    def _new_model_raw(self) -> nn.Module:
        return timm.create_model(self.args.model, pretrained=False, **self.create_kwargs)

    def new_model(self) -> nn.Module:
        torch.manual_seed(self.args.seed)
        model = self._new_model_raw().to(self.device)
        model.to(memory_format=self.memory_format)
        model.train()
        return model

    def new_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def make_step(self, kind: str, forward: Callable, model: Optional[nn.Module], opt: torch.optim.Optimizer,
                  draws_log: list):
        x, y = self.x, self.y

        def step():
            with self.autocast():
                out = forward(x, y)
            loss = out['loss'] if isinstance(out, dict) else out
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if isinstance(out, dict) and out.get('draws'):
                draws_log.append(list(out['draws']))
        return step

    def timed(self, step: Callable[[], Any], n: int, graph_log: Optional[list] = None) -> List[float]:
        times = []
        cuda = self.device.type == 'cuda'
        self.wall_log = []
        for _ in range(n):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                sync(self.device)
                t0 = time.perf_counter()
                start.record()
                step()
                end.record()
                end.synchronize()
                wall = time.perf_counter() - t0
                # event time excludes host time before the first kernel; take the larger (Python-bound steps)
                times.append(max(start.elapsed_time(end) / 1e3, wall))
            else:
                c0, t0 = time.process_time(), time.perf_counter()
                step()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                self.wall_log.append(wall)
                times.append(cpu if self.clock == 'cpu' else wall)
            if graph_log is not None:
                graph_log.append(dynamo_stats().get('unique_graphs', 0))
        return times

    def build(self, config: str, m: int, compiled: bool, scope: str = 'full'):
        """(forward callable, model, optimizer, stimulator) for one config."""
        model = self.new_model()
        crit = nn.CrossEntropyLoss()
        stim = None
        if config == 'plain':
            try:
                from timm.task import ClassificationTask
                task = ClassificationTask(model, criterion=crit, device=self.device, verbose=False)
                if compiled:
                    task.compile(backend=self.args.compile_backend, mode=self.args.compile_mode)
                forward = task
            except (ImportError, TypeError):  # timm without timm.task (or another signature): an equivalent
                fwd_model = torch.compile(model, backend=self.args.compile_backend, mode=self.args.compile_mode) \
                    if compiled else model
                forward = lambda x, y: {'loss': crit(fwd_model(x), y)}
        elif config == 'hand':
            fwd_model = torch.compile(model, backend=self.args.compile_backend, mode=self.args.compile_mode) \
                if compiled else model
            forward = lambda x, y: crit(fwd_model(x), y)
        elif config == 'none':
            task = StimulativeTask(model, crit, None, device=self.device, verbose=False)
            if compiled:
                task.compile(backend=self.args.compile_backend, mode=self.args.compile_mode)
            forward = task
        else:
            preset = 'st' if config == 'st' else 'st++'
            overrides = dict(num_subnets=m, seed=self.args.seed, memory_lean=config == 'st++lean')
            if preset == 'st++':
                overrides['min_scale'] = self.args.min_scale
                if self.args.stim_sizes:
                    overrides['sizes'] = list(self.args.stim_sizes)
            stim = create_stimulator(model, create_stim_config(preset, **overrides), full_size=self.args.img_size)
            task = StimulativeTask(model, crit, stim, device=self.device, verbose=False)
            if compiled:
                task.compile(backend=self.args.compile_backend, mode=self.args.compile_mode, scope=scope)
            forward = task
        return forward, model, self.new_optimizer(model), stim

    def precompile_pairs(self, step: Callable[[], Any], stim) -> Tuple[List[float], int]:
        """Run steps whose draws are forced to every (subnet, size) pair the stimulator can produce, M per step.

        With scope='subnets' each pair is a graph of its own; compiling them all here keeps compilation out of the
        timed steps (a sampled warm-up meets the rare pairs late). Returns (step times, pairs covered).
        """
        pairs = [(spec, size) for spec in stim.sampler.support() for size in stim.size_sampler.sizes]
        m = stim.config.num_subnets
        chunks = [pairs[i:i + m] for i in range(0, len(pairs), m)]
        original = stim.sample
        times = []
        try:
            for chunk in chunks:
                draws = (chunk + [chunk[-1]] * m)[:m]
                stim.sample = lambda num=None, draws=draws: list(draws)
                times.extend(self.timed(step, 1))
        finally:
            stim.sample = original
        return times, len(pairs)

    def measure_memory(self, step: Callable[[], Any], model, opt) -> Dict[str, Any]:
        if self.device.type == 'cuda':
            return {}  # filled from max_memory_allocated over the timed steps
        base = static_bytes(model, opt, [self.x, self.y])
        peaks = [cpu_step_peak_bytes(step) for _ in range(self.args.memory_steps)]
        peaks = [p for p in peaks if p is not None]
        if not peaks:
            return {'peak_mib': None, 'step_peak_mib': None, 'static_mib': base / 2 ** 20,
                    'memory_method': 'n/a (torch.profiler memory events unavailable)'}
        return {'peak_mib': (base + max(peaks)) / 2 ** 20, 'step_peak_mib': max(peaks) / 2 ** 20,
                'static_mib': base / 2 ** 20,
                'memory_method': 'cpu: static tensors + peak running sum of profiler allocations in a step'}

    def worst_case_memory(self, step, model, opt, stim) -> Dict[str, Any]:
        """Peak of one step whose M subnets are all the full network at full size (the largest draw).

        Sampled peaks depend on which subnets and sizes were drawn; this one does not, so it is the number
        to compare for memory-lean (M=6 lean vs M=1). Only for M=1 and memory-lean configs (M full-size
        subnets without memory-lean would need about M+1 times the plain activations).
        """
        draws = [(stim.layout.full_spec(), self.args.img_size)] * stim.config.num_subnets
        original = stim.sample
        stim.sample = lambda num=None: list(draws)
        try:
            if self.device.type == 'cuda':
                sync(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                step()
                sync(self.device)
                return {'peak_worst_mib': torch.cuda.max_memory_allocated(self.device) / 2 ** 20}
            peak = cpu_step_peak_bytes(step)
            base = static_bytes(model, opt, [self.x, self.y])
            return {'peak_worst_mib': None if peak is None else (base + peak) / 2 ** 20}
        except _OOM as e:
            return {'peak_worst_mib': None, 'peak_worst_error': f'OOM: {e}'[:200]}
        finally:
            stim.sample = original

    def cleanup(self):
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()
        if self.args.reset_dynamo:
            try:
                torch._dynamo.reset()
            except Exception:
                pass

    def run_config(self, config: str, m: int, compiled: bool, scope: str = 'full') -> Dict[str, Any]:
        a = self.args
        t_build = time.perf_counter()
        try:
            forward, model, opt, stim = self.build(config, m, compiled, scope)
        except ValueError as e:  # scope='subnets' refuses an unbounded graph count (no --stim-sizes, large space)
            self.cleanup()
            return {'config': config, 'subnets': m, 'compiled': compiled, 'compile_scope': scope,
                    'error': f'refused: {e}'}
        build_s = time.perf_counter() - t_build
        draws_log: list = []
        step = self.make_step(config, forward, model, opt, draws_log)
        stats0, hits0 = dynamo_stats(), self.recompile_counter.hits
        graph_log: list = []
        precompile, pairs = (self.precompile_pairs(step, stim) if compiled and scope == 'subnets' and stim is not None
                             else ([], 0))
        stats_pre = dynamo_stats()
        warm = self.timed(step, a.warmup, graph_log if compiled else None)
        stats_warm = dynamo_stats()
        draws_log.clear()
        if self.device.type == 'cuda':
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            mem_start = torch.cuda.memory_allocated(self.device)
        times = self.timed(step, a.repeats, graph_log if compiled else None)
        walls = list(self.wall_log)
        timed_draws = list(draws_log)
        row: Dict[str, Any] = {'config': config, 'subnets': m if stim is not None else 0, 'compiled': compiled,
                               'description': CONFIG_HELP[config], 'clock': self.clock}
        if compiled:
            row['compile_scope'] = scope
        row.update(summarize(times))
        if walls and self.clock != 'wall':
            row['wall_median_ms'] = 1e3 * statistics.median(walls)
        if self.device.type == 'cuda':
            peak = torch.cuda.max_memory_allocated(self.device)
            row.update(peak_mib=peak / 2 ** 20, step_peak_mib=(peak - mem_start) / 2 ** 20,
                       static_mib=mem_start / 2 ** 20, memory_method='cuda: torch.cuda.max_memory_allocated')
        else:
            row.update(self.measure_memory(step, model, opt))
        if stim is not None and (m == 1 or stim.config.memory_lean) and a.worst_case_memory:
            row.update(self.worst_case_memory(step, model, opt, stim))
        row['warmup_first_step_s'] = warm[0] if warm else None
        row['warmup_total_s'] = sum(warm)
        compiling = precompile + warm  # steps that may compile, less what they cost at steady state
        row['compile_overhead_s'] = (sum(compiling) - len(compiling) * row['median_ms'] / 1e3
                                     if compiled and warm else None)
        if precompile:
            row.update(precompile_steps=len(precompile), precompile_s=sum(precompile), precompile_pairs=pairs,
                       dynamo_precompile=diff_stats(stats_pre, stats0))
        row['build_s'] = build_s
        if stim is not None:
            ideal, frac = self.flop_table.ideal_ratio(stim.layout, timed_draws)
            row['ideal_ratio'] = ideal
            row['mean_subnet_flop_fraction'] = frac
            n_blocks = len(stim.layout.blocks)
            flat = [d for draws in timed_draws for d in draws]
            row['mean_kept_block_fraction'] = statistics.fmean(sum(s.keep) / n_blocks for s, _ in flat)
            row['mean_subnet_size'] = statistics.fmean(sz for _, sz in flat)
            row['distinct_sizes'] = len({sz for _, sz in flat})
            row['distinct_subnets'] = len({s.keep for s, _ in flat})
            row['layout'] = str(stim.layout)
            row['stimulator'] = repr(stim)
        else:
            row['ideal_ratio'] = 1.0
        if compiled:
            row['dynamo_warmup'] = diff_stats(stats_warm, stats_pre)
            row['dynamo_timed'] = diff_stats(dynamo_stats(), stats_warm)
            row['graphs_per_step'] = [g - stats0.get('unique_graphs', 0) for g in graph_log]
            row['recompile_limit_hits'] = self.recompile_counter.hits - hits0
            row['graphs_total'] = dynamo_stats().get('unique_graphs', 0) - stats0.get('unique_graphs', 0)
            if stim is not None and scope == 'subnets':
                row['graph_bound'] = forward.subnet_graph_bound()
        del forward, model, opt, stim, step
        self.cleanup()
        return row

    def run_overhead(self, compiled: bool) -> Dict[str, Any]:
        """plain (ClassificationTask) vs 'none' (StimulativeTask without stimulator) vs hand loop, interleaved."""
        a = self.args
        kinds = [c for c in ('plain', 'none', 'hand') if c in a.configs]
        built = {}
        for k in kinds:
            forward, model, opt, _ = self.build(k, 0, compiled)
            built[k] = (self.make_step(k, forward, model, opt, []), model, opt)
        stats0, hits0 = dynamo_stats(), self.recompile_counter.hits
        warm = {k: self.timed(built[k][0], a.warmup) for k in kinds}
        stats_warm = dynamo_stats()
        rounds = max(3, a.repeats // 5)
        per_round = max(2, math.ceil(a.repeats / rounds))
        times = {k: [] for k in kinds}
        walls = {k: [] for k in kinds}
        peaks = {}
        for r in range(rounds):
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for k in order:
                if self.device.type == 'cuda':
                    sync(self.device)
                    torch.cuda.reset_peak_memory_stats(self.device)
                    start = torch.cuda.memory_allocated(self.device)
                times[k].extend(self.timed(built[k][0], per_round))
                walls[k].extend(self.wall_log)
                if self.device.type == 'cuda':
                    p = torch.cuda.max_memory_allocated(self.device)
                    old = peaks.get(k, (0, 0))
                    peaks[k] = (max(old[0], p), max(old[1], p - start))
        rows = []
        for k in kinds:
            row = {'config': k, 'subnets': 0, 'compiled': compiled, 'description': CONFIG_HELP[k],
                   'ideal_ratio': 1.0, 'interleaved_rounds': rounds, 'clock': self.clock}
            row.update(summarize(times[k]))
            if walls[k] and self.clock != 'wall':
                row['wall_median_ms'] = 1e3 * statistics.median(walls[k])
            if self.device.type == 'cuda':
                # other configs' models are resident too: report the step's own peak above its start
                static = static_bytes(built[k][1], built[k][2], [self.x, self.y])
                row.update(peak_mib=(static + peaks[k][1]) / 2 ** 20, step_peak_mib=peaks[k][1] / 2 ** 20,
                           static_mib=static / 2 ** 20,
                           memory_method='cuda: own static tensors + (max_memory_allocated - allocated at step '
                                         'start); the three models are resident together while interleaved')
            else:
                row.update(self.measure_memory(built[k][0], built[k][1], built[k][2]))
            row['warmup_first_step_s'] = warm[k][0] if warm[k] else None
            row['warmup_total_s'] = sum(warm[k])
            row['compile_overhead_s'] = (sum(warm[k]) - len(warm[k]) * row['median_ms'] / 1e3) if compiled else None
            if compiled:  # the three share dynamo caches: the first one warmed up ('plain') pays the compile
                row['dynamo_warmup'] = diff_stats(stats_warm, stats0)
                row['dynamo_timed'] = diff_stats(dynamo_stats(), stats_warm)
                row['recompile_limit_hits'] = self.recompile_counter.hits - hits0
            rows.append(row)
        del built
        self.cleanup()
        return rows

    def run_dispatch_overhead(self, rounds: int = 10, block: int = 200) -> Dict[str, Any]:
        """Per-step Python cost of StimulativeTask(stimulator=None) vs the hand loop, on a tiny model.

        On the real model this difference is far below timing noise; a tiny Linear model makes the per-step
        host cost of each path visible (min over interleaved blocks of steps, one sync per block).
        """
        torch.manual_seed(0)
        crit = nn.CrossEntropyLoss()
        x = torch.randn(4, 16, device=self.device)
        y = torch.randint(0, 8, (4,), device=self.device)
        steps = {}
        for kind in ('hand', 'none'):
            model = nn.Linear(16, 8).to(self.device)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            fwd = (lambda mdl: (lambda a, b: crit(mdl(a), b)))(model) if kind == 'hand' else \
                StimulativeTask(model, crit, None, device=self.device, verbose=False)

            def step(fwd=fwd, opt=opt):
                out = fwd(x, y)
                loss = out['loss'] if isinstance(out, dict) else out
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            steps[kind] = step
        best = {k: float('inf') for k in steps}
        for r in range(rounds):
            for k in (('hand', 'none') if r % 2 == 0 else ('none', 'hand')):
                sync(self.device)
                t0 = time.perf_counter()
                for _ in range(block):
                    steps[k]()
                sync(self.device)
                best[k] = min(best[k], (time.perf_counter() - t0) / block)
        return {'hand_us': 1e6 * best['hand'], 'none_us': 1e6 * best['none'],
                'overhead_us': 1e6 * (best['none'] - best['hand']), 'model': 'nn.Linear(16, 8), batch 4'}

    def run_script_loop(self, rounds: int = 6) -> Dict[str, Any]:
        """train_stim.py's epoch loop vs the benchmark's own step loop over the same on-device batches.

        `train_stim.train_one_epoch` (forward, backward, update, EMA/scheduler hooks, on-device loss sums, log
        lines every 50 updates) with --script-loop-config: 'none' (what `train_stim.py --stim none` runs) against
        what a timm user writes (ClassificationTask forward, backward, optimizer step, zero_grad); an ST config
        (e.g. st++lean, M = --script-loop-subnets, compiled with --script-loop-compile) against this benchmark's
        step of the same config, so the ratio is train_stim.py's img/s vs the step benchmark's. Both go through a
        list of --script-loop-batches copies of the benchmark batch (no data loading: the same for both);
        separate models with the same initial weights and draws; interleaved rounds, per-step time = round time /
        batches.
        """
        import train_stim
        a = self.args
        config, m, compiled = a.script_loop_config, a.script_loop_subnets, a.script_loop_compile
        batches = [(self.x, self.y)] * (a.script_loop_batches or max(5, a.repeats))
        targs = train_stim.parse_args(['--stim', 'none', '--model', a.model, '--log-interval', '50']
                                      + (['--channels-last'] if a.channels_last else []))
        targs.world_size, targs.rank, targs.distributed = 1, 0, False
        crit = nn.CrossEntropyLoss()
        if config == 'none':
            script_model = self.new_model()
            script_task = StimulativeTask(script_model, crit, None, device=self.device, verbose=False)
            if compiled:
                script_task.compile(backend=a.compile_backend, mode=a.compile_mode)
            script_opt = self.new_optimizer(script_model)
            minimal_forward, _, minimal_opt, _ = self.build('plain', 0, compiled)
        else:
            script_task, script_model, script_opt, _ = self.build(config, m, compiled)
            minimal_forward, _, minimal_opt, _ = self.build(config, m, compiled)
        minimal_step = self.make_step(config, minimal_forward, None, minimal_opt, [])

        def script_epoch():
            train_stim.train_one_epoch(0, script_task, batches, script_opt, targs, self.device,
                                       amp_autocast=self.autocast)

        def minimal_epoch():
            for _ in batches:
                minimal_step()

        progress_bar, train_stim._progress_bar = train_stim._progress_bar, lambda *args, **kwargs: None  # timing only
        try:
            epochs = {'script': script_epoch, 'minimal': minimal_epoch}
            for fn in epochs.values():  # warm-up (compile, cudnn autotuning, allocator)
                fn()
            per_step = {k: [] for k in epochs}
            for r in range(rounds):
                for k in (('script', 'minimal') if r % 2 == 0 else ('minimal', 'script')):
                    sync(self.device)
                    c0, t0 = time.process_time(), time.perf_counter()
                    epochs[k]()
                    sync(self.device)
                    t = (time.process_time() - c0) if self.clock == 'cpu' else (time.perf_counter() - t0)
                    per_step[k].append(1e3 * t / len(batches))
        finally:
            train_stim._progress_bar = progress_bar
        med = {k: statistics.median(v) for k, v in per_step.items()}
        out = {'script_ms': med['script'], 'minimal_ms': med['minimal'], 'ratio': med['script'] / med['minimal'],
               'min_ratio': min(per_step['script']) / min(per_step['minimal']), 'per_round_ms': per_step,
               'batches_per_round': len(batches), 'rounds': rounds, 'clock': self.clock, 'config': config,
               'subnets': m if config != 'none' else 0, 'compiled': compiled,
               'script_img_s': 1e3 * a.batch_size / med['script'], 'minimal_img_s': 1e3 * a.batch_size / med['minimal']}
        self.cleanup()
        return out

    def run_graph_check(self) -> Dict[str, Any]:
        """Compiled ST++ M=1, scope 'subnets', --graph-steps sampled steps: unique dynamo graphs after each step."""
        a = self.args
        if not a.stim_sizes:
            return {'steps': 0, 'skipped': "scope 'subnets' needs --stim-sizes buckets"}
        forward, model, opt, stim = self.build('st++', 1, True, 'subnets')
        draws_log: list = []
        step = self.make_step('st++', forward, model, opt, draws_log)
        stats0, hits0 = dynamo_stats(), self.recompile_counter.hits
        graph_log: list = []
        times = self.timed(step, a.graph_steps, graph_log)
        g = [x - stats0.get('unique_graphs', 0) for x in graph_log]
        out = {
            'steps': a.graph_steps, 'subnets': 1, 'graphs_per_step': g, 'final_graphs': g[-1] if g else 0,
            'graph_bound': forward.subnet_graph_bound(),
            'pairs_met': len({(tuple(s.keep), sz) for d in draws_log for s, sz in d}),
            'last_new_graph_step': max((i for i in range(1, len(g)) if g[i] > g[i - 1]), default=0),
            'distinct_sizes': len({sz for d in draws_log for _, sz in d}),
            'sizes_seen': sorted({sz for d in draws_log for _, sz in d}),
            'dynamo': diff_stats(dynamo_stats(), stats0),
            'recompile_limit_hits': self.recompile_counter.hits - hits0,
            'step_ms': [1e3 * t for t in times],
            'stim_sizes': list(a.stim_sizes) if a.stim_sizes else None,
        }
        del forward, model, opt, stim, step
        self.cleanup()
        return out

    def prewarm_sizes(self) -> None:
        """cudnn.benchmark autotunes every new conv shape; ST++ draws up to ~130 sizes. Run the full net (fwd +
        bwd) once at every ST++ size before timing, so timed steps see steady-state (already tuned) kernels."""
        a = self.args
        if getattr(self, 'prewarm_s', None) is not None or a.prewarm_max_s <= 0:
            return
        from timm_stim.sizes import SizeSampler, resize_batch, size_multiple
        model = self.new_model()
        sizes = list(SizeSampler(a.img_size, a.min_scale, a.stim_sizes or None, size_multiple(model)).sizes)
        t0 = time.perf_counter()
        done = 0
        for size in sizes:
            if time.perf_counter() - t0 > a.prewarm_max_s:
                break
            with self.autocast():
                out = model(resize_batch(self.x, size))
            out.float().mean().backward()
            model.zero_grad(set_to_none=True)
            sync(self.device)
            done += 1
        self.prewarm_s = time.perf_counter() - t0
        self.prewarm_sizes_done = (done, len(sizes))
        self._log(f'pre-warmed cudnn for {done}/{len(sizes)} sizes in {self.prewarm_s:.1f} s')
        del model
        self.cleanup()

    def run(self) -> Dict[str, Any]:
        a = self.args
        modes = ([True] if a.compile_only else [False, True]) if a.compile else [False]
        rows = []
        graph_check = None
        if a.script_loop and a.script_loop_config != 'none':
            self._log(f'train_stim.py epoch loop vs the step loop: {a.script_loop_config} M={a.script_loop_subnets}'
                      f' compiled={a.script_loop_compile}')
            self.script_loop = self.run_script_loop(a.script_loop_rounds)
        for compiled in modes:
            if any(c in a.configs for c in ('plain', 'none', 'hand')):
                if not compiled and 'none' in a.configs:
                    self.dispatch = self.run_dispatch_overhead()
                    if a.script_loop and a.script_loop_config == 'none':
                        self._log('train_stim.py --stim none epoch loop vs a minimal timm loop')
                        self.script_loop = self.run_script_loop(a.script_loop_rounds)
                self._log(f'plain / none / hand (interleaved), compiled={compiled}')
                rows.extend(self.run_overhead(compiled))
                self.checkpoint(rows, graph_check)
            for config in [c for c in CONFIGS if c in a.configs and c not in ('plain', 'none', 'hand')]:
                if config.startswith('st++') and self.device.type == 'cuda' and torch.backends.cudnn.benchmark:
                    self.prewarm_sizes()  # once, after the plain / ST rows are saved
                for scope in (a.compile_scope if compiled else ['full']):
                    for m in a.subnets:
                        self._log(f'{config} M={m} compiled={compiled}' + (f' scope={scope}' if compiled else ''))
                        try:
                            rows.append(self.run_config(config, m, compiled, scope))
                        except _OOM as e:
                            rows.append({'config': config, 'subnets': m, 'compiled': compiled,
                                         'error': f'OOM: {e}'[:300]})
                            self.cleanup()
                        self._log('  ' + format_row(rows[-1]))
                        self.checkpoint(rows, graph_check)
            if compiled and a.graph_steps > 0:
                self._log(f'graph check: compiled ST++ M=1, {a.graph_steps} steps')
                graph_check = self.run_graph_check()
        add_relative(rows)
        return {'rows': rows, 'graph_check': graph_check, 'dispatch_overhead': getattr(self, 'dispatch', None),
                'script_loop': getattr(self, 'script_loop', None)}

    def checkpoint(self, rows, graph_check) -> None:
        """Write what is measured so far (a per-config timeout then still leaves results)."""
        if not self.args.json:
            return
        add_relative(rows)
        partial = {'meta': dict(self.meta_base(), partial=True), 'rows': rows, 'graph_check': graph_check}
        os.makedirs(os.path.dirname(os.path.abspath(self.args.json)), exist_ok=True)
        with open(self.args.json, 'w') as f:
            json.dump(partial, f, indent=1, default=str)

    def meta_base(self) -> Dict[str, Any]:
        a = self.args
        return {
            'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
            'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            'host': socket.gethostname(), 'device': device_name(self.device),
            'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
            'cuda': torch.version.cuda,
            'cudnn': torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            'cudnn_benchmark': torch.backends.cudnn.benchmark, 'prewarm_s': getattr(self, 'prewarm_s', None),
            'prewarm_sizes_done': getattr(self, 'prewarm_sizes_done', None),
            'threads': torch.get_num_threads(), 'omp_num_threads': os.environ.get('OMP_NUM_THREADS'),
            'args': vars(a), 'create_kwargs': self.create_kwargs, 'clock': self.clock,
            'full_flops': self.flop_table.flops(),
        }

    def _log(self, msg: str):
        print(f'[{time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


def add_relative(rows: List[Dict[str, Any]]) -> None:
    """ratio / memory vs the plain row of the same compile mode."""
    for compiled in (False, True):
        base = next((r for r in rows if r.get('config') == 'plain' and r['compiled'] == compiled and 'error' not in r),
                    None)
        if base is None:
            base = next((r for r in rows if r.get('config') == 'hand' and r['compiled'] == compiled), None)
        for r in rows:
            if r['compiled'] != compiled or 'error' in r or base is None:
                continue
            r['ratio_vs_plain'] = r['median_ms'] / base['median_ms']
            if compiled and r is not base and r.get('compile_overhead_s') and base.get('compile_overhead_s'):
                r['compile_vs_plain'] = r['compile_overhead_s'] / base['compile_overhead_s']
            r['measured_over_ideal'] = r['ratio_vs_plain'] / r['ideal_ratio']
            if r.get('mean_ms') and base.get('mean_ms'):  # total time: the ideal is a mean over steps too
                r['measured_over_ideal_mean'] = r['mean_ms'] / base['mean_ms'] / r['ideal_ratio']
            key = 'peak_mib' if (r.get('peak_mib') and base.get('peak_mib')) else 'step_peak_mib'
            if r.get(key) and base.get(key):
                r['memory_vs_plain'] = r[key] / base[key]
                r['memory_vs_plain_basis'] = key
    # memory-lean target: ST++ lean with the largest M vs ST++ (not lean) with M=1, same compile mode
    for r in rows:
        if r.get('config') == 'st++lean' and 'error' not in r:
            ref = next((q for q in rows if q.get('config') == 'st++' and q.get('subnets') == 1
                        and q['compiled'] == r['compiled'] and 'error' not in q), None)
            if ref and r.get('peak_mib') and ref.get('peak_mib'):
                r['memory_vs_stpp_m1'] = r['peak_mib'] / ref['peak_mib']
            if ref and r.get('peak_worst_mib') and ref.get('peak_worst_mib'):
                r['memory_worst_vs_stpp_m1'] = r['peak_worst_mib'] / ref['peak_worst_mib']


def _fmt(v, spec):
    return 'n/a' if v is None else format(v, spec)


def _mode(r: Dict[str, Any]) -> str:
    if not r.get('compiled'):
        return 'eager'
    return {'full': 'cmp-full', 'subnets': 'cmp-subn'}.get(r.get('compile_scope'), 'compiled')


def format_row(r: Dict[str, Any]) -> str:
    if 'error' in r:
        return f"{r['config']:<9} {'C' if r['compiled'] else 'E'} M={r['subnets']}: {r['error']}"
    return (f"{_mode(r):<9} {r['config']:<9} {r['subnets']:>2} "
            f"{r['median_ms']:>10.2f} {_fmt(r.get('ratio_vs_plain'), '>7.3f')} {r['ideal_ratio']:>7.3f} "
            f"{_fmt(r.get('measured_over_ideal'), '>8.3f')} {_fmt(r.get('measured_over_ideal_mean'), '>8.3f')} "
            f"{_fmt(r.get('peak_mib'), '>10.1f')} "
            f"{_fmt(r.get('step_peak_mib'), '>10.1f')} {_fmt(r.get('memory_vs_plain'), '>7.2f')} "
            f"{_fmt(r.get('peak_worst_mib'), '>10.1f') if r.get('peak_worst_mib') else format('-', '>10')}"
            + (f" {r['wall_median_ms']:>10.2f}" if r.get('wall_median_ms') is not None else ''))


def print_table(result: Dict[str, Any], out=None) -> None:
    out = out or sys.stdout
    hdr = (f"{'mode':<9} {'config':<9} {'M':>2} {'ms/step':>10} {'ratio':>7} {'ideal':>7} {'meas/id':>8} {'mean m/i':>8} "
           f"{'peak MiB':>10} {'step MiB':>10} {'mem/pl':>7} {'worst MiB':>10}")
    clock = next((r.get('clock') for r in result['rows'] if r.get('clock')), 'wall')
    if clock == 'cpu':
        hdr += f" {'wall ms':>10}"
        print('# ms/step = median process CPU time per step (ratios use it); wall ms = median wall time', file=out)
    print(hdr, file=out)
    print('-' * len(hdr), file=out)
    for r in result['rows']:
        print(format_row(r), file=out)
    rows = result['rows']
    for compiled in (False, True):
        by = {r['config']: r for r in rows if r['compiled'] == compiled and r.get('subnets', 0) == 0 and 'error' not in r}
        if 'none' in by and 'hand' in by:
            print(f"[{'compiled' if compiled else 'eager'}] --stim none vs hand loop: "
                  f"{by['none']['median_ms'] / by['hand']['median_ms']:.4f}x (min {by['none']['min_ms'] / by['hand']['min_ms']:.4f}x)"
                  + (f"; vs ClassificationTask: {by['none']['median_ms'] / by['plain']['median_ms']:.4f}x"
                     if 'plain' in by else ''), file=out)
    for r in rows:
        if r.get('compiled') and 'compile_overhead_s' in r and r.get('compile_overhead_s') is not None:
            print(f"[{_mode(r)}] {r['config']} M={r['subnets']}: first step {r['warmup_first_step_s']:.2f} s, "
                  f"compile overhead {r['compile_overhead_s']:.2f} s, graphs in warm-up "
                  f"{r.get('dynamo_warmup', {}).get('unique_graphs', 'n/a')}, new graphs in timed steps "
                  f"{r.get('dynamo_timed', {}).get('unique_graphs', 'n/a')}, "
                  + (f"pre-compiled {r['precompile_pairs']} (subnet, size) pairs in {r['precompile_s']:.2f} s, "
                     if r.get('precompile_pairs') else '')
                  + (f"graphs {r['graphs_total']} (bound {r['graph_bound']}), " if r.get('graph_bound') else '')
                  + (f"compile vs plain {r['compile_vs_plain']:.2f}x, " if r.get('compile_vs_plain') else '')
                  + f"recompile-limit hits {r.get('recompile_limit_hits', 'n/a')}", file=out)
    d = result.get('dispatch_overhead')
    plain = next((r for r in rows if r.get('config') == 'plain' and not r['compiled'] and 'error' not in r), None)
    if d:
        print(f"[dispatch] tiny model step: hand loop {d['hand_us']:.1f} us, StimulativeTask(stimulator=None) "
              f"{d['none_us']:.1f} us: +{d['overhead_us']:.1f} us per step"
              + (f" = {100 * d['overhead_us'] / (1e3 * plain['median_ms']):.4f}% of this model's plain step"
                 if plain else ''), file=out)
    sl = result.get('script_loop')
    if sl:
        config = sl.get('config', 'none')
        what = ('train_stim.py --stim none epoch loop', 'minimal timm loop') if config == 'none' else (
            f"train_stim.py epoch loop ({config} M={sl['subnets']}{', compiled' if sl.get('compiled') else ''})",
            'step benchmark loop')
        print(f"[loop] {what[0]} {sl['script_ms']:.2f} ms/step vs {what[1]} "
              f"{sl['minimal_ms']:.2f} ms/step: {sl['ratio']:.4f}x (min {sl['min_ratio']:.4f}x; "
              f"{sl['rounds']} interleaved rounds of {sl['batches_per_round']} batches)", file=out)
    for r in rows:
        if r.get('config') == 'st++lean' and r.get('subnets', 0) > 1 and 'error' not in r:
            print(f"[{'compiled' if r['compiled'] else 'eager'}] memory-lean M={r['subnets']} peak vs ST++ M=1 (not lean): "
                  f"sampled draws {_fmt(r.get('memory_vs_stpp_m1'), '.3f')}x, worst-case draws (all subnets = full net "
                  f"at full size) {_fmt(r.get('memory_worst_vs_stpp_m1'), '.3f')}x", file=out)
    gc_ = result.get('graph_check')
    if gc_ and gc_.get('skipped'):
        print(f"[graph check] skipped: {gc_['skipped']}", file=out)
    elif gc_:
        print(f"[graph check] compiled ST++ M=1 (scope subnets), {gc_['steps']} steps, {gc_['distinct_sizes']} "
              f"distinct sizes, {gc_['pairs_met']} (subnet, size) pairs met: {gc_['final_graphs']} graphs "
              f"(1 full pass + pairs = {1 + gc_['pairs_met']}; bound {gc_['graph_bound']}), last new graph at step "
              f"{gc_['last_new_graph_step']}, recompile-limit hits {gc_['recompile_limit_hits']}", file=out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='resnet50')
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp-dtype', default='none', choices=['none', 'float32', 'bfloat16', 'float16'],
                   help='autocast dtype for forward (float16 without a GradScaler: timing only)')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--subnets', type=int, nargs='+', default=[1, 6], help='values of M')
    p.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=CONFIGS)
    p.add_argument('--repeats', type=int, default=30, help='timed steps per config')
    p.add_argument('--warmup', type=int, default=10, help='untimed steps per config (compile happens here)')
    p.add_argument('--min-scale', type=float, default=0.43)
    p.add_argument('--stim-sizes', type=int, nargs='*', default=None,
                   help='fixed ST++ subnet sizes (buckets) instead of the uniform range')
    p.add_argument('--compile', action='store_true', help='also run compiled versions of every config')
    p.add_argument('--compile-only', action='store_true', help='with --compile: skip the eager rows')
    p.add_argument('--compile-backend', default='inductor')
    p.add_argument('--compile-mode', default=None)
    p.add_argument('--compile-scope', nargs='+', default=['full', 'subnets'], choices=['full', 'subnets'],
                   help="compiled ST/ST++ rows: StimulativeTask.compile(scope=...) for each: 'full' = whole-model "
                        "compile of the full pass, subnets eager; 'subnets' = the compiled model runs the subnet "
                        "passes too (one graph per (subnet, size): needs --stim-sizes)")
    p.add_argument('--no-compile-cache', action='store_true',
                   help="disable inductor's on-disk FX graph / AOT autograd caches (cold compile times)")
    p.add_argument('--graph-steps', type=int, default=50,
                   help='with --compile: compiled ST++ M=1 steps for the graph-count check (0: off)')
    p.add_argument('--no-reset-dynamo', dest='reset_dynamo', action='store_false',
                   help='keep dynamo caches between configs (default: torch._dynamo.reset() after each)')
    p.add_argument('--memory-steps', type=int, default=3,
                   help='CPU: profiled (untimed) steps per config for memory; the peak is the max over them')
    p.add_argument('--no-worst-case-memory', dest='worst_case_memory', action='store_false',
                   help='skip the extra step with every subnet = full net at full size (M=1 and memory-lean rows)')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    p.add_argument('--clock', default='cpu', choices=['cpu', 'wall'],
                   help='CPU device: time steps by process CPU time (default; robust when other jobs share the '
                        'cores) or wall time. Both are recorded. CUDA always uses events / wall time.')
    p.add_argument('--no-cudnn-benchmark', dest='cudnn_benchmark', action='store_false',
                   help='CUDA: leave cudnn.benchmark off (default on, as timm train.py; ST++ sizes are then '
                        'pre-warmed once before timing)')
    p.add_argument('--prewarm-max-s', type=float, default=90.0,
                   help='CUDA + cudnn.benchmark: before the first ST++ config, run the full net once at every ST++ '
                        'size (at most this many seconds) so autotuning is not timed; 0: off')
    p.add_argument('--no-script-loop', dest='script_loop', action='store_false',
                   help="skip the train_stim.py --stim none epoch loop vs minimal timm loop comparison")
    p.add_argument('--script-loop-rounds', type=int, default=6,
                   help='interleaved rounds (of --script-loop-batches batches each) of that comparison')
    p.add_argument('--script-loop-batches', type=int, default=None, help='batches per round (default: --repeats)')
    p.add_argument('--script-loop-config', default='none', choices=CONFIGS[:1] + CONFIGS[3:],
                   help="'none': train_stim.py --stim none vs a minimal timm loop (runs with the 'none' config); "
                        "an ST config: train_stim.py's loop vs this benchmark's step loop of that config (runs first)")
    p.add_argument('--script-loop-subnets', type=int, default=6, help='M of an ST --script-loop-config')
    p.add_argument('--script-loop-compile', action='store_true',
                   help="compile both sides of the comparison (StimulativeTask.compile(scope='full'))")
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default=None, help='write results here')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_compile_cache:
        try:
            import torch._inductor.config as inductor_config
            inductor_config.fx_graph_cache = False
            import torch._functorch.config as functorch_config
            functorch_config.enable_autograd_cache = False
        except (ImportError, AttributeError):
            pass
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        sys.exit('--device cuda but CUDA is not available; use --device cpu')
    if args.device.startswith('cuda'):
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.time()
    load_start = os.getloadavg() if hasattr(os, 'getloadavg') else None
    bench = Bench(args)
    result = bench.run()
    meta = dict(bench.meta_base(), loadavg_start=load_start, total_s=time.time() - t0,
                loadavg_end=os.getloadavg() if hasattr(os, 'getloadavg') else None)
    result = {'meta': meta, **result}
    print(f"# {meta['device']} | torch {meta['torch']} timm {meta['timm']} | {meta['date']}")
    print(f"# {meta['command']}")
    print(f"# {args.model} batch {args.batch_size} at {args.img_size}px, amp {args.amp_dtype}, "
          f"channels_last {args.channels_last}, {args.repeats} timed / {args.warmup} warm-up steps, "
          f"load average {meta['loadavg_start']} -> {meta['loadavg_end']}")
    print_table(result)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == '__main__':
    main()
