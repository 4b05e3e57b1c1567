"""The set-up size probe: its fast path (memoized meta forwards) accepts exactly the sizes a real forward of every
size accepts, on models with irregular size rules; the patch-embedding stride; the few-sizes warning; one probe
under torch.distributed."""
import json
import logging
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

from test_ddp import run_two_ranks
from timm_stim import create_stim_config, create_stimulator, smaller_input_kwargs
from timm_stim.sizes import probe_input_sizes, size_multiple

REPO = Path(__file__).resolve().parents[1]

# (model, create kwargs, sizes): each takes some sizes of its range and refuses others, for its own reason
IRREGULAR = [
    ('convnext_atto', {}, range(20, 45)),  # 2x2 stride-2 downsampling convs: a smallest size (32)
    ('dla34', {}, range(32, 65)),  # tree aggregation adds feature maps that must match: a period of 32
    ('vit_tiny_patch16_224', dict(img_size=32, patch_size=8, depth=2), range(9, 33)),  # dynamic_img_size: patches
    ('swin_tiny_patch4_window7_224', dict(img_size=64, window_size=2, embed_dim=24, depths=(1, 1, 2, 1)),
     range(20, 65)),  # windows and patch merging
    ('pvt_v2_b0', dict(depths=(1, 1, 1, 1)), range(16, 65)),  # overlapping patch embeddings, spatial reduction
]


def _create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3, **{**smaller_input_kwargs(name), **kwargs})


@pytest.mark.parametrize('name, kwargs, sizes', IRREGULAR, ids=[m[0] for m in IRREGULAR])
def test_fast_probe_equals_exhaustive(name, kwargs, sizes):
    model = _create(name, **kwargs)
    reference = probe_input_sizes(model, sizes, exhaustive=True)  # a real forward of every size
    assert 0 < len(reference) < len(sizes), 'the model should take some sizes of the range and refuse others'
    fast = probe_input_sizes(model, sizes)
    assert sorted(fast) == sorted(reference)
    assert model.training and not any('forward' in vars(m) for m in model.modules())  # the probe left no trace


@pytest.mark.parametrize('compare_above_s', [0.0, float('inf')], ids=['timed-against-real', 'meta-throughout'])
def test_fast_probe_in_chunks_equals_exhaustive(monkeypatch, compare_above_s):
    """The meta probe runs in chunks (the first size, a few more to take the cost per size, the rest) and may hand
    over to real forwards when those are cheaper: whichever way it goes, the answer is the exhaustive one."""
    import timm_stim.sizes as sizes_module
    monkeypatch.setattr(sizes_module, '_WARM_SIZES', 3)
    monkeypatch.setattr(sizes_module, '_COMPARE_ABOVE_S', compare_above_s)
    model = _create('dla34')
    sizes = range(32, 65)
    assert sorted(probe_input_sizes(model, sizes)) == sorted(probe_input_sizes(model, sizes, exhaustive=True))


class _SizeNote(nn.Module):
    """Notes the input height in a dict that a later module reads: state a memo of module calls cannot see."""

    def __init__(self, note: dict):
        super().__init__()
        self.note = note
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        self.note['height'] = x.shape[-2]
        return x * self.scale


class _OddRefusingHead(nn.Module):
    """A classifier head that refuses odd input heights, read from the note: its own input is the same for all."""

    def __init__(self, fc: nn.Module, note: dict):
        super().__init__()
        self.fc, self.note = fc, note

    def forward(self, x):
        if self.note['height'] % 2:
            raise RuntimeError(f'odd input height {self.note["height"]}')
        return self.fc(x)


def test_stateful_module_falls_back_to_every_size():
    """The head sees one input shape at every size, so a memo of its calls would answer every size like the first;
    the probe sees the note change and runs every size for real."""
    model = _create('resnet10t')
    note = {}
    model.conv1 = nn.Sequential(_SizeNote(note), model.conv1)
    model.fc = _OddRefusingHead(model.fc, note)
    sizes = range(24, 41)
    reference = probe_input_sizes(model, sizes, exhaustive=True)
    assert sorted(reference) == [s for s in sizes if s % 2]
    assert sorted(probe_input_sizes(model, sizes)) == sorted(reference)


def test_model_without_meta_forward_uses_real_forwards():
    """A forward that reads a value (`.item()`) cannot run on meta tensors: the probe falls back to real ones."""
    model = _create('resnet10t')

    def read_value(module, args):
        if args[0].shape[-1] % 3 == 0 and args[0].sum().item() == 0.0:
            raise RuntimeError('all-zero input of a height divisible by 3')
    model.register_forward_pre_hook(read_value)
    sizes = range(24, 41)
    reference = probe_input_sizes(model, sizes, exhaustive=True)
    assert sorted(reference) == [s for s in sizes if s % 3 == 0]
    assert sorted(probe_input_sizes(model, sizes)) == sorted(reference)


def test_size_multiple_is_the_patch_stride():
    with torch.device('meta'):
        models = {n: timm.create_model(n) for n in
                  ('pvt_v2_b0', 'vit_tiny_patch16_224', 'swin_tiny_patch4_window7_224', 'resnet18')}
    # PVTv2's patch embedding is a 7x7 kernel at stride 4 with padding 3: every pixel of every size is used
    assert {n: size_multiple(m) for n, m in models.items()} == {
        'pvt_v2_b0': 1, 'vit_tiny_patch16_224': 16, 'swin_tiny_patch4_window7_224': 4, 'resnet18': 1}


def test_pvt_v2_draws_every_size():
    model = _create('pvt_v2_b0', depths=(1, 1, 1, 1))
    stim = create_stimulator(model, create_stim_config('st++', space='bernoulli:0.5', min_scale=0.75), full_size=64)
    assert stim.size_sampler.sizes == tuple(range(48, 65))  # not only the multiples of 7 (49, 56, 63)


def test_few_sizes_warning(caplog):
    """DLA-34 at 64 px takes 63 and 64 of 48..64: the smaller-input branch is in effect off, and a warning says so."""
    model = _create('dla34')
    cfg = create_stim_config('st++', space='bernoulli:0.5', min_scale=0.75)
    with caplog.at_level(logging.WARNING, logger='timm_stim.stimulator'):
        stim = create_stimulator(model, cfg, full_size=64)
    assert stim.size_sampler.sizes == (63, 64)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith('dla34 takes only 1 of the 16 subnet input sizes 48..63 below the training size 64 '
                                  '(kept: 63; the others fail, e.g. 48 px: RuntimeError')
    assert 'in effect off: subnets train at 63, 64 px' in warnings[0]
    assert '--stim-min-scale 1' in warnings[0] and '--stim-sizes' in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='timm_stim.stimulator'):  # a size list the model takes: no warning
        stim = create_stimulator(model, create_stim_config('st++', space='bernoulli:0.5', sizes=[63, 64]),
                                 full_size=64)
    assert stim.size_sampler.sizes == (63, 64) and not caplog.records


WORKER = textwrap.dedent('''
    import json
    import sys

    import torch
    torch.set_num_threads(1)
    import timm
    import torch.distributed as dist
    from timm_stim import create_stim_config, create_stimulator

    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    try:
        model = timm.create_model('resnet10t', num_classes=3)
        heights = []
        model.register_forward_pre_hook(lambda m, args: heights.append(args[0].shape[-2]))
        if rank == 1:  # a probe on rank 1 would drop these: only rank 0's answer may count
            def refuse_small(module, args):
                if args[0].shape[-2] < 40:
                    raise RuntimeError('too small')
            model.register_forward_pre_hook(refuse_small)
        cfg = create_stim_config('st++', space='bernoulli:0.5', min_scale=0.5)
        stim = create_stimulator(model, cfg, full_size=48)
        with open(out, 'w') as f:
            json.dump({'sizes': list(stim.size_sampler.sizes), 'heights': sorted(set(heights))}, f)
    finally:
        dist.destroy_process_group()
''')


@pytest.mark.slow
def test_probe_runs_once_under_torch_distributed(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip('torch.distributed is not available')
    worker = tmp_path / 'probe_worker.py'
    worker.write_text(WORKER)
    run_two_ranks(worker, lambda r: [tmp_path / f'rank{r}.json'])
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    assert ranks[0]['sizes'] == ranks[1]['sizes'] == list(range(24, 49))  # rank 0's answer, on both ranks
    assert ranks[1]['heights'] == [48]  # rank 1 ran only block discovery at the training size: no probe
    assert set(range(24, 49)) <= set(ranks[0]['heights'])
