"""Dynamo graph counts of compiled ST++ (scope 'subnets') over sampled steps, against the task's graph bound."""
from __future__ import annotations

from typing import Any, Dict

from .measure import diff_stats, dynamo_stats
from .steps import build_config, make_step


def run_graph_check(bench) -> Dict[str, Any]:
    """Compiled ST++ M=1, scope 'subnets', --graph-steps sampled steps: unique dynamo graphs after each step."""
    a = bench.args
    if not a.stim_sizes:
        return {'steps': 0, 'skipped': "scope 'subnets' needs --stim-sizes buckets"}
    forward, model, opt, stim = build_config(bench, 'st++', 1, True, 'subnets')
    draws_log: list = []
    step = make_step(bench, forward, opt, draws_log)
    stats0, hits0 = dynamo_stats(), bench.recompile_counter.hits
    graph_log: list = []
    times = bench.timed(step, a.graph_steps, graph_log)
    g = [x - stats0.get('unique_graphs', 0) for x in graph_log]
    out = {
        'steps': a.graph_steps, 'subnets': 1, 'graphs_per_step': g, 'final_graphs': g[-1] if g else 0,
        'graph_bound': forward.subnet_graph_bound(),
        'pairs_met': len({(tuple(s.keep), sz) for d in draws_log for s, sz in d}),
        'last_new_graph_step': max((i for i in range(1, len(g)) if g[i] > g[i - 1]), default=0),
        'distinct_sizes': len({sz for d in draws_log for _, sz in d}),
        'sizes_seen': sorted({sz for d in draws_log for _, sz in d}),
        'dynamo': diff_stats(dynamo_stats(), stats0),
        'recompile_limit_hits': bench.recompile_counter.hits - hits0,
        'step_ms': [1e3 * t for t in times],
        'stim_sizes': list(a.stim_sizes) if a.stim_sizes else None,
    }
    del forward, model, opt, stim, step
    bench.cleanup()
    return out
