"""train_stim.py --finetune: every model source resolves, the fine-tune settings fill only what the user left
open, and a fine-tune run measures the same subnets before and after, exports the family and pushes it."""
import json
import math

import pytest
import timm
import torch
import yaml

from hub_server import FakeHub
from test_train_hub import TOKEN, _hub_env
from test_train_stim import FAST, run_train, train_stim
from timm_stim.finetune import FINETUNE_DEFAULTS, FINETUNE_EPOCH_FRACTION, prepare_finetune
from timm_stim.model_folder import export_timm_model


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
    """A run folder as train_stim.py writes it (args.yaml + checkpoints), and an export folder of the same model."""
    root = tmp_path_factory.mktemp('sources')
    model = timm.create_model('resnet18', num_classes=10)
    run = root / 'run'
    run.mkdir()
    for name in ('last.pth.tar', 'model_best.pth.tar'):
        torch.save({'epoch': 11, 'arch': 'resnet18', 'state_dict': model.state_dict()}, run / name)
    (run / 'args.yaml').write_text(yaml.safe_dump(dict(model='resnet18', num_classes=10, epochs=12, img_size=32,
                                                       mean=[0.3, 0.3, 0.3], std=[0.3, 0.3, 0.3])))
    export = export_timm_model(model, root / 'export', 'resnet18', model_args=dict(num_classes=10))
    torch.save(model.state_dict(), root / 'bare.pth')  # a checkpoint from elsewhere: no args, no architecture
    return dict(run=run, ckpt=run / 'last.pth.tar', export=export, weights=model.state_dict(), bare=root / 'bare.pth')


def _prepare(*argv):
    args = train_stim.parse_args([str(a) for a in argv])
    return args, prepare_finetune(args)


@pytest.mark.parametrize('kind', ['run', 'ckpt', 'bare', 'export', 'local-dir', 'initial-checkpoint', 'timm-tag'])
def test_every_source_kind_resolves(sources, kind):
    argv = {'run': ['--finetune', sources['run']], 'ckpt': ['--finetune', sources['ckpt']],
            'export': ['--finetune', sources['export']], 'local-dir': ['--finetune', f"local-dir:{sources['export']}"],
            'initial-checkpoint': ['--finetune', '--initial-checkpoint', sources['ckpt']],
            'timm-tag': ['--finetune', 'resnet18.a1_in1k'],
            'bare': ['--finetune', sources['bare'], '--model', 'resnet18', '--num-classes', '10']}[kind]
    args, finetune = _prepare(*argv)
    assert finetune is not None and finetune.source
    if kind in ('run', 'ckpt'):  # weights read here (safely), architecture and classes from its args.yaml
        assert args.model == 'resnet18' and args.num_classes == 10 and finetune.source_classes == 10
        assert all(torch.equal(v, finetune.state_dict[k]) for k, v in sources['weights'].items())
        assert args.mean == [0.3, 0.3, 0.3]  # the preprocessing it was trained with
        assert args.epochs == math.ceil(FINETUNE_EPOCH_FRACTION * 12)
    elif kind == 'bare':  # the user's --model / --num-classes name what the file does not
        assert (args.model, finetune.source_classes) == ('resnet18', 10)
        assert all(torch.equal(v, finetune.state_dict[k]) for k, v in sources['weights'].items())
    elif kind == 'initial-checkpoint':
        assert finetune.state_dict is None and args.initial_checkpoint == str(sources['ckpt'])
    else:  # timm loads them: an export folder or a timm tag, as pretrained weights
        assert args.pretrained and finetune.state_dict is None
    if kind in ('run', 'ckpt'):  # the model create_model builds holds exactly the source's weights
        model = train_stim.create_model(args, None, finetune)
        assert all(torch.equal(v, sources['weights'][k]) for k, v in model.state_dict().items())


def test_settings_fill_only_what_the_user_left_open(sources):
    args, finetune = _prepare('--finetune', sources['run'], '--lr', '0.003', '--stim', 'st++', '--epochs', '7')
    assert (args.lr, args.stim, args.epochs) == (0.003, 'st++', 7)
    chosen = {flag for flag, _, _ in finetune.chosen}
    assert not chosen & {'lr', 'lr_base', 'stim', 'epochs'}
    for dest, value in FINETUNE_DEFAULTS.items():
        if dest != 'stim':
            assert getattr(args, dest) == value and dest in chosen
    assert '--stim-main-logits raw' in finetune.describe()


@pytest.mark.parametrize('argv,words', [
    (['--finetune'], '--finetune needs a trained model'),
    (['--finetune', 'resnet18x'], 'not a file or folder'),
    (['--finetune', '/no/such/run'], 'not a file or folder'),
])
def test_unusable_sources_are_one_line(tmp_path, capsys, argv, words):
    code = train_stim.main([*argv, '--output', str(tmp_path / 'out'), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_finetune_run_measures_before_and_after_exports_and_pushes(tmp_path):
    base = run_train('--stim', 'none', '--epochs', '1', '--output', tmp_path, '--experiment', 'base', *FAST)
    assert base.returncode == 0, base.stderr[-2000:]
    with FakeHub() as hub:
        res = run_train('--finetune', tmp_path / 'base', '--epochs', '1', '--loafing-eval', '2',
                        '--export-subnets', 'pareto:1', '--push-to-hub', '--hub-repo-id', 'test-user/ft',
                        '--output', tmp_path, '--experiment', 'ft', *FAST, env=_hub_env(hub.url, tmp_path))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        card = hub.files('test-user/ft')['README.md'].decode()
    run = tmp_path / 'ft'
    before = json.loads((run / 'loafing_before' / 'loafing.json').read_text())
    after = json.loads((run / 'loafing' / 'loafing.json').read_text())
    subnets = lambda doc: sorted(r['depths'] for r in doc['results'])  # noqa: E731
    assert subnets(before) == subnets(after) and len(subnets(after)) == 2  # random:2 (full net included), the same ones
    assert all(r['top1_bnrecal'] is not None for r in after['results'])
    assert 'Fine-tuned from base' in card and 'before fine-tune' in card and 'after fine-tune' in card
    assert 'Subnets before and after the fine-tune' in res.stdout
    assert any((run / 'subnets').glob('resnet18-*'))
    assert TOKEN not in res.stdout + res.stderr


def test_recipe_lr_is_scaled_when_the_user_gives_none(sources):
    """The built-in recipe's --lr is not the user's: the fine-tune takes FINETUNE_LR_FACTOR of it."""
    from timm_stim.finetune import FINETUNE_LR_FACTOR
    recipe_lr = train_stim.parse_args([]).lr
    args, finetune = _prepare('--finetune', sources['run'])
    assert recipe_lr and args.lr == pytest.approx(FINETUNE_LR_FACTOR * recipe_lr)
    assert ('lr', args.lr) in {(flag, value) for flag, value, _ in finetune.chosen}
