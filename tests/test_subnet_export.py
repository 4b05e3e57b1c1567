"""Tests for exporting subnetworks as smaller plain timm models (timm_stim.subnet_model, timm_stim.export).

Exactness: the exported model's logits equal the in-place subnet's (`with subnet(model, layout, spec)`), same BN
statistics, per family. Roundtrip: the written folder loads with `timm.create_model('local-dir:...')` or, once
pushed to the local test Hub (tests/hub_server.py), with `hf-hub:...`, in a fresh Python that never imports timm_stim.
"""
import csv
import json
from pathlib import Path

import pytest
import torch

import timm
from timm_stim.blocks import find_residual_blocks
from timm_stim.skip import subnet
from timm_stim.export import main, parse_subnets
from timm_stim.export_report import pareto_front, select_pareto
from timm_stim.sampler import split_flat_layout
from timm_stim.subnet_model import SubnetExportError, UnsupportedFamilyError, create_subnet_model

try:
    from test_hub import TOKEN, FakeHub, _env, _error_lines, _load_in_fresh_process, _run
except ImportError:  # tests/ imported as a package
    from .test_hub import TOKEN, FakeHub, _env, _error_lines, _load_in_fresh_process, _run

DIGITS_CLASSES = 10  # the CLI evaluates on the built-in digits by default
FAST_ARGS = ['--latency-repeats', '2', '--val-num-samples', '48', '-j', '0', '-b', '48', '--device', 'cpu']


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN running statistics and scales: timm initialises the last norm of a ResNet block to zero and
    ConvNeXt's layer scale to 1e-6, which would make every block (nearly) the identity and every test pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith(('weight', 'gamma')):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.75)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def _model(name: str, num_classes: int = 5, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return _randomize(timm.create_model(name, num_classes=num_classes, **kwargs)).eval()


@torch.no_grad()
def _subnet_logits(model, layout, spec, x):
    with subnet(model, layout, spec):
        return model(x)


FAMILIES = [
    pytest.param('resnet18', {}, 32, (1, 2, 1, 1), 'layers', id='resnet18'),
    pytest.param('resnet50', {}, 64, (2, 1, 4, 2), 'layers', id='resnet50', marks=pytest.mark.slow),
    pytest.param('vit_tiny_patch16_224', dict(img_size=32), 32, (2, 1, 3, 1), 'depth', id='vit'),
    pytest.param('convnext_atto', {}, 64, (1, 2, 3, 1), 'depths', id='convnext'),
    pytest.param('swin_tiny_patch4_window7_224', dict(img_size=64, window_size=4), 64, (1, 2, 4, 1), 'depths',
                 id='swin', marks=pytest.mark.slow),
]


@pytest.mark.parametrize('name,kwargs,size,depths,argument', FAMILIES)
def test_exported_subnet_has_the_subnet_logits(name, kwargs, size, depths, argument):
    model = _model(name, **kwargs)
    layout = split_flat_layout(find_residual_blocks(model, input_size=(3, size, size)))
    parent_state = {k: v.clone() for k, v in model.state_dict().items()}
    small = create_subnet_model(model, layout, depths, input_size=(3, size, size))

    assert small.depth_argument.name == argument
    assert small.depths == depths
    assert small.model_args[argument] == small.depth_argument.value
    # built by timm's own constructor with fewer blocks, nothing else
    assert isinstance(small.model, type(model))
    assert small.model.pretrained_cfg['architecture'] == name
    kept = sum(small.spec.keep)
    assert len(find_residual_blocks(small.model, input_size=(3, size, size)).blocks) == kept < len(layout.blocks)
    # every tensor accounted for: each new key comes from one parent key, the others belong to dropped blocks
    dropped = [p for p, k in zip(layout.paths, small.spec.keep) if not k]
    assert set(small.key_map) == set(small.model.state_dict())
    assert len(set(small.key_map.values())) == len(small.key_map)
    unused = set(parent_state) - set(small.key_map.values())
    assert unused and all(any(k.startswith(p + '.') for p in dropped) for k in unused)
    for new, old in small.key_map.items():
        assert torch.equal(small.model.state_dict()[new], parent_state[old])

    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    expected = _subnet_logits(model, layout, small.spec, x)
    with torch.no_grad():
        torch.testing.assert_close(small.model(x), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(model(x), expected)  # the subnet really is a different network
    # the parent is untouched
    assert all(torch.equal(v, parent_state[k]) for k, v in model.state_dict().items())


def test_keep_mask_and_renumbering():
    model = _model('resnet18')
    layout = find_residual_blocks(model, input_size=(3, 32, 32))
    keep = [False, True, True, True, True, False, True, True]  # drops layer1.0 and layer3.1
    small = create_subnet_model(model, layout, keep, input_size=(3, 32, 32))
    assert small.depth_argument.value == (1, 2, 1, 2)
    assert small.key_map['layer1.0.conv1.weight'] == 'layer1.1.conv1.weight'
    assert small.key_map['layer3.0.conv1.weight'] == 'layer3.0.conv1.weight'
    assert 'layer1.1.conv1.weight' not in small.key_map
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small.model(x), _subnet_logits(model, layout, keep, x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_keep_mask_that_changes_block_behaviour_is_refused():
    # Swin alternates plain and shifted windows by block index: keeping only the shifted block 1 of the first
    # stage would turn it into a plain block 0, so the logits would differ from the subnet's.
    model = _model('swin_tiny_patch4_window7_224', img_size=64, window_size=4)
    layout = find_residual_blocks(model, input_size=(3, 64, 64))
    keep = [False] + [True] * (len(layout.blocks) - 1)
    with pytest.raises(SubnetExportError, match='prefix depth vector'):
        create_subnet_model(model, layout, keep, input_size=(3, 64, 64))


def test_unsupported_family_names_the_supported_ones():
    model = _model('efficientnet_b0')
    layout = find_residual_blocks(model, input_size=(3, 32, 32))
    keep = [not b.skippable for b in layout.blocks]
    with pytest.raises(UnsupportedFamilyError, match=r'supported are .*ResNet.*layers.*ViT.*depth.*ConvNeXt'):
        create_subnet_model(model, layout, keep)


def test_pareto_selection():
    rows = [dict(keep=k, flops=f, top1=a, is_full=full) for k, f, a, full in [
        ('full', 100, 90.0, True), ('a', 10, 50.0, False), ('b', 20, 45.0, False), ('c', 30, 70.0, False),
        ('d', 40, 69.0, False), ('e', 60, 80.0, False), ('f', 80, 85.0, False)]]
    subnets = [r for r in rows if not r['is_full']]
    assert [r['keep'] for r in pareto_front(subnets)] == ['a', 'c', 'e', 'f']  # b and d are dominated
    assert [r['keep'] for r in select_pareto(rows, 2)] == ['a', 'f']
    assert [r['keep'] for r in select_pareto(rows, 3)] == ['a', 'e', 'f']  # both ends and the middle index
    assert [r['keep'] for r in select_pareto(rows, 9)] == ['a', 'c', 'e', 'f']


def test_parse_subnets():
    assert parse_subnets('1,1,1,1; 2,2,2,2 keep:0111 pareto:3') == dict(
        depths=['1,1,1,1', '2,2,2,2'], keep=['0111'], pareto=3)
    for bad in ('', 'pareto:0', 'keep:012', '1,x'):
        with pytest.raises(ValueError):
            parse_subnets(bad)


# ------------------------------------------------------------------------------------------------------------ CLI


def _checkpoint(tmp_path: Path, name: str = 'resnet18', **kwargs) -> Path:
    path = tmp_path / f'{name}.pth.tar'
    torch.save({'state_dict': _model(name, DIGITS_CLASSES, **kwargs).state_dict()}, path)
    return path


@pytest.mark.parametrize('extra,message', [
    (['--depths', '1,1,1'], 'has 3 entries but resnet18'),
    (['--depths', '1,1,9,1'], 'out of range'),
    (['--keep', '11011111'], 'cannot be skipped'),  # layer2.0 downsamples
    ([], 'no subnet requested'),
    (['--depths', '1,1,1,1', '--push-to-hub'], 'needs --hub-repo-id'),
])
def test_cli_rejects_bad_input_with_one_line(tmp_path, capsys, extra, message):
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / 'out'
    assert main([str(ckpt), '--model', 'resnet18', '--num-classes', '10', '--output', str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], err
    assert not out.exists()


def test_cli_rejects_missing_source_and_unsupported_family(tmp_path, capsys):
    assert main([str(tmp_path / 'nope.pth.tar'), '--depths', '1,1,1,1', '--output', str(tmp_path / 'o')]) == 2
    assert 'does not exist' in capsys.readouterr().err
    ckpt = _checkpoint(tmp_path, 'efficientnet_b0')
    argv = [str(ckpt), '--model', 'efficientnet_b0', '--num-classes', '10', '--depths', '1,1,1,1', '--output',
            str(tmp_path / 'o')]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'supported are' in err[0], err
    assert not (tmp_path / 'o').exists()


@pytest.mark.slow
def test_cli_export_roundtrip_in_fresh_python(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / 'out'
    argv = [str(ckpt), '--model', 'resnet18', '--num-classes', '10', '--depths', '1,1,1,1', '--keep', '01111110',
            '--output', str(out), *FAST_ARGS]
    assert main(argv) == 0, capsys.readouterr().err

    with open(out / 'subnets.csv', newline='') as f:
        rows = {r['name']: r for r in csv.DictReader(f)}
    assert set(rows) == {'d2-2-2-2', 'd1-1-1-1', 'k01111110'}
    full, small = rows['d2-2-2-2'], rows['d1-1-1-1']
    assert full['is_full'] == 'True' and full['folder'] == ''  # measured for the plot, not exported
    assert int(small['params']) < int(rows['k01111110']['params']) < int(full['params'])
    assert int(small['flops']) < int(full['flops'])
    for r in rows.values():
        assert float(r['latency_b1_ms']) > 0 and float(r['latency_b32_ms']) > float(r['latency_b1_ms'])
        assert 0 <= float(r['top1']) <= float(r['top5']) <= 100
    assert (out / 'pareto.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    folder = out / 'resnet18-d1-1-1-1'
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors', 'pareto.png']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'resnet18' and config['model_args']['layers'] == [1, 1, 1, 1]
    card = (folder / 'README.md').read_text()
    for text in ('Subnetwork of run `resnet18`', 'layers=[1, 1, 1, 1]', '| parameters |', 'CPU latency batch 32',
                 "timm.create_model('local-dir:", '![Top-1 vs CPU latency'):
        assert text in card

    # expected logits: the in-place subnets of the checkpoint's model
    model = _model('resnet18', DIGITS_CLASSES)
    layout = find_residual_blocks(model, input_size=(3, 32, 32))
    io_files = []
    for name, spec in (('d1-1-1-1', (1, 1, 1, 1)), ('k01111110', [c == '1' for c in '01111110'])):
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        io = tmp_path / f'{name}.pt'
        torch.save({'inputs': [x], 'outputs': [_subnet_logits(model, layout, spec, x)]}, io)
        io_files.append((f"local-dir:{out / f'resnet18-{name}'}", io))
    stdout = _load_in_fresh_process(io_files, 'http://127.0.0.1:9', tmp_path)
    assert stdout.count('LOADED') == 2


@pytest.mark.slow
def test_cli_pareto_and_bn_recal(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    out = tmp_path / 'out'
    argv = [str(ckpt), '--model', 'resnet18', '--num-classes', '10', '--pareto', '2', '--subnets', 'random:5',
            '--bn-recal', '32', '--output', str(out), *FAST_ARGS]
    assert main(argv) == 0, capsys.readouterr().err
    loafing = json.loads((out / 'loafing' / 'loafing.json').read_text())['results']
    chosen = json.loads((out / 'subnets.json').read_text())[1:]
    assert 1 <= len(chosen) <= 2 and all(r['bn_recal_images'] == 32 and r['folder'] for r in chosen)
    front = [r['keep'] for r in pareto_front([r for r in loafing if not r['is_full']], 'top1_bnrecal')]
    assert all(r['keep'] in front for r in chosen)
    card = (Path(chosen[0]['folder']) / 'README.md').read_text()
    assert 're-estimated for this subnet on 32 training images' in card
    # re-estimated statistics: the exported BN buffers are not the parent's
    from safetensors.torch import load_file
    exported = load_file(str(Path(chosen[0]['folder']) / 'model.safetensors'))
    assert not torch.equal(exported['bn1.running_mean'], _model('resnet18', DIGITS_CLASSES).bn1.running_mean)


@pytest.mark.slow
def test_cli_push_one_repo_per_depth_and_clean_failure(tmp_path):
    ckpt = _checkpoint(tmp_path)
    with FakeHub() as hub_server:
        env = _env(hub_server.url, tmp_path)
        out = tmp_path / 'out'
        args = ['-m', 'timm_stim.export', str(ckpt), '--model', 'resnet18', '--num-classes', '10',
                '--depths', '1,1,1,1', '2,1,1,1', '--output', str(out), '--push-to-hub', '--hub-repo-id',
                'test-user/r18-st', *FAST_ARGS]
        result = _run(args, env, tmp_path, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert TOKEN not in result.stdout + result.stderr
        for name in ('d1-1-1-1', 'd2-1-1-1'):
            remote = hub_server.files(f'test-user/r18-st-{name}')
            assert {'config.json', 'model.safetensors', 'README.md', 'pareto.png'} <= set(remote)
            assert f'hf-hub:test-user/r18-st-{name}' in remote['README.md'].decode()

        model = _model('resnet18', DIGITS_CLASSES)
        layout = find_residual_blocks(model, input_size=(3, 32, 32))
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        io = tmp_path / 'io.pt'
        torch.save({'inputs': [x], 'outputs': [_subnet_logits(model, layout, (1, 1, 1, 1), x)]}, io)
        assert 'LOADED' in _load_in_fresh_process([('hf-hub:test-user/r18-st-d1-1-1-1', io)], hub_server.url, tmp_path)

        hub_server.set_failure('commit', 500)
        out2 = tmp_path / 'out2'
        result = _run([*args[:args.index('--output') + 1], str(out2), *args[args.index('--output') + 2:]], env,
                      tmp_path, timeout=300)
        assert result.returncode == 1
        assert 'Traceback' not in result.stderr and TOKEN not in result.stdout + result.stderr
        errors = _error_lines(result.stderr)
        assert len(errors) == 1 and 'local files are intact' in errors[0], result.stderr
        assert (out2 / 'resnet18-d1-1-1-1' / 'model.safetensors').is_file()


@pytest.mark.slow
def test_export_after_training_api(tmp_path):
    from timm_stim.export import export_after_training
    model = _model('resnet18', DIGITS_CLASSES)
    run_dir = tmp_path / 'run'
    rows = export_after_training(model, '1,1,1,1', run_dir / 'subnets', dict(model='resnet18', workers=0),
                                 dict(input_size=(3, 32, 32)), torch.device('cpu'))
    assert [r['name'] for r in rows] == ['d2-2-2-2', 'd1-1-1-1']
    folder = Path(rows[1]['folder'])
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    layout = find_residual_blocks(model, input_size=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), _subnet_logits(model, layout, (1, 1, 1, 1), x), rtol=1e-5, atol=1e-6)
    assert 'Subnetwork of run `run`' in (folder / 'README.md').read_text()
