"""Stimulator with several full (batch) sizes, as timm's scheduled-resolution loader delivers them, and with
NaFlex patch-dict batches: per-height subnet size ranges, one set-up probe, resume, and the errors."""
import copy
import logging

import pytest
import timm
import torch
import torch.nn as nn

import timm_stim.stimulator as stimulator_module
from timm_stim import (SizeSampler, SmallerInputsError, StimulativeTask, create_stim_config, create_stimulator,
                       stimulative_forward)

CE = nn.CrossEntropyLoss()
RANGES = {32: range(16, 33), 48: range(24, 49)}  # [floor(0.5 * S), S]


def _resnet(seed=0):
    torch.manual_seed(seed)
    return timm.create_model('resnet10t', num_classes=10)


def _stim(model, full_sizes=(32, 48), full_size=48, **cfg):
    cfg.setdefault('min_scale', 0.5)
    cfg.setdefault('seed', 3)
    cfg.setdefault('space', 'bernoulli:0.5')  # resnet10t has one block per stage: ST/ST++ rules drop none
    return create_stimulator(model, create_stim_config('st++', **cfg), full_size=full_size, full_sizes=full_sizes)


def _batch(size, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _seqs(stim, n=40):
    """The next n draws of the subnet sampler and of every size sampler."""
    return {'subnets': [tuple(stim.sampler.sample().keep) for _ in range(n)],
            **{s: [sampler.sample() for _ in range(n)] for s, sampler in stim.size_samplers.items()}}


def test_per_height_ranges():
    stim = _stim(_resnet())
    assert stim.full_sizes == (32, 48) and stim.size_sampler is stim.size_samplers[48]
    for size, expected in RANGES.items():
        assert stim.size_samplers[size].sizes == tuple(expected)
        drawn = {sz for _ in range(100) for _, sz in stim.sample(size)}
        assert drawn <= set(expected) and len(drawn) > 5
    assert {sz for _ in range(50) for _, sz in stim.sample()} <= set(RANGES[48])  # None: the primary S
    assert stim.subnet_sizes == tuple(range(16, 49))


def test_primary_draws_unchanged():
    """Adding full sizes leaves the primary's draws (and the subnet draws) exactly those of a single-size run."""
    single, multi = _stim(_resnet(), full_sizes=None), _stim(_resnet())
    assert single.full_sizes == (48,) and set(single.state_dict()) == {'sampler', 'size_sampler'}
    assert [single.sample() for _ in range(30)] == [multi.sample(48) for _ in range(30)]
    reference = SizeSampler(48, 0.5, seed=3 + 1)  # config.seed + 1: the seed single-size runs always drew with
    assert [reference.sample() for _ in range(40)] == _seqs(_stim(_resnet()))[48]
    # another full size has its own generator (seeded apart from the primary's), the same in every run
    seeds = {s: sampler.generator.initial_seed() for s, sampler in multi.size_samplers.items()}
    assert seeds[48] == single.size_sampler.generator.initial_seed() and seeds[32] != seeds[48]
    assert _seqs(_stim(_resnet()))[32] == _seqs(_stim(_resnet()))[32]


def test_subnet_loss_resizes_per_height():
    model = _resnet()
    stim = _stim(model, num_subnets=3)
    heights = []
    hook = model.register_forward_pre_hook(lambda m, args: heights.append(args[0].shape[-2]))
    try:
        for size in (32, 48, 32):
            x = _batch(size)
            heights.clear()
            with torch.no_grad():
                teacher = model(x)
            heights.clear()
            loss, draws = stim.subnet_loss(model, x, teacher)
            assert torch.isfinite(loss)
            assert heights == [sz for _, sz in draws]
            assert all(sz in RANGES[size] for sz in heights)
    finally:
        hook.remove()
    assert stim.depth_summary(draws)['size'] == sum(heights) / 3


def test_unknown_height_raises():
    model = _resnet()
    stim = _stim(model)
    x = _batch(40)
    with pytest.raises(ValueError, match=r'40 px high .*full sizes \[32, 48\].*--train-img-sizes'):
        stim.subnet_loss(model, x, torch.zeros(2, 10))
    with pytest.raises(ValueError, match='40 px high'):
        stim.sample(40)


def test_state_round_trip():
    stim = _stim(_resnet())
    for _ in range(7):
        stim.sample(32), stim.sample(48)
    state = copy.deepcopy(stim.state_dict())
    assert set(state['size_samplers']) == {'32', '48'}
    expected = _seqs(stim)
    fresh = _stim(_resnet())
    fresh.load_state_dict(state)
    assert _seqs(fresh) == expected
    assert _seqs(_stim(_resnet())) != expected  # the load did restore something


def test_old_state_loads_primary():
    single = _stim(_resnet(), full_sizes=None)
    for _ in range(5):
        single.sample()
    state = copy.deepcopy(single.state_dict())
    assert 'size_samplers' not in state
    expected = [single.size_sampler.sample() for _ in range(40)]
    multi = _stim(_resnet())
    multi.load_state_dict(state)
    assert [multi.size_sampler.sample() for _ in range(40)] == expected


def test_full_sizes_mismatch_on_load():
    state = _stim(_resnet()).state_dict()
    with pytest.raises(ValueError, match=r'full sizes \[32, 48\] but this run has \[32, 40, 48\].*--train-img-sizes'):
        _stim(_resnet(), full_sizes=(32, 40, 48)).load_state_dict(state)
    with pytest.raises(ValueError, match=r'\[32, 48\] but this run has \[48\]'):
        _stim(_resnet(), full_sizes=None).load_state_dict(state)


def test_fixed_sizes_need_one_full_size():
    with pytest.raises(ValueError, match='drop --stim-sizes or --train-img-sizes'):
        _stim(_resnet(), sizes=[24, 32])
    assert _stim(_resnet(), full_sizes=None, sizes=[24, 32]).size_sampler.sizes == (24, 32)


def test_one_probe_and_per_size_fallback(monkeypatch, caplog):
    """One probe over the union; a full size with nothing working below it falls back (or raises) on its own."""
    model = _resnet()

    def refuse_small(module, args):
        if args[0].shape[-2] < 32:
            raise RuntimeError(f'input {args[0].shape[-2]} px too small')
    model.register_forward_pre_hook(refuse_small)
    calls = []
    probe = stimulator_module.probe_input_sizes_once
    monkeypatch.setattr(stimulator_module, 'probe_input_sizes_once',
                        lambda *a, **k: calls.append(a[1]) or probe(*a, **k))
    with pytest.raises(SmallerInputsError, match=r'resnet10t cannot take any of the subnet input sizes 16\.\.31 '
                                                 r'below the training size 32 .*--stim-size-fallback'):
        _stim(model)
    assert calls == [list(range(16, 49))]
    with caplog.at_level(logging.WARNING, logger='timm_stim.stimulator'):
        stim = _stim(model, size_fallback=True)
    assert 'Falling back to full-size subnet inputs' in caplog.text
    assert stim.size_samplers[32].sizes == (32,) and stim.size_samplers[48].sizes == tuple(range(32, 49))
    assert stim.subnet_sizes == tuple(range(32, 49))


def test_graph_bound_counts_union():
    model = _resnet()
    multi = StimulativeTask(model, CE, _stim(model), verbose=False)
    single = StimulativeTask(model, CE, _stim(model, full_sizes=None), verbose=False)
    num_subnets = 2 ** multi.stimulator.layout.num_skippable  # bernoulli: any subset of the skippable blocks
    # eval + training at each full size, and every subnet at every size of the union 16..48
    assert multi.subnet_graph_bound() == 1 + 2 + num_subnets * len(range(16, 49))
    assert single.subnet_graph_bound() == 2 + num_subnets * len(RANGES[48])


def _naflex():
    torch.manual_seed(0)
    return timm.create_model('naflexvit_base_patch16_gap', embed_dim=64, depth=2, num_heads=2, num_classes=10)


def _patch_dict(n=2, patches=16, patch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(4), indexing='ij')
    coord = torch.stack([ys.flatten(), xs.flatten()], -1)[:patches]
    valid = torch.ones(n, patches, dtype=torch.bool)
    valid[1, -3:] = False  # a padded sample
    return {'patches': torch.randn(n, patches, patch * patch * 3, generator=g),
            'patch_coord': coord.expand(n, -1, -1).clone(), 'patch_valid': valid}


def test_naflex_dict_passes_unchanged():
    model = _naflex()
    cfg = create_stim_config('st++', space='st', min_scale=1.0, num_subnets=2)
    stim = create_stimulator(model, cfg, full_size=64)
    batch = _patch_dict()
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        out = stimulative_forward(model, batch, torch.tensor([1, 2]), CE, stim)
    finally:
        hook.remove()
    assert len(seen) == 3 and all(x is batch for x in seen)  # full pass + 2 subnets, each on the dict itself
    assert [sz for _, sz in out['draws']] == [64, 64]
    assert torch.isfinite(out['loss']) and torch.isfinite(out['stim_loss'])
    out['loss'].backward()
    summary = stim.depth_summary(out['draws'])
    assert summary['size'] == 64 and 0 < summary['depth_frac'] <= 1


def test_naflex_dict_with_smaller_inputs_raises():
    model = _naflex()
    cfg = create_stim_config('st++', space='st', min_scale=0.5, num_subnets=2)
    stim = create_stimulator(model, cfg, full_size=64)
    assert stim.size_sampler.enabled
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    with pytest.raises(ValueError, match=r'smaller subnet inputs need image tensors; NaFlex batches are patch dicts: '
                                         r'use --stim-min-scale 1'):
        stimulative_forward(model, _patch_dict(), torch.tensor([1, 2]), CE, stim)
    with pytest.raises(ValueError, match='--stim-min-scale 1'):
        stim.subnet_loss(model, _patch_dict(), torch.zeros(2, 10))
    assert calls == []  # refused before any compute
