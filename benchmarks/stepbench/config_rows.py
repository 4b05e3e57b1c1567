"""One config's measured row: pre-compile, warm-up, timed steps, memory, FLOP-ideal ratio and dynamo graphs."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Tuple

import torch

from .measure import OOM, cpu_step_peak_bytes, diff_stats, dynamo_stats, static_bytes, summarize, sync
from .steps import CONFIG_HELP, build_config, make_step


def precompile_pairs(bench, step: Callable[[], Any], stim) -> Tuple[List[float], int]:
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
            times.extend(bench.timed(step, 1))
    finally:
        stim.sample = original
    return times, len(pairs)


def measure_memory(bench, step: Callable[[], Any], model, opt) -> Dict[str, Any]:
    """CPU: static tensors + the peak of --memory-steps profiled steps; CUDA: {} (the timed steps measure it)."""
    if bench.device.type == 'cuda':
        return {}  # filled from max_memory_allocated over the timed steps
    base = static_bytes(model, opt, [bench.x, bench.y])
    peaks = [cpu_step_peak_bytes(step) for _ in range(bench.args.memory_steps)]
    peaks = [p for p in peaks if p is not None]
    if not peaks:
        return {'peak_mib': None, 'step_peak_mib': None, 'static_mib': base / 2 ** 20,
                'memory_method': 'n/a (torch.profiler memory events unavailable)'}
    return {'peak_mib': (base + max(peaks)) / 2 ** 20, 'step_peak_mib': max(peaks) / 2 ** 20,
            'static_mib': base / 2 ** 20,
            'memory_method': 'cpu: static tensors + peak running sum of profiler allocations in a step'}


def worst_case_memory(bench, step, model, opt, stim) -> Dict[str, Any]:
    """Peak of one step whose M subnets are all the full network at full size (the largest draw).

    Sampled peaks depend on which subnets and sizes were drawn; this one does not, so it is the number
    to compare for memory-lean (M=6 lean vs M=1). Only for M=1 and memory-lean configs (M full-size
    subnets without memory-lean would need about M+1 times the plain activations).
    """
    draws = [(stim.layout.full_spec(), bench.args.img_size)] * stim.config.num_subnets
    original = stim.sample
    stim.sample = lambda num=None: list(draws)
    try:
        if bench.device.type == 'cuda':
            sync(bench.device)
            torch.cuda.reset_peak_memory_stats(bench.device)
            step()
            sync(bench.device)
            return {'peak_worst_mib': torch.cuda.max_memory_allocated(bench.device) / 2 ** 20}
        peak = cpu_step_peak_bytes(step)
        base = static_bytes(model, opt, [bench.x, bench.y])
        return {'peak_worst_mib': None if peak is None else (base + peak) / 2 ** 20}
    except OOM as e:
        return {'peak_worst_mib': None, 'peak_worst_error': f'OOM: {e}'[:200]}
    finally:
        stim.sample = original


def _draw_stats(bench, stim, timed_draws: list) -> Dict[str, Any]:
    """FLOP-ideal ratio and what the stimulator drew during the timed steps."""
    ideal, frac = bench.flop_table.ideal_ratio(stim.layout, timed_draws)
    n_blocks = len(stim.layout.blocks)
    flat = [d for draws in timed_draws for d in draws]
    return {'ideal_ratio': ideal, 'mean_subnet_flop_fraction': frac,
            'mean_kept_block_fraction': statistics.fmean(sum(s.keep) / n_blocks for s, _ in flat),
            'mean_subnet_size': statistics.fmean(sz for _, sz in flat),
            'distinct_sizes': len({sz for _, sz in flat}), 'distinct_subnets': len({s.keep for s, _ in flat}),
            'layout': str(stim.layout), 'stimulator': repr(stim)}


def run_config(bench, config: str, m: int, compiled: bool, scope: str = 'full') -> Dict[str, Any]:
    """The row of one (config, M, compile mode, scope); a scope the task refuses is an error row."""
    a = bench.args
    t_build = time.perf_counter()
    try:
        forward, model, opt, stim = build_config(bench, config, m, compiled, scope)
    except ValueError as e:  # scope='subnets' refuses an unbounded graph count (no --stim-sizes, large space)
        bench.cleanup()
        return {'config': config, 'subnets': m, 'compiled': compiled, 'compile_scope': scope,
                'error': f'refused: {e}'}
    build_s = time.perf_counter() - t_build
    draws_log: list = []
    step = make_step(bench, forward, opt, draws_log)
    stats0, hits0 = dynamo_stats(), bench.recompile_counter.hits
    graph_log: list = []
    precompile, pairs = (precompile_pairs(bench, step, stim) if compiled and scope == 'subnets' and stim is not None
                         else ([], 0))
    stats_pre = dynamo_stats()
    warm = bench.timed(step, a.warmup, graph_log if compiled else None)
    stats_warm = dynamo_stats()
    draws_log.clear()
    if bench.device.type == 'cuda':
        sync(bench.device)
        torch.cuda.reset_peak_memory_stats(bench.device)
        mem_start = torch.cuda.memory_allocated(bench.device)
    times = bench.timed(step, a.repeats, graph_log if compiled else None)
    walls = list(bench.wall_log)
    timed_draws = list(draws_log)
    row: Dict[str, Any] = {'config': config, 'subnets': m if stim is not None else 0, 'compiled': compiled,
                           'description': CONFIG_HELP[config], 'clock': bench.clock}
    if compiled:
        row['compile_scope'] = scope
    row.update(summarize(times))
    if walls and bench.clock != 'wall':
        row['wall_median_ms'] = 1e3 * statistics.median(walls)
    if bench.device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(bench.device)
        row.update(peak_mib=peak / 2 ** 20, step_peak_mib=(peak - mem_start) / 2 ** 20,
                   static_mib=mem_start / 2 ** 20, memory_method='cuda: torch.cuda.max_memory_allocated')
    else:
        row.update(measure_memory(bench, step, model, opt))
    if stim is not None and (m == 1 or stim.config.memory_lean) and a.worst_case_memory:
        row.update(worst_case_memory(bench, step, model, opt, stim))
    row['warmup_first_step_s'] = warm[0] if warm else None
    row['warmup_total_s'] = sum(warm)
    compiling = precompile + warm  # steps that may compile, less what they cost at steady state
    row['compile_overhead_s'] = (sum(compiling) - len(compiling) * row['median_ms'] / 1e3
                                 if compiled and warm else None)
    if precompile:
        row.update(precompile_steps=len(precompile), precompile_s=sum(precompile), precompile_pairs=pairs,
                   dynamo_precompile=diff_stats(stats_pre, stats0))
    row['build_s'] = build_s
    row.update(_draw_stats(bench, stim, timed_draws) if stim is not None else {'ideal_ratio': 1.0})
    if compiled:
        row['dynamo_warmup'] = diff_stats(stats_warm, stats_pre)
        row['dynamo_timed'] = diff_stats(dynamo_stats(), stats_warm)
        row['graphs_per_step'] = [g - stats0.get('unique_graphs', 0) for g in graph_log]
        row['recompile_limit_hits'] = bench.recompile_counter.hits - hits0
        row['graphs_total'] = dynamo_stats().get('unique_graphs', 0) - stats0.get('unique_graphs', 0)
        if stim is not None and scope == 'subnets':
            row['graph_bound'] = forward.subnet_graph_bound()
    del forward, model, opt, stim, step
    bench.cleanup()
    return row
