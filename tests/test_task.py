"""StimulativeTask / Stimulator on real timm models: one training step, BN hygiene, BN re-estimation,
task-state resume, the memory-lean path and set-up errors."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from timm_stim import (
    SmallerInputsError, StimulativeTask, create_stim_config, create_stimulator, recalibrate_bn,
    smaller_input_kwargs,
)

CE = nn.CrossEntropyLoss()


def _resnet18(seed=0):
    torch.manual_seed(seed)
    return timm.create_model('resnet18', num_classes=10)


def _vit(seed=0):
    torch.manual_seed(seed)
    name = 'vit_tiny_patch16_224'
    return timm.create_model(name, img_size=32, patch_size=8, num_classes=10, **smaller_input_kwargs(name))


def _batch(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _bn_buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def _task(model, full_size=32, **cfg):
    cfg.setdefault('seed', 0)
    preset = cfg.pop('preset', 'st++')
    if preset == 'st++':  # the authors' smaller inputs, which the preset turns off below 64 px
        cfg.setdefault('min_scale', 0.43)
    stim = create_stimulator(model, create_stim_config(preset, **cfg), full_size=full_size)
    return StimulativeTask(model, CE, stim, verbose=False)


# --------------------------------------------------------------------------------------------------------
# One step

@pytest.mark.parametrize('arch', ['resnet18', 'vit'])
def test_task_step(arch):
    model = _resnet18() if arch == 'resnet18' else _vit()
    task = _task(model, num_subnets=3, weight=0.5)
    stim = task.stimulator
    if arch == 'resnet18':
        assert stim.size_sampler.sizes == tuple(range(13, 33))
    else:
        assert 'dynamic_img_size' in smaller_input_kwargs('vit_tiny_patch16_224')
        assert stim.layout.stage_sizes == (3, 3, 3, 3)  # pseudo-stages of the flat ViT
        assert stim.size_sampler.sizes == (16, 24, 32)  # multiples of the patch size 8 in [13, 32]
    task.train()
    x, y = _batch()
    out = task(x, y)
    assert {'loss', 'output', 'main_loss', 'stim_loss', 'draws'} <= set(out)
    assert out['output'].shape == (4, 10)
    assert len(out['draws']) == 3
    for spec, size in out['draws']:
        assert size in stim.size_sampler.sizes and 13 <= size <= 32
        assert len(spec.keep) == len(stim.layout.blocks)
    torch.testing.assert_close(out['loss'].detach(), out['main_loss'] + 0.5 * out['stim_loss'])
    assert out['stim_loss'] > 0
    # main loss is the CE on the standardized logits (ST++ recipe)
    torch.testing.assert_close(out['main_loss'], CE(stim.main_logits(out['output'].detach()), y))
    out['loss'].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # the plain model is reachable and no block is left skipped
    assert task.model is model
    expected = 'BasicBlock' if arch == 'resnet18' else 'Block'
    assert [type(m).__name__ for m in stim.layout.modules(model)] == [expected] * len(stim.layout.blocks)


def test_task_disabled_is_plain_training():
    model = _resnet18()
    task = _task(model)
    task.set_stim_enabled(False)
    x, y = _batch()
    out = task(x, y)
    assert out['draws'] == [] and 'stim_loss' not in out
    ref = _resnet18()
    torch.testing.assert_close(out['loss'], CE(ref(x), y))


def test_task_checkpoint_state_keys():
    model = _resnet18()
    task = _task(model)
    state = task.get_checkpoint_state()
    assert set(state['state_dict']) == set(model.state_dict())  # plain timm keys, no 'module.' prefix
    assert 'stimulator' in state['task_state']


# --------------------------------------------------------------------------------------------------------
# BatchNorm

def test_bn_freeze_leaves_running_stats_to_full_pass():
    model = _resnet18().train()
    plain = copy.deepcopy(model)
    x, y = _batch()
    task = _task(model, num_subnets=2, bn='freeze')
    task.train()
    stem_bn_calls = []
    handle = model.bn1.register_forward_hook(lambda m, i, o: stem_bn_calls.append(m.training))
    out = task(x, y)
    handle.remove()
    # the two subnets really ran through the (training-mode) BN layers and differ from the full network
    assert stem_bn_calls == [True, True, True] and float(out['stim_loss']) > 0
    plain(x)
    after_plain, after_task = _bn_buffers(plain), _bn_buffers(model)
    assert after_plain.keys() == after_task.keys()
    for k in after_plain:
        assert torch.equal(after_plain[k], after_task[k]), k


def test_bn_update_changes_running_stats():
    model = _resnet18().train()
    plain = copy.deepcopy(model)
    x, y = _batch()
    task = _task(model, num_subnets=2, bn='update')
    task.train()
    task(x, y)
    plain(x)
    after_plain, after_task = _bn_buffers(plain), _bn_buffers(model)
    assert int(after_task['bn1.num_batches_tracked']) == 3  # full + 2 subnets ran the stem BN
    assert int(after_plain['bn1.num_batches_tracked']) == 1
    assert not torch.allclose(after_task['bn1.running_mean'], after_plain['bn1.running_mean'])


def _batches(n_batches=3, bs=4, size=32, seed=0):
    return [_batch(bs, size, seed + i) for i in range(n_batches)]


def test_recalibrate_bn_subnet_changes_only_bn_that_ran():
    model = _resnet18().train()
    task = _task(model)  # reuse its layout
    layout = task.stimulator.layout
    # give BNs non-default stats so "unchanged" is meaningful
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.fill_(0.3)
            m.running_var.fill_(2.0)
    before = _bn_buffers(model)
    seen = recalibrate_bn(model, _batches(), num_images=1000, layout=layout, spec=(1, 1, 1, 1))
    assert seen == 12
    assert model.training
    skipped_paths = [p for p, k in zip(layout.paths, layout.spec_from_depths((1, 1, 1, 1)).keep) if not k]
    assert skipped_paths == ['layer1.1', 'layer2.1', 'layer3.1', 'layer4.1']
    after = _bn_buffers(model)
    for name in before:
        in_skipped = any(name.startswith(p + '.') for p in skipped_paths)
        if in_skipped:
            assert torch.equal(before[name], after[name]), name
        elif name.endswith('running_mean'):
            assert not torch.equal(before[name], after[name]), name
        elif name.endswith('num_batches_tracked'):
            assert int(after[name]) == 3, name
    # momentum restored and classes restored
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, _BatchNorm))
    assert [type(m).__name__ for m in layout.modules(model)] == ['BasicBlock'] * 8


def test_recalibrate_bn_full_net_is_average_of_batch_stats():
    model = _resnet18().eval()
    bn = model.layer2[0].bn1
    means, variances = [], []

    def hook(module, args):
        x = args[0]
        means.append(x.mean((0, 2, 3)))
        variances.append(x.var((0, 2, 3), unbiased=True))

    h = bn.register_forward_pre_hook(hook)
    try:
        seen = recalibrate_bn(model, _batches(4, bs=3), num_images=9)  # stops after the 3rd batch
    finally:
        h.remove()
    assert seen == 9 and len(means) == 3
    assert not model.training  # mode restored
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, torch.stack(variances).mean(0), rtol=1e-4, atol=1e-6)
    assert int(bn.num_batches_tracked) == 3
    assert bn.momentum == 0.1


def test_recalibrate_bn_accepts_tensors_and_pairs():
    a, b = _resnet18(), _resnet18()
    batches = _batches(2)
    recalibrate_bn(a, batches)
    recalibrate_bn(b, [x for x, _ in batches])
    for (k, va), vb in zip(_bn_buffers(a).items(), _bn_buffers(b).values()):
        assert torch.equal(va, vb), k


def test_recalibrate_bn_restores_on_exception():
    model = _resnet18().train()
    layout = _task(model).stimulator.layout
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.fill_(0.3)
    before = _bn_buffers(model)
    good = _batches(1)

    def failing():
        yield good[0]
        raise RuntimeError('data loader died')

    with pytest.raises(RuntimeError, match='data loader died'):
        recalibrate_bn(model, failing(), layout=layout, spec=(1, 1, 1, 1))
    after = _bn_buffers(model)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, _BatchNorm))
    assert [type(m).__name__ for m in layout.modules(model)] == ['BasicBlock'] * 8
    assert model.training
    # and with no data at all, nothing changes either
    assert recalibrate_bn(model, []) == 0
    for k in before:
        assert torch.equal(before[k], _bn_buffers(model)[k]), k


# --------------------------------------------------------------------------------------------------------
# Resume, memory-lean

def test_task_state_round_trip():
    task = _task(_resnet18(), num_subnets=2, space='st')
    task.train()
    x, y = _batch()
    with torch.no_grad():
        task(x, y)
    state = copy.deepcopy(task.get_task_state())
    with torch.no_grad():
        seq_a = [task(x, y)['draws'] for _ in range(3)]
    task.load_task_state(state)
    with torch.no_grad():
        assert [task(x, y)['draws'] for _ in range(3)] == seq_a
    # a new run (different seed) resumed from the checkpoint's task state samples the same sequence
    other = _task(_resnet18(), num_subnets=2, space='st', seed=123)
    with torch.no_grad():
        assert [other(x, y)['draws'] for _ in range(3)] != seq_a
    other.load_task_state(state)
    with torch.no_grad():
        assert [other(x, y)['draws'] for _ in range(3)] == seq_a
    assert task.get_task_state(ema=True) == {}


def test_task_state_wrong_space():
    state = _task(_resnet18(), space='st').get_task_state()
    with pytest.raises(ValueError, match='same --stim-space'):
        _task(_resnet18(), space='st++').load_task_state(state)


@pytest.mark.parametrize('multiplier', [1.0, 4.0])
def test_memory_lean_same_gradients(multiplier):
    x, y = _batch(4)
    results = []
    for lean in (False, True):
        model = _resnet18()
        task = _task(model, num_subnets=3, weight=0.5, space='st', memory_lean=lean, seed=11)
        task.train()
        task.set_grad_multiplier(multiplier)
        out = task(x, y)
        (out['loss'] * multiplier).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}, _bn_buffers(model)))
    (o0, g0, b0), (o1, g1, b1) = results
    assert o0['draws'] == o1['draws']
    assert sum(s.num_skipped for s, _ in o0['draws']) > 0
    assert not o1['loss'].grad_fn is None  # main loss still back-propagates
    torch.testing.assert_close(o1['loss'], o0['loss'].detach(), rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)
    for k in b0:
        assert torch.equal(b0[k], b1[k]), k


def test_memory_lean_uses_the_loss_scaler_handed_over_once():
    """AMP: the loop scales its loss with a GradScaler; memory-lean subnet passes (backward inside forward) must
    scale theirs by the same factor, read on the device from the scaler given once with set_loss_scaler (never
    as a Python number per step: that is a host-device sync on GPU). Gradients match the default path's."""
    x, y = _batch(4)
    grads = []
    for lean in (False, True):
        model = _resnet18()
        task = _task(model, num_subnets=2, weight=0.5, space='st', memory_lean=lean, seed=3)
        scaler = torch.amp.GradScaler('cpu', init_scale=8.0)
        task.train()
        task.set_loss_scaler(scaler)
        task.set_grad_multiplier(0.5)  # two accumulation steps
        out = task(x, y)
        scaler.scale(out['loss'] * 0.5).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert any(g.abs().sum() > 0 for g in grads[1].values())
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize('bn,lean', [('update', False), ('freeze', False), ('freeze', True)])
def test_grad_checkpointing_step_matches(bn, lean):
    """A step with model.set_grad_checkpointing(True) must give the gradients of the step without it.

    Checkpointed segments are recomputed during backward, after `subnet` and `frozen_bn_stats` have exited:
    with bn='freeze' the recomputed BatchNorm now tracks running stats, its saved tensors differ and torch
    raises CheckpointError (bug, see report; the memory-lean path also calls autograd.grad outside the
    contexts). bn='update' with the prefix rule on ResNet's per-block segments happens to work.
    """
    x, y = _batch(4)
    results = []
    for ckpt in (False, True):
        model = _resnet18().train()
        model.set_grad_checkpointing(ckpt)
        task = _task(model, num_subnets=2, space='st', bn=bn, memory_lean=lean, seed=2)
        task.train()
        out = task(x, y)
        out['loss'].backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (o0, g0), (o1, g1) = results
    assert o0['draws'] == o1['draws'] and sum(s.num_skipped for s, _ in o0['draws']) > 0
    torch.testing.assert_close(o1['loss'], o0['loss'])
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)


# --------------------------------------------------------------------------------------------------------
# Set-up errors

def _beit():
    torch.manual_seed(0)
    name = 'beit_base_patch16_224'
    return timm.create_model(name, img_size=64, depth=2, embed_dim=64, num_heads=2, num_classes=10,
                             **smaller_input_kwargs(name))


def test_smaller_inputs_error_at_setup():
    model = _beit()
    with pytest.raises(SmallerInputsError, match=r'beit_base_patch16_224 cannot take any of the subnet input sizes '
                                                 r'32\.\.48 below the training size 64 .*--stim-min-scale'):
        create_stimulator(model, create_stim_config('st++', space='st'))
    assert issubclass(SmallerInputsError, ValueError)
    # smaller inputs turned off: fine
    stim = create_stimulator(model, create_stim_config('st++', space='st', min_scale=1.0))
    assert stim.size_sampler.sizes == (64,)


def test_smaller_inputs_fallback():
    model = _beit()
    stim = create_stimulator(model, create_stim_config('st++', size_fallback=True, space='bernoulli:0.5',
                                                        num_subnets=3))
    assert stim.size_sampler.sizes == (64,) and not stim.size_sampler.enabled
    task = StimulativeTask(model, CE, stim, verbose=False)
    x, y = _batch(2, 64)
    out = task(x, y)
    assert [s for _, s in out['draws']] == [64, 64, 64]
    out['loss'].backward()


@pytest.mark.parametrize('scale', [0.0, -0.5, 1.5])
def test_min_scale_out_of_range(scale):
    with pytest.raises(ValueError, match=r'min scale must be in \(0, 1\]'):
        create_stim_config('st++', min_scale=scale)


def test_invalid_k_list_at_setup():
    with pytest.raises(ValueError, match=r'K_2 must be in 1\.\.2 \(got 5\)'):
        create_stimulator(_resnet18(), create_stim_config('st++', space='1,5,1,1'), full_size=32)
    with pytest.raises(ValueError, match='has 3 entries'):
        create_stimulator(_resnet18(), create_stim_config('st++', space='1,2,1'), full_size=32)


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_subnets=0), 'subnets must be >= 1'),
    (dict(bn='eval'), "bn must be 'freeze' or 'update'"),
    (dict(weight=-1.0), 'weight must be >= 0'),
])
def test_invalid_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_stim_config('st++', **kwargs)
    with pytest.raises(ValueError, match='unknown stim preset'):
        create_stim_config('st+++')


# --------------------------------------------------------------------------------------------------------
# Subnet input sizes: every drawable size is known to work before training

def _forward_ok(model, size):
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
        return True
    except RuntimeError:
        return False


def test_only_working_sizes_are_drawn_dla34(caplog):
    """dla34 at 64 px works at some sizes of 32..64 only (its tree aggregation adds maps that stop matching)."""
    torch.manual_seed(0)
    model = timm.create_model('dla34', num_classes=10)
    with caplog.at_level('INFO', logger='timm_stim.stimulator'):
        stim = create_stimulator(model, create_stim_config('st++', min_scale=0.5), full_size=64)
    kept = stim.size_sampler.sizes
    works = {s: _forward_ok(model, s) for s in range(32, 65)}
    assert kept == tuple(s for s, ok in works.items() if ok)
    assert 1 < len(kept) < 33 and kept[-1] == 64  # some but not all sizes: the probe decides, not the range
    assert {stim.size_sampler.sample() for _ in range(400)} == set(kept)
    assert f'{len(kept)} of 33 kept (32..64 px, dropped: ' in caplog.text


def test_no_smaller_size_works_is_refused_with_the_range_flags():
    """convnext_atto at 32 px: its stem and downsampling layers need at least 32 px, so no subnet size below works."""
    model = timm.create_model('convnext_atto', num_classes=10)
    with pytest.raises(SmallerInputsError, match=r'convnext_atto cannot take any of the subnet input sizes 13\.\.31 '
                                                 r'below the training size 32 \(RuntimeError: .*--stim-min-scale.*'
                                                 r'--stim-sizes'):
        create_stimulator(model, create_stim_config('st++', min_scale=0.43), full_size=32)
    # at 64 px part of the range works: those sizes are kept, the rest dropped
    stim = create_stimulator(model, create_stim_config('st++'), full_size=64)
    assert 1 < len(stim.size_sampler.sizes) < 64 - 27 + 1
    assert all(_forward_ok(model, s) for s in stim.size_sampler.sizes)
