"""Export across timm families, and the export CLI's set-up as a transaction (issues 19 and 20).

Per family (table-driven): the smallest and a middle subnet are built as plain timm models whose logits equal the
in-place subnet's exactly (0.0: the same arithmetic on the same weights), are measured as plain models (no block
discovery: a subnet with nothing left to skip is measured like any other) and reload from their export folder with
`timm.create_model('local-dir:...')`. Set-up: every bad input is one `error:` line, exit 2, nothing written.
"""
import os
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

import timm
from timm_stim.blocks import BlockLayout, SubnetSpec, find_residual_blocks
from timm_stim.export import check_export_spec, main
from timm_stim.export_report import measure_model
from timm_stim.flops import try_forward_flops
from timm_stim.model_folder import export_timm_model
from timm_stim.sampler import split_flat_layout
from timm_stim.skip import subnet
from timm_stim.subnet_model import UnsupportedFamilyError, create_subnet_model

try:
    from test_subnet_export import DIGITS_CLASSES, FAST_ARGS, _checkpoint, _model
except ImportError:  # tests/ imported as a package
    from .test_subnet_export import DIGITS_CLASSES, FAST_ARGS, _checkpoint, _model


def _smallest_and_middle(layout: BlockLayout) -> List[Tuple[str, SubnetSpec]]:
    """Only the blocks that cannot be skipped, and those plus the first half of each stage's skippable blocks."""
    small, middle = [], []
    for stage in range(layout.num_stages):
        indices = layout.stage_indices(stage)
        skippable = [i for i in indices if layout.blocks[i].skippable]
        half = set(skippable[:(len(skippable) + 1) // 2])
        for i in indices:
            fixed = not layout.blocks[i].skippable
            small.append(fixed)
            middle.append(fixed or i in half)
    return [('smallest', SubnetSpec(tuple(small))), ('middle', SubnetSpec(tuple(middle)))]


# (model, create_model kwargs, input size, depth argument): tiny variants at small inputs
FAMILIES = [
    pytest.param('resnet50', {}, 32, 'layers', id='resnet50', marks=pytest.mark.slow),
    pytest.param('seresnext26d_32x4d', {}, 32, 'layers', id='seresnext', marks=pytest.mark.slow),
    pytest.param('vit_tiny_patch16_224', dict(img_size=32, depth=4), 32, 'depth', id='vit'),
    pytest.param('deit_tiny_distilled_patch16_224', dict(img_size=32, depth=4), 32, 'depth', id='deit-distilled'),
    pytest.param('cait_xxs24_224', dict(img_size=32, patch_size=8, depth=4), 32, 'depth', id='cait'),
    pytest.param('convnext_atto', {}, 64, 'depths', id='convnext'),
    pytest.param('hiera_tiny_224', dict(img_size=64), 64, 'stages', id='hiera', marks=pytest.mark.slow),  # one list
]


@pytest.mark.parametrize('name,kwargs,size,argument', FAMILIES)
def test_family_exports_smallest_and_middle_subnet(tmp_path, name, kwargs, size, argument):
    model = _model(name, **kwargs)
    input_size = (3, size, size)
    layout = split_flat_layout(find_residual_blocks(model, input_size=input_size))
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(1))
    for label, spec in _smallest_and_middle(layout):
        small = create_subnet_model(model, layout, spec, input_size=input_size)
        assert small.depth_argument.name == argument, label
        with torch.no_grad(), subnet(model, layout, spec):
            expected = model(x)
        with torch.no_grad():
            got = small.model(x)
        assert torch.equal(got, expected), (label, float((got - expected).abs().max()))
        figures = measure_model(small.model, input_size, latency_repeats=1)  # no block discovery on the subnet
        assert figures['flops'] > 0 and figures['flops_note'] is None, figures
        folder = export_timm_model(small.model, tmp_path / label, name, model_args=small.model_args)
        reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
        with torch.no_grad():
            assert torch.equal(reloaded(x), got), label


def test_flops_of_cait_are_counted():
    # FlopCounterMode under torch.no_grad fails on CaiT's class-attention blocks in plain torch; counted anyway
    model = _model('cait_xxs24_224', img_size=32, patch_size=8, depth=2)
    flops, note = try_forward_flops(model, (3, 32, 32))
    assert note == '' and flops > 0


def test_unexpressible_family_is_refused_in_one_line():
    model = _model('efficientnet_b0')
    layout = find_residual_blocks(model, input_size=(3, 32, 32))
    with pytest.raises(UnsupportedFamilyError, match='no constructor argument sets its block counts') as info:
        create_subnet_model(model, layout, [not b.skippable for b in layout.blocks])
    assert '\n' not in str(info.value)


def test_check_export_spec_against_the_real_model():
    model = _model('resnet18')
    check_export_spec(model, '1,1,1,1 keep:01111110 pareto:2', input_size=(3, 32, 32))
    for spec, message in (('9,9,9,9', 'out of range'), ('keep:0101', 'keep'), ('1,1,1', 'entries'),
                          ('bogus', '--export-subnets')):
        with pytest.raises(ValueError, match=message) as info:
            check_export_spec(model, spec, input_size=(3, 32, 32))
        assert str(info.value).startswith('--export-subnets') and '\n' not in str(info.value)
    with pytest.raises(ValueError, match='no constructor argument'):
        check_export_spec(_model('efficientnet_b0'), 'pareto:2', input_size=(3, 32, 32))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: '), err
    return err[0]


def test_cli_setup_is_a_transaction(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    base = [str(ckpt), '--model', 'resnet18', '--num-classes', '10', '--depths', '1,1,1,1', *FAST_ARGS]
    out = tmp_path / 'out'
    # the data is loaded during set-up: a missing data folder is bad input, and nothing is created
    assert main([*base, '--output', str(out), '--dataset', '', '--data-dir', str(tmp_path / 'no-data')]) == 2
    assert '--data-dir' in _one_error_line(capsys) and not out.exists()
    # a link planted where the export writes is refused before anything is written; its target is untouched
    out.mkdir()
    outside = tmp_path / 'outside.csv'
    outside.write_text('keep me\n')
    os.symlink(outside, out / 'subnets.csv')
    assert main([*base, '--output', str(out)]) == 2
    assert 'symbolic link' in _one_error_line(capsys)
    assert outside.read_text() == 'keep me\n' and sorted(p.name for p in out.iterdir()) == ['subnets.csv']


@pytest.mark.slow
def test_cli_exports_the_smallest_resnet50_subnet(tmp_path, capsys):
    # issue 20 point 8: every block left in resnet50 1,1,1,1 has a projection shortcut, nothing is skippable
    ckpt = _checkpoint(tmp_path, 'resnet50')
    out = tmp_path / 'out'
    argv = [str(ckpt), '--model', 'resnet50', '--num-classes', str(DIGITS_CLASSES), '--depths', '1,1,1,1',
            '--output', str(out), '--latency-repeats', '1', '--val-num-samples', '16', '-j', '0', '-b', '16',
            '--device', 'cpu']
    assert main(argv) == 0, capsys.readouterr().err
    folder = out / 'resnet50-d1-1-1-1'
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert model.layer1[0].downsample is not None and len(model.layer4) == 1


def test_an_export_that_plain_timm_cannot_load_back_is_refused_and_leaves_nothing(tmp_path):
    """Sequencer's checkpoint filter renames `head.` keys when `stages.0.blocks.0` is missing (it takes such weights
    for an original checkpoint): a subnet that empties the first stage is exact in place but does not reload, so
    the export is refused in one line and no folder is left; the same family with a block there exports."""
    from timm_stim.model_folder import ExportReloadError
    empty_first = timm.create_model('sequencer2d_s', layers=[0, 1, 1, 1], num_classes=4).eval()
    with pytest.raises(ExportReloadError, match='does not load back in plain timm') as info:
        export_timm_model(empty_first, tmp_path / 'refused', 'sequencer2d_s', model_args=dict(layers=[0, 1, 1, 1]))
    assert '\n' not in str(info.value) and 'head.fc' in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling
    kept = timm.create_model('sequencer2d_s', layers=[1, 0, 0, 1], num_classes=4).eval()
    folder = export_timm_model(kept, tmp_path / 'kept', 'sequencer2d_s', model_args=dict(layers=[1, 0, 0, 1]))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(timm.create_model(f'local-dir:{folder}', pretrained=True).eval()(x), kept(x))
