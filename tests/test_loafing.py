"""Tests for timm_stim.loafing (subnet sets, evaluation, BN re-estimation, CLI), timm_stim.flops and
timm_stim.loafing_report (summary, outputs); model loading: tests/test_checkpoint.py."""
import csv
import json

import pytest
import timm
import torch

from timm_stim import SubnetSpec, find_residual_blocks
from timm_stim import loafing, loafing_report
from timm_stim.flops import count_relative_flops
from timm_stim.loafing import evaluate_subnets, make_subnet_specs
from timm_stim.loafing_report import loafing_markdown, summarize, write_results

SIZE = (3, 32, 32)


@pytest.fixture(scope='module')
def resnet50_layout():
    return find_residual_blocks(timm.create_model('resnet50'), input_size=SIZE)


@pytest.fixture(scope='module')
def resnet50():
    return timm.create_model('resnet50', num_classes=10).eval()


def _resnet18(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('resnet18', num_classes=10).eval()


def _batches(model: torch.nn.Module, n_batches: int = 3, batch: int = 8, seed: int = 0):
    """Random images; labels are the model's own top-1 for half the samples, so accuracy is not trivial."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, *SIZE, generator=gen)
        with torch.no_grad():
            pred = model(x).argmax(-1)
        y = torch.randint(0, 10, (batch,), generator=gen)
        y[: batch // 2] = pred[: batch // 2]
        out.append((x, y))
    return out


def test_subnet_sets(resnet50_layout):
    staged, specs = make_subnet_specs(resnet50_layout, 'all', space='st')
    assert len(specs) == 216 and len(set(specs)) == 216
    assert specs[0] == staged.full_spec()
    assert {staged.depths(s) for s in specs} == {
        (a, b, c, d) for a in range(1, 4) for b in range(1, 5) for c in range(1, 7) for d in range(1, 4)}
    _, specs_pp = make_subnet_specs(resnet50_layout, 'all', space='st++')
    assert sorted(staged.depths(s) for s in specs_pp) == sorted(
        (3, b, c, 3) for b in (3, 4) for c in (3, 4, 5, 6))

    _, drawn = make_subnet_specs(resnet50_layout, 'random:10', space='st', seed=3)
    _, again = make_subnet_specs(resnet50_layout, 'random:10', space='st', seed=3)
    assert len(drawn) == 10 and len(set(drawn)) == 10 and drawn[0] == staged.full_spec()
    assert drawn == again and set(drawn) <= set(specs)
    assert len(make_subnet_specs(resnet50_layout, 'random:1', space='st')[1]) == 1
    assert len(make_subnet_specs(resnet50_layout, 'random:999', space='st')[1]) == 216  # capped at the support

    _, explicit = make_subnet_specs(resnet50_layout, depths=['2,2,3,2', '1,1,1,1'])
    assert [staged.depths(s) for s in explicit] == [(3, 4, 6, 3), (2, 2, 3, 2), (1, 1, 1, 1)]
    for bad in ('some', 'random:0', 'random:x'):
        with pytest.raises(ValueError, match='--subnets'):
            make_subnet_specs(resnet50_layout, bad)
    with pytest.raises(ValueError, match='stage'):
        make_subnet_specs(resnet50_layout, depths=['3,4,6'])


def test_full_entry_is_plain_evaluation():
    model = _resnet18()
    batches = _batches(model)
    layout, specs = make_subnet_specs(find_residual_blocks(model, input_size=SIZE), 'random:3')
    rows = evaluate_subnets(model, layout, specs, batches, label='r18')

    correct1 = correct5 = total = 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x)
            correct1 += (logits.argmax(-1) == y).sum().item()
            correct5 += (logits.topk(5, -1).indices == y[:, None]).any(-1).sum().item()
            total += len(y)
    full = rows[0]
    assert full['is_full'] and full['depths'] == '2,2,2,2' and full['keep'] == '11111111'
    assert full['top1'] == pytest.approx(100 * correct1 / total)
    assert full['top5'] == pytest.approx(100 * correct5 / total)
    assert full['rel_depth'] == 1.0 and full['rel_flops'] == 1.0 and full['num_val'] == total
    assert full['top1_bnrecal'] is None
    assert all(r['model'] == 'r18' and r['rel_depth'] < 1 and not r['is_full'] for r in rows[1:])


def test_flops_monotone_along_nested_chain(resnet50, resnet50_layout):
    layout = resnet50_layout
    chain, keep = [layout.full_spec()], list(layout.full_spec().keep)
    for i in reversed(range(len(layout.blocks))):  # drop skippable blocks one at a time, last first
        if layout.blocks[i].skippable:
            keep[i] = False
            chain.append(SubnetSpec(tuple(keep)))
    rel = [count_relative_flops(resnet50, layout, spec, SIZE) for spec in chain]
    assert rel[0] == 1.0 and len(rel) == 1 + layout.num_skippable
    assert all(a > b > 0 for a, b in zip(rel, rel[1:])), rel
    # FLOPs do not depend on the weights: another instance of the architecture hits the cache
    other = timm.create_model('resnet50', num_classes=10)
    assert count_relative_flops(other, layout, chain[5], SIZE) == rel[5]


def test_bn_recal_touches_only_a_copy(monkeypatch):
    model = _resnet18()
    batches = _batches(model)
    model.train()  # the training flag must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def spy(evaluated, batches, num_images, **kwargs):
        used = real(evaluated, batches, num_images=num_images, **kwargs)
        calls.append((evaluated, {k: v.clone() for k, v in evaluated.state_dict().items()}))
        return used

    real = loafing.recalibrate_bn
    monkeypatch.setattr(loafing, 'recalibrate_bn', spy)
    layout, specs = make_subnet_specs(find_residual_blocks(model, input_size=SIZE), 'random:2')
    rows = evaluate_subnets(model, layout, specs, batches, train_loader=batches, bn_recal_images=16)

    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(calls) == len(specs)
    for evaluated, state in calls:
        assert evaluated is not model
        assert not torch.equal(state['bn1.running_mean'], before['bn1.running_mean'])
    assert all(r['bn_recal_images'] == 16 and r['top1_bnrecal'] is not None for r in rows)


@pytest.mark.slow
def test_outputs_written(tmp_path):
    models = [_resnet18(0), _resnet18(1)]
    results = []
    for label, model in zip(('a', 'b'), models):
        layout, specs = make_subnet_specs(find_residual_blocks(model, input_size=SIZE), 'random:4')
        results += evaluate_subnets(model, layout, specs, _batches(models[0], 2), label=label,
                                    train_loader=_batches(models[0], 1), bn_recal_images=8)
    summary = summarize(results)
    files = write_results(results, tmp_path, summary)

    with open(files['csv'], newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 4 and rows[0]['model'] == 'a' and rows[0]['depths'] == '2,2,2,2'
    assert set(loafing_report.RESULT_FIELDS) <= set(rows[0])
    payload = json.loads(files['json'].read_text())
    assert len(payload['results']) == 8 and [s['model'] for s in payload['summary']] == ['a', 'b']
    assert files['png'].read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    a, b = summary
    assert a['num_subnets'] == 3 and a['gap_full_top1'] == 0 and a['gap_mean_top1'] == 0
    subs = [r['top1'] for r in results if r['model'] == 'b' and not r['is_full']]
    assert b['mean_top1'] == pytest.approx(sum(subs) / 3) and b['min_top1'] == min(subs)
    assert b['gap_full_top1'] == pytest.approx(b['full_top1'] - a['full_top1'])
    assert 'full_top1_bnrecal' in a and 'gap_mean_top1_bnrecal' in b
    md = loafing_markdown(summary, 'loafing.png')
    assert md.count('\n| ') == 3 and '![' in md and '(loafing.png)' in md and 'BN re-est.' in md


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, capsys):
    ckpt = tmp_path / 'r18.pth.tar'
    torch.save({'state_dict': _resnet18().state_dict(), 'arch': 'resnet18'}, ckpt)
    out = tmp_path / 'out'
    rc = loafing.main([
        str(ckpt), str(ckpt), '--labels', 'base', 'st', '--num-classes', '10', '--subnets', 'random:3',
        '--val-num-samples', '48', '--bn-recal', '16', '-b', '16', '-j', '0', '--output', str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert 'BN statistics re-estimated' in printed and 'base' in printed
    with open(out / 'loafing.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 and {r['model'] for r in rows} == {'base', 'st'}
    assert all(r['num_val'] == '48' and r['bn_recal_images'] == '16' for r in rows)
    # identical weights -> identical numbers for both labels
    assert [r['top1'] for r in rows[:3]] == [r['top1'] for r in rows[3:]]
    meta = json.loads((out / 'loafing.json').read_text())['meta']
    assert meta['data_config']['input_size'] == [3, 32, 32]
    assert (out / 'loafing.png').read_bytes()[:4] == b'\x89PNG'
    assert loafing.main([str(tmp_path / 'nothing.pth')]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and 'nothing.pth' in err[0], err


def test_loafing_eval_one_call(tmp_path):
    """The entry point for training scripts: one model, random subnets, files and a model-card section."""
    model = _resnet18()
    results, summary = loafing.loafing_eval(model, _batches(model, 2), subnets='random:3', output_dir=tmp_path,
                                            label='run')
    assert len(results) == 3 and [s['model'] for s in summary] == ['run']
    assert {'loafing.csv', 'loafing.json', 'loafing.png'} <= {p.name for p in tmp_path.iterdir()}
    md = loafing_markdown(summary, 'loafing.png')
    assert '| run | 2 |' in md and 'vs first' not in md and 'BN re-est.' not in md
