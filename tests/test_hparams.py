"""Every recipe in hparams/ loads with -c and uses only train_stim.py argument names."""
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import train_stim  # noqa: E402  (importing builds nothing and trains nothing)

RECIPES = sorted((REPO / 'hparams').glob('*.yaml'))
DESTS = {a.dest for a in train_stim.build_parser()._actions}


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {'digits_resnet18.yaml', 'resnet50_stpp_in1k.yaml', 'resnet50_st_in1k.yaml'} <= names
    assert any('cifar100' in n for n in names) and any('deit' in n for n in names)


@pytest.mark.parametrize('path', RECIPES, ids=lambda p: p.name)
def test_recipe_keys_are_argparse_dests(path):
    text = path.read_text()
    assert text.startswith('#'), 'each recipe starts with a comment saying where its numbers come from'
    cfg = yaml.safe_load(text)
    assert isinstance(cfg, dict) and cfg
    assert not set(cfg) - DESTS, f'unknown keys: {sorted(set(cfg) - DESTS)}'
    args = train_stim.parse_args(['-c', str(path), '--data-dir', '/data'])
    for key, value in cfg.items():
        got = getattr(args, key)
        assert got == value or list(got) == list(value), key
    train_stim.check_args(args)  # choices, ranges, stim space


def test_stpp_recipe_is_the_released_one():
    args = train_stim.parse_args(['-c', str(REPO / 'hparams' / 'resnet50_stpp_in1k.yaml'), '--data-dir', '/d'])
    assert (args.model, args.stim, args.stim_loss, args.stim_subnets, args.stim_min_scale) == \
        ('resnet50', 'st++', 'kl-', 6, 0.43)
    assert (args.opt, args.momentum, args.weight_decay, args.lr, args.batch_size) == ('nesterov', 0.9, 1e-4, 0.2, 256)
    assert (args.sched, args.sched_on_updates, args.warmup_epochs, args.epochs) == ('cosine', True, 0, 200)
    assert (args.color_jitter, args.mixup, args.smoothing, args.stim_bn_recal) == (0.4, 0.0, 0.0, 2000)


def test_digits_recipe_is_the_default_and_flags_win():
    plain = train_stim.parse_args([])
    cfg = yaml.safe_load((REPO / 'hparams' / 'digits_resnet18.yaml').read_text())
    assert plain.digits_recipe and all(getattr(plain, k) == v for k, v in cfg.items())
    assert train_stim.parse_args(['--epochs', '3', '--hflip', '0.5']).epochs == 3
    assert train_stim.parse_args(['--hflip', '0.5']).hflip == 0.5
    other = train_stim.parse_args(['--data-dir', '/images'])  # not the built-in data: timm's defaults
    assert not other.digits_recipe and other.epochs == 300 and other.hflip == 0.5


def test_bad_config_values(tmp_path):
    for text, message in (('stim: st+++\n', 'not one of'), ('batch_sise: 8\n', "did you mean 'batch_size'"),
                          ('- a list\n', 'must map')):
        bad = tmp_path / 'bad.yaml'
        bad.write_text(text)
        with pytest.raises(train_stim.UsageError, match=message):
            train_stim.parse_args(['-c', str(bad)])
