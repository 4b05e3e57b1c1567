"""StimulativeTask.compile(): both scopes (full pass only; full pass and subnets) give eager results, bounded graphs.

Backends: 'aot_eager' (dynamo + AOT autograd, eager kernels) for the numerical comparison: it exercises
the same graph capture, guards, recompiles and forward/backward graph split as inductor, without
inductor's C++ code generation, which takes minutes on a 2-core CPU. 'eager' (dynamo capture only, about
3x cheaper) where only graph capture and guards matter: which graphs exist and how many is decided by
dynamo before any backend runs. About 30 s of CPU time in all.
"""
import copy
import logging

import pytest
import torch
import torch.nn as nn

pytest.importorskip('torch._dynamo')
import torch._dynamo  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from timm.models.resnet import BasicBlock, ResNet  # noqa: E402

from timm_stim import StimulativeTask, create_stim_config, create_stimulator, stimulative_forward  # noqa: E402

BACKEND = 'aot_eager'   # numerical comparison
CAPTURE_BACKEND = 'eager'  # graph counting, deepcopy
FULL = 64  # training size; ST++ sizes are 27..64, the last stage then sees 1x1 to 2x2 maps


def small_resnet(seed: int = 0) -> nn.Module:
    """A narrow ResNet (BasicBlock, 2/3/3/2): 10 blocks in 4 widths with BatchNorm, 6 skippable.

    The cases that matter for regional compile: several blocks of one class with different parameter
    shapes (dynamo guards parameter shapes statically), BatchNorm whose running-stat tracking is switched
    off during subnet passes, and downsampling blocks. zero_init_last=False so subnets differ from the
    full net at init (otherwise the KL loss and its gradients are zero).
    """
    torch.manual_seed(seed)
    return ResNet(BasicBlock, layers=(2, 3, 3, 2), channels=(8, 16, 32, 64), stem_width=8, num_classes=10,
                  zero_init_last=False)


class _LimitHits(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        msg = record.getMessage()
        if 'recompile_limit' in msg or 'cache_size_limit' in msg:
            self.messages.append(msg.splitlines()[0])


@pytest.fixture
def dynamo_clean():
    torch._dynamo.reset()
    counters.clear()
    handler = _LimitHits()
    logger = logging.getLogger('torch._dynamo')
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        torch._dynamo.reset()


def _graphs() -> int:
    return int(counters['stats'].get('unique_graphs', 0))


def _make(memory_lean=False, num_subnets=2, seed=0):
    model = small_resnet(seed)
    cfg = create_stim_config('st++', num_subnets=num_subnets, memory_lean=memory_lean, seed=seed)
    stim = create_stimulator(model, cfg, full_size=FULL)
    return model, stim


def _batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, FULL, FULL, generator=g), torch.randint(0, 10, (n,), generator=g)


def _train(task, model, steps):
    """`steps` SGD steps of `task`; returns the dynamo graph count after each step and every (spec, size) drawn."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    history, draws = [], []
    for step in range(steps):
        x, y = _batch(step)
        out = task(x, y)
        out['loss'].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        draws.extend(out['draws'])
        history.append(_graphs())
    return history, draws


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compiled_runner(task):
    """(model for stimulative_forward, full_model) as the task's module runs them after compile()."""
    module = task._stim_module()
    return (module.compiled, None) if module.compile_subnets else (module.module, module.compiled)


@pytest.mark.slow
@pytest.mark.parametrize('scope', ['full', 'subnets'])
def test_compiled_matches_eager(dynamo_clean, scope):
    """Same draws (subnets and sizes), same weights: compiled and eager losses, gradients and BN stats agree.

    Step 0 uses the default path (one backward of the summed loss), steps 1-2 the memory-lean path
    (per-subnet backward inside forward; with scope='subnets' through the compiled subnet graphs' AOT backward).
    """
    eager = small_resnet()
    stim = create_stimulator(eager, create_stim_config('st++', num_subnets=2, sizes=[32, 48, 64]), full_size=FULL)
    compiled = copy.deepcopy(eager)
    crit = nn.CrossEntropyLoss()
    task = StimulativeTask(compiled, crit, stim, verbose=False)
    task.compile(backend=BACKEND, scope=scope)
    runner, full_model = _compiled_runner(task)
    assert (full_model is not None) == (scope == 'full')
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    opt_c = torch.optim.SGD(compiled.parameters(), lr=0.05, momentum=0.9)
    sizes_seen, specs_seen = set(), set()
    for step in range(3):
        stim.config.memory_lean = step >= 1
        x, y = _batch(step)
        draws = stim.sample()
        sizes_seen.update(sz for _, sz in draws)
        specs_seen.update(s.keep for s, _ in draws)
        out_e = stimulative_forward(eager, x, y, crit, stim, draws=draws)
        out_e['loss'].backward()
        out_c = stimulative_forward(runner, x, y, crit, stim, draws=draws, full_model=full_model)
        out_c['loss'].backward()
        torch.testing.assert_close(out_c['loss'], out_e['loss'], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_c['stim_loss'], out_e['stim_loss'], rtol=1e-5, atol=1e-5)
        ge, gc = _grads(eager), _grads(compiled)
        assert ge.keys() == gc.keys()
        for name in ge:
            torch.testing.assert_close(gc[name], ge[name], rtol=1e-4, atol=1e-5, msg=lambda m: f'{name}: {m}')
        opt_e.step(), opt_c.step()
        opt_e.zero_grad(set_to_none=True), opt_c.zero_grad(set_to_none=True)
    for (n, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):  # BN stats too
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f'{n}: {m}')
    assert len(sizes_seen) >= 2 and len(specs_seen) > 1
    assert _graphs() > 0, 'nothing was compiled'
    assert not dynamo_clean.messages, dynamo_clean.messages


@pytest.mark.slow
def test_full_scope_compiles_one_graph(dynamo_clean):
    """scope='full' (train_stim.py's default): 12 ST++ steps with random depths and sizes compile exactly one
    graph (the full network at the full size); subnets run eagerly, nothing recompiles; the parameters
    and state_dict keys of the task's module are not duplicated by the compiled wrapper."""
    model, stim = _make(num_subnets=2)
    task = StimulativeTask(model, nn.CrossEntropyLoss(), stim, verbose=False)
    n_params, keys = len(list(task.trainable_module.parameters())), list(task.trainable_module.state_dict())
    eval_model = task.compile(backend=CAPTURE_BACKEND, scope='full')
    assert len(list(task.trainable_module.parameters())) == n_params
    assert list(task.trainable_module.state_dict()) == keys
    assert task.model is model and eval_model is task.get_eval_model()
    history, draws = _train(task, model, 12)
    sizes, specs = {sz for _, sz in draws}, {s.keep for s, _ in draws}
    assert len(sizes) >= 8 and len(specs) >= 2, (sizes, specs)
    assert history == [1] * 12
    assert counters['frames']['total'] == counters['frames']['ok'], dict(counters['frames'])
    assert not dynamo_clean.messages, dynamo_clean.messages


@pytest.mark.slow
def test_subnets_scope_one_graph_per_subnet_and_size(dynamo_clean):
    """scope='subnets' with bucketed sizes: one graph per distinct (subnet, size) met plus the full pass, never
    more than the bound compile() announced, and no fall-back to eager (no recompile-limit hit)."""
    model = small_resnet()
    stim = create_stimulator(model, create_stim_config('st++', num_subnets=2, sizes=[32, 48, 64]), full_size=FULL)
    task = StimulativeTask(model, nn.CrossEntropyLoss(), stim, verbose=False)
    task.compile(backend=CAPTURE_BACKEND, scope='subnets')
    history, draws = _train(task, model, 16)
    pairs = {(s.keep, sz) for s, sz in draws}
    assert len(pairs) >= 4, pairs
    # the full pass is a graph of its own even beside a full-depth, full-size subnet: BN stats are frozen there
    assert history[-1] == 1 + len(pairs), (history, pairs)
    assert history[-1] <= task.subnet_graph_bound()
    assert counters['frames']['total'] == counters['frames']['ok'], dict(counters['frames'])
    assert not dynamo_clean.messages, dynamo_clean.messages


def test_subnets_scope_refuses_unbounded_graphs():
    """Random sizes (27..64 px, 38 sizes) x the ST++ subnets exceed the graph bound: refused before any step."""
    model, stim = _make()
    task = StimulativeTask(model, nn.CrossEntropyLoss(), stim, verbose=False)
    with pytest.raises(ValueError, match='--stim-sizes'):
        task.compile(backend=CAPTURE_BACKEND, scope='subnets')


def test_compile_rejects_unknown_scope():
    model, stim = _make()
    with pytest.raises(ValueError, match="'full' or 'subnets'"):
        StimulativeTask(model, nn.CrossEntropyLoss(), stim, verbose=False).compile(scope='blocks')


def test_recalibrate_bn_of_a_compiled_model_compiles_nothing(dynamo_clean):
    """--stim-bn-recal before evaluating a --torchcompile model: the re-estimation runs the plain module it wraps
    (cumulative BN averaging reads a buffer as a number, which would break and recompile the graph per BN layer),
    and the compiled model then sees the new statistics."""
    from timm_stim import recalibrate_bn
    model = small_resnet()
    compiled = torch.compile(model, backend=CAPTURE_BACKEND)
    x, _ = _batch(0)
    with torch.no_grad():
        compiled.eval()(x)
    graphs = _graphs()
    before = model.bn1.running_mean.clone()
    assert recalibrate_bn(compiled, [_batch(i)[0] for i in range(3)], num_images=12) == 12
    assert _graphs() == graphs
    assert not torch.equal(model.bn1.running_mean, before)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), model.eval()(x))
