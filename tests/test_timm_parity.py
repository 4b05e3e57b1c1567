"""train_stim.py is a drop-in for timm's train.py.

- `--stim none` with timm's flags trains the same run as timm's train.py: every summary.csv number matches the
  ones recorded from timm's script (tests/data/timm_parity.json, made by benchmarks/record_timm_parity.py) on the
  same PNG image folder, CPU, one thread, no loader workers. Tolerance: relative 1e-5 (absolute 1e-6 near zero).
- Every flag of timm's train.py parses with timm's dest and default (tests/data/timm_flags.json).
- A timm-written args.yaml (tests/data/timm_args.yaml) is accepted unchanged by -c, and train_stim's own
  args.yaml keeps timm's keys and an unresolved lr.
"""
import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / 'data'
for path in (REPO, REPO / 'benchmarks'):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import record_timm_parity  # noqa: E402
import train_stim  # noqa: E402
from timm_stim import train_args  # noqa: E402

PARITY = json.loads((DATA / 'timm_parity.json').read_text())
FLAGS = json.loads((DATA / 'timm_flags.json').read_text())['flags']
REL, ABS = 1e-5, 1e-6

# Defaults that differ from timm's on purpose (docs/timm_compat.md): a CPU machine trains on the CPU.
DEFAULT_EXCEPTIONS = {'device'}


@pytest.fixture(scope='module')
def digits_folder(tmp_path_factory):
    return record_timm_parity.write_digits_folder(tmp_path_factory.mktemp('parity') / 'digits',
                                                  PARITY['per_class'])


@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
    return record_timm_parity.write_teacher_folders(tmp_path_factory.mktemp('parity') / 'teachers')


@pytest.mark.slow
@pytest.mark.parametrize('name', list(PARITY['configs']))
def test_stim_none_matches_timm_train(name, digits_folder, teachers, tmp_path):
    import PIL
    if PARITY.get('pillow', PIL.__version__).split('.')[0] != PIL.__version__.split('.')[0]:
        pytest.skip(f"recorded with Pillow {PARITY.get('pillow')}, installed {PIL.__version__}: its resizing gives "
                    f"other images; re-record with benchmarks/record_timm_parity.py")
    config = PARITY['configs'][name]
    flags = record_timm_parity.config_flags(config['flags'], teachers)
    code = train_stim.main(['--data-dir', str(digits_folder), *PARITY['common'], *flags, '--stim', 'none',
                            '--output', str(tmp_path), '--experiment', name])
    assert code == 0
    got = record_timm_parity.read_summary(tmp_path / name / 'summary.csv')
    want = config['summary']
    assert len(got) == len(want)
    worst_abs, worst_rel = 0.0, 0.0
    for row_got, row_want in zip(got, want):
        assert set(row_want) <= set(row_got), f'missing columns {set(row_want) - set(row_got)}'
        for key, value in row_want.items():
            diff = abs(row_got[key] - value)
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / max(abs(value), 1e-12))
            assert diff <= max(REL * abs(value), ABS), f'{name} epoch {row_want["epoch"]:.0f} {key}: ' \
                                                       f'{row_got[key]!r} vs timm {value!r}'
    print(f'{name}: max abs diff {worst_abs:.3g}, max rel diff {worst_rel:.3g}')


def test_every_timm_flag_parses_with_timm_dest_and_default():
    parser = train_args.build_parser()
    ours = {opt: action for action in parser._actions for opt in action.option_strings}
    ours_dest = {action.dest: action for action in parser._actions}
    assert len(FLAGS) > 150
    for flag in FLAGS:
        if not flag['options']:  # the positional data dir
            assert flag['dest'] in ours_dest
            continue
        for option in flag['options']:
            assert option in ours, option
            action = ours[option]
            assert action.dest == flag['dest'], option
            if flag['dest'] not in DEFAULT_EXCEPTIONS:
                default = list(action.default) if isinstance(action.default, tuple) else action.default
                assert default == flag['default'], f'{option}: {default!r} vs timm {flag["default"]!r}'
    defaults = vars(parser.parse_args([]))
    # a value for each: parses from the command line to the right dest
    args = parser.parse_args(['/data', '--decay-milestones', '3', '6', '--dr', '0.5', '--local_rank', '1',
                              '--opt-kwargs', 'foo=1', '--train-steps-per-epoch', '7', '--torchcompile'])
    assert (args.data, args.decay_milestones, args.decay_rate, args.local_rank, args.opt_kwargs,
            args.train_batches_per_epoch, args.torchcompile) == ('/data', [3, 6], 0.5, 1, {'foo': 1}, 7, 'inductor')
    assert defaults['decay_milestones'] == [90, 180, 270]


def test_timm_args_yaml_is_accepted_unchanged(tmp_path):
    cfg = yaml.safe_load((DATA / 'timm_args.yaml').read_text())
    args = train_stim.parse_args(['-c', str(DATA / 'timm_args.yaml'), '--stim', 'none'])
    for key, value in cfg.items():
        got = getattr(args, key)
        assert got == value or (isinstance(value, list) and list(got) == value), key
    train_stim.check_args(args)
    st = train_stim.parse_args(['-c', str(DATA / 'timm_args.yaml')])  # ST added to the timm recipe
    assert st.stim == 'st++' and st.opt == cfg['opt']
    train_stim.check_args(st)


def test_own_args_yaml_keeps_timm_keys_and_unresolved_lr(digits_folder, tmp_path):
    """The args.yaml of a run has every timm key with a value timm's parser accepts, and lr as given."""
    out = tmp_path / 'out'
    code = train_stim.main(['--data-dir', str(digits_folder), '--stim', 'none', '--model', 'resnet10t', '--epochs',
                            '1', '--img-size', '32', '-b', '32', '--workers', '0', '--device', 'cpu',
                            '--lr-base', '0.2',
                            '--output', str(out), '--experiment', 'run', '--val-split', ''])
    assert code == 0
    record = yaml.safe_load((out / 'run' / 'args.yaml').read_text())
    timm_dests = {f['dest'] for f in FLAGS}
    assert timm_dests <= set(record)
    assert record['lr'] is None and record['lr_base'] == 0.2  # resolved at run time, as timm does
    again = train_stim.parse_args(['-c', str(out / 'run' / 'args.yaml')])  # and it reloads unchanged
    assert again.lr is None and again.model == 'resnet10t'
    with open(out / 'run' / 'summary.csv', newline='') as f:  # no validation: timm's columns, train loss ranks
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ['epoch', 'train_loss', 'lr']


@pytest.mark.parametrize('argv, message', [
    (['--aug-splits', '3', '--jsd-loss'], '--aug-splits cannot be combined with --stim st++'),
    (['--split-bn', '--aug-splits', '2'], 'cannot be combined with --stim st++'),
    (['--naflex-loader', '--train-img-sizes', '24', '32'], 'alternative loader modes'),
    (['--naflex-loader', '--stim-min-scale', '0.5'], 'smaller subnet inputs'),
    (['--naflex-loader', '--use-multi-epochs-loader', '--stim', 'none'], '--use-multi-epochs-loader cannot'),
    (['--naflex-loader', '--model', 'resnet10t', '--stim', 'none'], '--naflex-loader needs a NaFlex model'),
    (['--train-img-sizes', '24', '32', '--train-batch-sizes', '8'], '--train-batch-sizes needs one value per'),
    (['--train-size-probs', '1', '2'], '--train-size-probs needs one value per --train-img-sizes'),
    (['--train-img-sizes', '4', '32'], '--train-img-sizes must all be >= 8'),
    (['--naflex-train-seq-lens', '0', '--naflex-loader'], '--naflex-train-seq-lens must all be >= 1'),
    (['--kd-model-name', 'resnt18'], "--kd-model-name: unknown timm model 'resnt18'"),
    (['--kd-model-name', 'resnet18', '--kd-loss-type', 'mse'], "--kd-loss-type must be 'kl'"),
    (['--kd-model-name', 'resnet18', '--kd-distill-type', 'feature'], 'cannot be combined with --stim st++'),
    (['--kd-model-name', 'resnet18', '--kd-temperature', '0'], '--kd-temperature must be > 0'),
    (['--decay-milestones', '60', '30'], '--decay-milestones must be increasing'),
    (['--val-interval', '0'], '--val-interval must be >= 1'),
    (['--reprob', '1.5'], '--reprob must be in [0, 1]'),
    (['--amp-dtype', 'float8'], "--amp-dtype must be 'float16' or 'bfloat16'"),
])
def test_flags_refused_with_one_line(argv, message, capsys):
    assert train_stim.main(['--data-dir', '/nonexistent'] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_config_values_are_type_checked(tmp_path):
    bad = tmp_path / 'bad.yaml'
    for text, message in (('epochs: 2.5\n', '--epochs must be int'), ('scale: 0.5\n', '--scale must be a list'),
                          ('model_kwargs: [1]\n', '--model-kwargs must be a mapping'),
                          ('input_size: [3, 32]\n', '--input-size needs 3 values')):
        bad.write_text(text)
        args = train_stim.parse_args(['-c', str(bad), '--data-dir', '/d'])
        with pytest.raises(train_args.ArgsError, match=message):
            train_stim.check_args(args)
