"""Deploy the subnetworks of a trained model: each as a smaller plain timm model, measured, optionally on the Hub.

Stimulative Training makes the shallower subnetworks of a residual network good; this module takes them out. For
every requested subnet it builds the architecture with fewer blocks (`timm_stim.subnet_model`), checks its logits
against the in-place subnet, optionally re-estimates its BatchNorm statistics, measures parameters, FLOPs, CPU
latency at batch 1 and 32 and top-1/top-5, and writes a standalone timm model folder (model.safetensors,
config.json with the constructor arguments, a model card) that `timm.create_model('local-dir:...')` or, once pushed,
`timm.create_model('hf-hub:...')` loads without timm_stim. The full model is measured too, for the Pareto plot.

CLI::

    python -m timm_stim.export output/train/st-resnet50 --depths 2,2,2,2 3,4,4,3 --output output/subnets
    python -m timm_stim.export output/train/st-resnet50 --pareto 3 --bn-recal 2000 \\
        --push-to-hub --hub-repo-id owner/resnet50-st

Subnets: `--depths` (blocks kept per stage, a prefix of each stage; per pseudo-stage for flat models such as ViT,
as in `timm_stim.loafing`), `--keep` (one 0/1 flag per residual block) or `--pareto N` (N subnets spread along the
accuracy-vs-FLOPs front of a loafing table, read with `--loafing-table` or computed over `--subnets`).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .blocks import BlockLayout, SubnetSpec, find_residual_blocks
from .bn import recalibrate_bn
from .checkpoint import DATA_CONFIG_KEYS, ModelSource, create_model_from_source, resolve_model_source
from .cli import (OneLineArgumentParser, UsageError, add_eval_data_args, add_model_source_args, check_cli_args,
                  check_output_folder, data_config_overrides, eval_data_args, one_line, parse_model_kwargs,
                  report_error)
from .data import create_eval_loader, is_digits, resolve_eval_data_config
from .model_folder import check_export_target, export_timm_model
from .run_state import replace_file
from .hub import HubPushError, check_can_push, check_repo_id, push_folder_to_hub
from .loafing import cache_batches, evaluate_subnets, make_subnet_specs, parse_depths
from .loafing_report import write_results
from .export_report import machine_description, measure_model, plot_pareto, read_loafing_table, select_pareto, \
    family_markdown, fmt, subnet_card
from .sampler import split_flat_layout
from .skip import resolve_spec
from .subnet_model import SubnetExportError, SubnetModel, UnsupportedFamilyError, create_subnet_model, \
    find_depth_argument

__all__ = ['SUBNET_FIELDS', 'parse_keep_mask', 'parse_subnets', 'check_export_spec', 'export_subnets',
           'export_after_training', 'main']

# Files the export writes directly under --output (besides one folder per subnet and loafing/).
_SUMMARY_FILES = ('subnets.csv', 'subnets.json', 'README.md', 'pareto.png')
# Columns of subnets.csv (subnets.json holds the same per row).
SUBNET_FIELDS = (
    'name', 'depths', 'keep', 'is_full', 'depth_argument', 'params', 'flops', 'latency_b1_ms', 'latency_b32_ms',
    'top1', 'top5', 'bn_recal_images', 'max_logit_diff', 'folder', 'repo_id', 'flops_note',
)


# ------------------------------------------------------------------------------------------------- subnet choice


def parse_keep_mask(text: str) -> Tuple[bool, ...]:
    """'110111' or '1,1,0,1' -> keep flags, one per residual block."""
    flags = text.replace(',', '').replace(' ', '')
    if not flags or set(flags) - {'0', '1'}:
        raise ValueError(f'invalid keep-mask {text!r}: give one 0/1 flag per residual block, e.g. 11011101')
    return tuple(f == '1' for f in flags)


def parse_subnets(text: str) -> Dict[str, Any]:
    """A subnet SPEC as train_stim.py --export-subnets takes it: items separated by ';' or spaces, each a depth
    vector (`3,4,4,3`), a keep-mask (`keep:11011101`) or `pareto:N`."""
    plan: Dict[str, Any] = dict(depths=[], keep=[], pareto=0)
    for item in text.replace(';', ' ').split():
        kind, sep, value = item.partition(':')
        if sep and kind == 'keep':
            parse_keep_mask(value)
            plan['keep'].append(value)
        elif sep and kind == 'pareto':
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f'invalid {item!r}: pareto:N needs N >= 1')
            plan['pareto'] = int(value)
        else:
            parse_depths(item)
            plan['depths'].append(item)
    if not (plan['depths'] or plan['keep'] or plan['pareto']):
        raise ValueError(f'no subnet in {text!r}: give depth vectors (3,4,4,3), keep:MASK or pareto:N')
    return plan


def _spec_name(layout: BlockLayout, spec: SubnetSpec) -> str:
    """'d1-2-2-1' when the spec is a prefix depth vector, else 'k' + its keep-mask."""
    depths = layout.depths(spec)
    if layout.spec_from_depths(depths) == spec:
        return 'd' + '-'.join(map(str, depths))
    return 'k' + ''.join('1' if k else '0' for k in spec.keep)


def export_subnets(
        model: nn.Module,
        layout: BlockLayout,
        specs: Sequence[SubnetSpec],
        output_dir: Union[str, Path],
        input_size: Sequence[int],
        val_batches: Optional[Sequence] = None,
        train_batches: Optional[Sequence] = None,
        bn_recal_images: int = 0,
        device: Optional[torch.device] = None,
        data_config: Optional[Dict[str, Any]] = None,
        model_args: Optional[Dict[str, Any]] = None,
        parent: str = 'an ST-trained model',
        dataset: str = 'an unspecified dataset',
        train_args: Optional[Dict[str, Any]] = None,
        hub_repo_id: Optional[str] = None,
        latency_repeats: int = 10,
        license: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Build, check, measure and write every subnet of `specs` as a plain timm model folder under `output_dir`.

    The full model is measured too (and exported only if it is one of `specs`). Writes `<arch>-<name>/` per subnet
    (`name` = d<depths> for prefix subnets, k<keep-mask> otherwise), subnets.csv/.json and pareto.png; returns one
    row per model (keys SUBNET_FIELDS). With `hub_repo_id`, each subnet's card names its future repo
    `<hub_repo_id>-<name>` (push with `push_folder_to_hub`).
    """
    out = Path(output_dir)
    arch = model.pretrained_cfg['architecture']
    full_spec = layout.full_spec()
    wanted = list(dict.fromkeys(resolve_spec(layout, s) for s in specs))
    machine = machine_description()
    rows, built = [], []
    for spec in [full_spec] + [s for s in wanted if s != full_spec]:
        small: SubnetModel = create_subnet_model(model, layout, spec, model_args, input_size=input_size)
        if bn_recal_images > 0:
            used = recalibrate_bn(small.model, train_batches, num_images=bn_recal_images, device=device)
            small.model.eval()
        name = _spec_name(layout, spec)
        row = dict(name=name, depths=','.join(map(str, small.depths)),
                   keep=''.join('1' if k else '0' for k in spec.keep),
                   is_full=spec == full_spec, depth_argument=f'{small.depth_argument.name}='
                   f'{json.dumps(small.depth_argument.value)}', bn_recal_images=used if bn_recal_images > 0 else 0,
                   max_logit_diff=small.max_logit_diff, folder=None, repo_id=None)
        row.update(measure_model(small.model, input_size, val_batches, device, latency_repeats))
        if spec in wanted:
            row['folder'] = str(out / f'{arch}-{name}')
            row['repo_id'] = f'{hub_repo_id}-{name}' if hub_repo_id else None
        rows.append(row)
        built.append(small)
        flops = row['flops'] if row['flops'] is not None else f"n/a ({row['flops_note']})"
        print(f"{name}: {row['depth_argument']} params {row['params']} flops {flops} "
              f"latency b1 {row['latency_b1_ms']:.2f} ms top-1 {fmt(row.get('top1'))}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    _refuse_links(out, arch, [_spec_name(layout, s) for s in wanted])
    plot = plot_pareto(rows, out / 'pareto.png', title=f'{arch} subnetworks of {parent}: top-1 vs CPU latency')
    full = rows[0]
    for row, small in zip(rows, built):
        if row['folder'] is None:
            continue
        card = subnet_card(row, full, rows, parent, arch, dataset, train_args or {}, machine, license)
        export_timm_model(small.model.cpu(), row['folder'], arch, model_args=small.model_args, model_card=card,
                          extra_files=[plot], data_config=data_config)
    _write_rows(rows, out)
    text = f'# {arch} subnetworks of {parent}\n\n' + family_markdown(rows, machine)
    replace_file(str(out / 'README.md'), lambda f: f.write(text), encoding='utf-8')
    return rows


def _write_rows(rows: Sequence[Dict[str, Any]], out: Path) -> None:
    """subnets.csv and subnets.json, each written whole under a new name and swapped in (never through a link)."""
    def write_csv(f: Any) -> None:
        writer = csv.DictWriter(f, fieldnames=SUBNET_FIELDS, extrasaction='ignore')
        writer.writeheader()
        writer.writerows({k: ('' if r.get(k) is None else r.get(k)) for k in SUBNET_FIELDS} for r in rows)
    replace_file(str(out / 'subnets.csv'), write_csv, newline='', encoding='utf-8')
    replace_file(str(out / 'subnets.json'), lambda f: f.write(json.dumps(list(rows), indent=2) + '\n'),
                 encoding='utf-8')


def _refuse_links(out: Path, arch: str, names: Sequence[str]) -> None:
    """Nothing the export writes may be a symbolic link (a folder from elsewhere must not redirect our writes)."""
    targets = [out / n for n in _SUMMARY_FILES] + [out / 'loafing'] + [out / f'{arch}-{n}' for n in names]
    links = [str(t) for t in targets if t.is_symlink()]
    if links:
        raise UsageError(f'--output {out}: {links[0]} is a symbolic link; the export writes there and never follows '
                         f'links: remove it or choose another --output')


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog='python -m timm_stim.export',
        description='Export subnetworks of a trained model as smaller plain timm models (measured, with model cards), '
                    'and optionally push them to the Hugging Face Hub, one repo per depth.')
    parser.add_argument('source', metavar='MODEL',
                        help='train_stim.py output folder, checkpoint file, export folder, local-dir:PATH or '
                             'hf-hub:NAME')
    group = parser.add_argument_group('subnets (at least one)')
    group.add_argument('--depths', nargs='+', action='extend', default=[], metavar='D1,D2,..',
                       help='blocks kept per stage (a prefix of each stage; per pseudo-stage for flat models), '
                            'e.g. --depths 1,1,1,1 2,2,3,2; repeatable')
    group.add_argument('--keep', nargs='+', action='extend', default=[], metavar='MASK',
                       help='one 0/1 flag per residual block, e.g. 11011101 (blocks in execution order)')
    group.add_argument('--pareto', type=int, default=0, metavar='N',
                       help='the N subnets spread along the accuracy-vs-FLOPs front of a loafing table')
    group.add_argument('--loafing-table', default=None, metavar='FILE',
                       help='loafing.csv/.json (or its folder) for --pareto; default: computed here')
    group.add_argument('--loafing-model', default=None, help='model label in a loafing table holding several')
    group.add_argument('--subnets', default='all', help="subnets evaluated for --pareto: 'all' or 'random:N'")
    group.add_argument('--space', default='st', help="subnet space for --pareto: 'st', 'st++' or a K-list")
    group.add_argument('--pseudo-stages', type=int, default=4, help='pseudo-stages of flat (ViT) models')
    add_model_source_args(parser)
    add_eval_data_args(parser, batch_size=128, workers=2)
    group = parser.add_argument_group('export')
    group.add_argument('--seed', type=int, default=0, help='seed of random:N and of data subsets')
    group.add_argument('--output', default='output/subnets', help='folder for the subnet folders and the summary')
    group.add_argument('--bn-recal', type=int, default=0, metavar='N',
                       help='re-estimate each subnet\'s BatchNorm statistics on N training images before export')
    group.add_argument('--latency-repeats', type=int, default=10, help='timed CPU forwards per batch size')
    group.add_argument('--device', default=None, help='for accuracy (default: cuda if available); latency is CPU')
    group.add_argument('--license', default=None, help='license for the model cards, e.g. apache-2.0')
    group = parser.add_argument_group('Hub')
    group.add_argument('--push-to-hub', action='store_true', help='push every exported subnet, one repo per depth')
    group.add_argument('--hub-repo-id', default=None,
                       help='owner/name; each subnet goes to owner/name-d<depths> (or -k<keep-mask>)')
    group.add_argument('--hub-private', action='store_true')
    return parser


@dataclass
class _Plan:
    """Everything checked before any work: the model, its layout, the subnets and the data."""
    args: argparse.Namespace
    model: nn.Module
    source: Any
    layout: BlockLayout
    specs: List[SubnetSpec]
    data: Dict[str, Any]
    data_config: Dict[str, Any]
    device: torch.device
    extra: Dict[str, Any] = field(default_factory=dict)


def _prepare(args: argparse.Namespace) -> _Plan:
    """Check the command line, load the model and resolve the subnets; any ValueError/OSError here is bad input."""
    if not (args.depths or args.keep or args.pareto):
        raise ValueError('no subnet requested: give --depths D1,D2,.., --keep MASK or --pareto N')
    check_cli_args(args, positive=('latency_repeats', 'pseudo_stages'), non_negative=('pareto', 'bn_recal'))
    check_output_folder(args.output)
    if args.push_to_hub:
        if not args.hub_repo_id:
            raise ValueError('--push-to-hub needs --hub-repo-id owner/name (each subnet goes to owner/name-d<depths>)')
        check_repo_id(args.hub_repo_id)
    for text in args.depths:  # bad subnet syntax is refused before the model is loaded
        parse_depths(text)
    for text in args.keep:
        parse_keep_mask(text)
    if args.pareto and args.loafing_table and not Path(args.loafing_table).exists():
        raise FileNotFoundError(f'--loafing-table {args.loafing_table} does not exist')
    source = resolve_model_source(args.source, args.model, args.num_classes, parse_model_kwargs(args.model_kwargs),
                                  args.checkpoint, args.use_ema)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    model, source = create_model_from_source(source, device=device)
    return _plan_for_model(args, model, source, device)


def _plan_for_model(args: argparse.Namespace, model: nn.Module, source: ModelSource, device: torch.device) -> _Plan:
    """The checks that need the model: data config, layout, family, subnets, output folders, push possible."""
    depth_vectors = [parse_depths(d) for d in args.depths]
    masks = [parse_keep_mask(m) for m in args.keep]
    data = eval_data_args(args, source.train_args)
    digits = is_digits(data['dataset'], data['data_dir'])
    data_config = resolve_eval_data_config(model, data_config_overrides(args), source.data_config, digits)
    input_size = tuple(data_config['input_size'])
    layout = split_flat_layout(find_residual_blocks(model, input_size=input_size), args.pseudo_stages)
    find_depth_argument(model, layout, layout.full_spec(), source.model_kwargs)  # refuses unsupported families
    specs = [layout.spec_from_depths(d) for d in depth_vectors] + [resolve_spec(layout, m) for m in masks]
    for spec in specs:  # every subnet expressible by the constructor, before any work
        find_depth_argument(model, layout, spec, source.model_kwargs)
    arch = model.pretrained_cfg['architecture']
    for spec in specs:
        check_export_target(Path(args.output) / f'{arch}-{_spec_name(layout, spec)}')
    _refuse_links(Path(args.output), arch, [_spec_name(layout, s) for s in specs])
    if args.pareto:  # the table (or the subnets to evaluate) is read now, not after the data is loaded
        if args.loafing_table:
            read_loafing_table(args.loafing_table, args.loafing_model)
        else:
            make_subnet_specs(layout, args.subnets, args.space, None, args.seed, args.pseudo_stages)
    if args.push_to_hub:
        check_can_push()
    return _Plan(args, model, source, layout, specs, data, data_config, device, dict(digits=digits))


def check_export_spec(
        model: nn.Module,
        text: str,
        input_size: Optional[Sequence[int]] = None,
        model_args: Optional[Dict[str, Any]] = None,
        pseudo_stages: int = 4,
) -> None:
    """Check a `train_stim.py --export-subnets` SPEC against the real `model` before training starts.

    Every depth vector and keep-mask must fit the model's block layout (at `input_size`, default the model's
    pretrained_cfg input size) and be expressible by its timm constructor; pareto:N needs a family that can be
    exported at all. Raises ValueError with a one-line message naming --export-subnets otherwise; writes nothing.
    """
    try:
        plan = parse_subnets(text)
        size = tuple(input_size or model.pretrained_cfg.get('input_size') or (3, 224, 224))
        layout = split_flat_layout(find_residual_blocks(model, input_size=size), pseudo_stages)
        specs = [layout.spec_from_depths(parse_depths(d)) for d in plan['depths']]
        specs += [resolve_spec(layout, parse_keep_mask(m)) for m in plan['keep']]
        for spec in specs or [layout.full_spec()]:
            find_depth_argument(model, layout, spec, model_args)
    except Exception as e:  # any failure here is a SPEC the run could not export
        raise ValueError(f'--export-subnets {text!r}: {one_line(e)}') from None


def _load_batches(plan: _Plan) -> None:
    """The validation (and --bn-recal training) batches, loaded during set-up: a bad data flag is bad input."""
    args, data, config = plan.args, plan.data, plan.data_config
    flags = f"--dataset {data['dataset'] or '(image folder)'} --data-dir {data['data_dir'] or '(none)'}"
    try:
        plan.extra['val_batches'] = cache_batches(create_eval_loader(
            data['dataset'], data['data_dir'], data['val_split'], config, args.batch_size, args.workers,
            args.val_num_samples, args.seed, plan.device))
        plan.extra['train_batches'] = None
        if args.bn_recal > 0:
            plan.extra['train_batches'] = cache_batches(create_eval_loader(
                data['dataset'], data['data_dir'], data['train_split'], config, args.batch_size, args.workers,
                args.bn_recal, args.seed, plan.device))
    except Exception as e:  # named by the data flags that chose it
        raise ValueError(f'{flags}: cannot load the data: {one_line(e)}') from None


def _pareto_specs(plan: _Plan, val_batches: Sequence, train_batches: Optional[Sequence]) -> List[SubnetSpec]:
    """--pareto N: read the loafing table or compute it over --subnets, then pick N subnets along its front."""
    args = plan.args
    if args.loafing_table:
        rows = read_loafing_table(args.loafing_table, args.loafing_model)
    else:
        staged, specs = make_subnet_specs(plan.layout, args.subnets, args.space, None, args.seed, args.pseudo_stages)
        rows = evaluate_subnets(plan.model, staged, specs, val_batches, train_batches, args.bn_recal, plan.device,
                                tuple(plan.data_config['input_size']), plan.source.label)
        write_results(rows, Path(args.output) / 'loafing')
    metric = 'top1_bnrecal' if args.bn_recal and all(r.get('top1_bnrecal') is not None for r in rows) else 'top1'
    chosen = select_pareto(rows, args.pareto, metric)
    print(f"pareto: {len(chosen)} of the front's subnets by {metric}: "
          f"{', '.join(str(r.get('depths', r['keep'])) for r in chosen)}", file=sys.stderr)
    return [resolve_spec(plan.layout, parse_keep_mask(r['keep'])) for r in chosen]


def _parent_label(source: Any) -> str:
    """The parent run as the card names it: the Hub id, else the run folder or file name (never a local path)."""
    if source.kind == 'hub':
        return source.source
    return f'run `{source.label}`'


def _dataset_name(plan: _Plan) -> str:
    if plan.extra['digits']:
        return 'the scikit-learn digits (built into timm_stim)'
    return plan.data['dataset'] or 'an image-folder dataset'


def run(args: argparse.Namespace, plan: Optional[_Plan] = None) -> List[Dict[str, Any]]:
    """The CLI's work after `_prepare`: data, --pareto selection, export, push; returns the rows."""
    plan = plan or _prepare(args)
    config = plan.data_config
    if 'val_batches' not in plan.extra:
        _load_batches(plan)
    val_batches, train_batches = plan.extra['val_batches'], plan.extra['train_batches']
    specs = list(plan.specs)
    if args.pareto:
        specs += _pareto_specs(plan, val_batches, train_batches)
    rows = export_subnets(
        plan.model, plan.layout, specs, args.output, tuple(config['input_size']), val_batches, train_batches,
        args.bn_recal, plan.device, {k: config[k] for k in DATA_CONFIG_KEYS if config.get(k) is not None},
        plan.source.model_kwargs, _parent_label(plan.source), _dataset_name(plan), plan.source.train_args,
        args.hub_repo_id if args.push_to_hub else None, args.latency_repeats, args.license)
    if args.push_to_hub:
        for row in rows:
            if row['folder']:
                url = push_folder_to_hub(row['folder'], row['repo_id'], private=args.hub_private)
                print(f"pushed {row['name']} to {url}", file=sys.stderr)
    return rows


def export_after_training(
        model: nn.Module,
        subnets: str,
        output_dir: Union[str, Path],
        train_args: Dict[str, Any],
        data_config: Dict[str, Any],
        device: Optional[torch.device] = None,
        label: str = '',
) -> List[Dict[str, Any]]:
    """`train_stim.py --export-subnets SPEC`: export the subnets of SPEC (see `parse_subnets`) of the trained
    `model` into `output_dir`, evaluated on the run's validation split with its preprocessing; with the run's
    --push-to-hub / --hub-repo-id each subnet goes to <hub-repo-id>-<name>, with --stim-bn-recal N the subnets'
    BN statistics are re-estimated on N training images. Raises ValueError for a bad SPEC or an unsupported family."""
    plan_items = parse_subnets(subnets)
    argv = ['--output', str(output_dir), '--pareto', str(plan_items['pareto']),
            '--bn-recal', str(int(train_args.get('stim_bn_recal') or 0)),
            '--input-size', *map(str, data_config['input_size'])]
    argv += ['--depths', *plan_items['depths']] if plan_items['depths'] else []
    argv += ['--keep', *plan_items['keep']] if plan_items['keep'] else []
    if train_args.get('push_to_hub') and train_args.get('hub_repo_id'):
        argv += ['--push-to-hub', '--hub-repo-id', str(train_args['hub_repo_id'])]
        argv += ['--hub-private'] if train_args.get('hub_private') else []
    args = _build_parser().parse_args(['-', *argv])
    for key in ('dataset', 'data_dir', 'val_split', 'train_split'):
        setattr(args, key, train_args.get(key) if train_args.get(key) not in ('', None) else getattr(args, key))
    args.workers = int(train_args.get('workers', args.workers))
    model_kwargs = dict(train_args.get('model_kwargs') or {})
    source = ModelSource(
        source=str(output_dir), kind='train_dir', label=label or Path(output_dir).parent.name,
        model_name=train_args.get('model') or model.pretrained_cfg['architecture'],
        num_classes=getattr(model, 'num_classes', None), model_kwargs=model_kwargs, train_args=dict(train_args),
        data_config={k: v for k, v in data_config.items() if k in DATA_CONFIG_KEYS})
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return run(args, _plan_for_model(args, model.eval(), source, device))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 done, 2 bad input or a push that cannot work (found before any file is written), 1 a failure
    while exporting or pushing."""
    try:  # set-up is a transaction: every input is built and checked here, before anything is written
        args = _build_parser().parse_args(argv)
        plan = _prepare(args)
        _load_batches(plan)
    except Exception as e:  # whatever fails in set-up was decided by the command line: one line, exit 2
        return report_error(e, 2)
    try:
        rows = run(args, plan)
    except (HubPushError, SubnetExportError, ValueError, OSError, RuntimeError) as e:
        return report_error(e, 1)
    for row in rows:
        flops = 'n/a' if row['flops'] is None else row['flops']
        print(f"{row['name']}\t{row['depths']}\tparams={row['params']}\tflops={flops}\t"
              f"b1={row['latency_b1_ms']:.2f}ms\tb32={row['latency_b32_ms']:.2f}ms\ttop1={fmt(row.get('top1'))}\t"
              f"{row['folder'] or '(measured only)'}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
