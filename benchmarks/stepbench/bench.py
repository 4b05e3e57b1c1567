"""The step benchmark's shared context: arguments, device, the fixed batch, model factory, timing and clean-up."""
from __future__ import annotations

import datetime
import gc
import logging
import os
import platform
import socket
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

import timm
from timm_stim import smaller_input_kwargs

from .measure import FlopTable, RecompileLimitCounter, device_name, dynamo_stats, sync


class Bench:
    """What every measurement shares: one seeded batch, same-weight models, the step clock, the FLOP table."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.amp_dtype = {'none': None, 'float32': None, 'bfloat16': torch.bfloat16,
                          'float16': torch.float16}[args.amp_dtype]
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.create_kwargs = self._create_kwargs()
        g = torch.Generator().manual_seed(args.seed)
        self.x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(
            self.device, memory_format=self.memory_format)
        self.y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(self.device)
        self.flop_table = FlopTable(self._new_model_raw, args.img_size)
        self.recompile_counter = RecompileLimitCounter()
        logging.getLogger('torch._dynamo').addHandler(self.recompile_counter)
        self.clock = 'wall' if self.device.type == 'cuda' or args.clock == 'wall' else 'cpu'
        self.wall_log: List[float] = []
        self.prewarm_s: Optional[float] = None
        self.prewarm_sizes_done = None

    def _create_kwargs(self) -> Dict[str, Any]:
        kw = dict(num_classes=self.args.num_classes)
        kw.update(smaller_input_kwargs(self.args.model))  # ViT: dynamic_img_size=True (plain rows use it too)
        try:
            with torch.device('meta'):
                timm.create_model(self.args.model, img_size=self.args.img_size, **kw)
            kw['img_size'] = self.args.img_size
        except TypeError:
            pass
        return kw

    def _new_model_raw(self) -> nn.Module:
        return timm.create_model(self.args.model, pretrained=False, **self.create_kwargs)

    def new_model(self) -> nn.Module:
        torch.manual_seed(self.args.seed)
        model = self._new_model_raw().to(self.device)
        model.to(memory_format=self.memory_format)
        model.train()
        return model

    def new_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def timed(self, step: Callable[[], Any], n: int, graph_log: Optional[list] = None) -> List[float]:
        """Times of n steps (CUDA: max of event and wall time; CPU: the --clock; wall times kept in wall_log)."""
        times = []
        cuda = self.device.type == 'cuda'
        self.wall_log = []
        for _ in range(n):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                sync(self.device)
                t0 = time.perf_counter()
                start.record()
                step()
                end.record()
                end.synchronize()
                wall = time.perf_counter() - t0
                # event time excludes host time before the first kernel; take the larger (Python-bound steps)
                times.append(max(start.elapsed_time(end) / 1e3, wall))
            else:
                c0, t0 = time.process_time(), time.perf_counter()
                step()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                self.wall_log.append(wall)
                times.append(cpu if self.clock == 'cpu' else wall)
            if graph_log is not None:
                graph_log.append(dynamo_stats().get('unique_graphs', 0))
        return times

    def cleanup(self):
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()
        if self.args.reset_dynamo:
            try:
                torch._dynamo.reset()
            except Exception:
                pass

    def prewarm_sizes(self) -> None:
        """cudnn.benchmark autotunes every new conv shape; ST++ draws up to ~130 sizes. Run the full net (fwd +
        bwd) once at every ST++ size before timing, so timed steps see steady-state (already tuned) kernels."""
        a = self.args
        if self.prewarm_s is not None or a.prewarm_max_s <= 0:
            return
        from timm_stim.sizes import SizeSampler, resize_batch, size_multiple
        model = self.new_model()
        sizes = list(SizeSampler(a.img_size, a.min_scale, a.stim_sizes or None, size_multiple(model)).sizes)
        t0 = time.perf_counter()
        done = 0
        for size in sizes:
            if time.perf_counter() - t0 > a.prewarm_max_s:
                break
            with self.autocast():
                out = model(resize_batch(self.x, size))
            out.float().mean().backward()
            model.zero_grad(set_to_none=True)
            sync(self.device)
            done += 1
        self.prewarm_s = time.perf_counter() - t0
        self.prewarm_sizes_done = (done, len(sizes))
        self.log(f'pre-warmed cudnn for {done}/{len(sizes)} sizes in {self.prewarm_s:.1f} s')
        del model
        self.cleanup()

    def meta_base(self) -> Dict[str, Any]:
        """The run's environment and arguments (the JSON's 'meta', less the totals main adds)."""
        a = self.args
        return {
            'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
            'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            'host': socket.gethostname(), 'device': device_name(self.device),
            'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
            'cuda': torch.version.cuda,
            'cudnn': torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            'cudnn_benchmark': torch.backends.cudnn.benchmark, 'prewarm_s': self.prewarm_s,
            'prewarm_sizes_done': self.prewarm_sizes_done,
            'threads': torch.get_num_threads(), 'omp_num_threads': os.environ.get('OMP_NUM_THREADS'),
            'args': vars(a), 'create_kwargs': self.create_kwargs, 'clock': self.clock,
            'full_flops': self.flop_table.flops(),
        }

    @staticmethod
    def log(msg: str):
        print(f'[{time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)
