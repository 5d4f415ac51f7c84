"""glibc malloc tuning (uniform_vit.utils.malloc): applied by the CLI, keeps freed tensor pages, can be turned off.

mallopt settings last for the whole process, so every check runs in a fresh interpreter. The page-fault counts
(getrusage) do not depend on timing or machine load.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from uniform_vit.utils import malloc

glibc = pytest.mark.skipif(not malloc.on_glibc(), reason='mallopt tuning applies to glibc only')

# Two workloads, each timed after warm-up as page faults per step. 'tensors': 192 MB of 8 MB tensors allocated and
# freed together. Tuned, their pages stay in the process every time; glibc as it comes either hands them back (they
# coalesce at the top of the heap, above the 64 MiB its adaptive trim threshold can reach) or, when a small block
# that outlives the step lands above them, keeps them: which one depends on the heap's layout after the imports (one
# PYTHONHASHSEED in three keeps them), so this workload only pins the tuned side. 'train': a real SGD step of a small
# conv net on a 48x1x96x96 batch (28 MB maps, below the 32 MiB mmap threshold), the allocation pattern of
# `uniform-vit train`; as it comes glibc refaulted 10,358-70,461 pages a step over 24 hash seeds, tuned 0-1,382.
_WORKLOAD = r'''
import json, resource, sys
import torch
from uniform_vit.utils.malloc import allocator_state, tune_allocator
applied = tune_allocator() if sys.argv[1] == 'tune' else False
torch.set_num_threads(1)
torch.manual_seed(0)
if sys.argv[2] == 'tensors':
    def step():
        ts = [torch.ones(2 << 20) for _ in range(24)]
        return sum(float(t[-1]) for t in ts)
else:
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    x, y = torch.randn(48, 1, 96, 96), torch.randint(0, 10, (48,))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
for _ in range(5):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10
print(json.dumps(dict(applied=applied, state=allocator_state(), faults=faults)))
'''


def _run(code: str, *args: str, env: dict | None = None) -> dict:
    import json

    # glibc as it comes: no opt-out, no glibc variables, no preloaded allocator from the caller's environment
    drop = ('UNIFORM_VIT_MALLOC', 'LD_PRELOAD', *malloc._GLIBC_ENV)
    env = {k: v for k, v in os.environ.items() if k not in drop} | (env or {})
    out = subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_tuned_allocator_stops_refaulting_freed_tensors():
    plain, tuned = _run(_WORKLOAD, 'plain', 'train'), _run(_WORKLOAD, 'tune', 'train')
    assert plain['applied'] is False and plain['state'] is None
    assert tuned['applied'] is True
    assert tuned['state'] == {'trim_threshold': 1 << 30, 'mmap_threshold': 32 << 20}
    # a training step: glibc as it comes maps thousands of freed pages in again every step; tuned, a fifth at most
    assert plain['faults'] >= 5_000, plain
    assert tuned['faults'] <= plain['faults'] / 5, (plain, tuned)
    # the 49,152 pages of 192 MB of tensors freed together: tuned, none of them come back as faults
    tensors = _run(_WORKLOAD, 'tune', 'tensors')
    assert tensors['applied'] is True
    assert tensors['faults'] <= 16, tensors


@glibc
@pytest.mark.parametrize('env', [{'UNIFORM_VIT_MALLOC': 'default'}, {'MALLOC_TRIM_THRESHOLD_': '131072'},
                                 {'LD_PRELOAD': '/usr/lib/libjemalloc.so.2-not-loaded'}])
def test_opt_out_and_user_settings_win(env):
    code = ('import json; from uniform_vit.utils.malloc import tune_allocator, allocator_state, allocator_label; '
            'print(json.dumps(dict(applied=tune_allocator(), state=allocator_state(), label=allocator_label())))')
    env = dict(env)
    if 'LD_PRELOAD' in env:  # only the variable's text is read; do not really preload a missing library
        code = 'import os; os.environ["LD_PRELOAD"] = "libjemalloc.so.2"; ' + code
        env = {}
    got = _run(code, env=env)
    label = 'jemalloc' if 'LD_PRELOAD' in code else 'default'  # the banner names a preloaded allocator
    assert got == {'applied': False, 'state': None, 'label': label}


@glibc
def test_cli_tunes_before_running_a_command():
    code = ('import contextlib, io, json\n'
            'from uniform_vit.cli.main import main\n'
            'from uniform_vit.utils.malloc import allocator_state\n'
            'with contextlib.redirect_stdout(io.StringIO()):\n'
            '    rc = main(["models"])\n'
            'print(json.dumps(dict(rc=rc, state=allocator_state())))')
    got = _run(code)
    assert got['rc'] == 0
    assert got['state'] == {'trim_threshold': 1 << 30, 'mmap_threshold': 32 << 20}


def test_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match='mmap_threshold'):
        malloc.tune_allocator(mmap_threshold=64 << 20)
    with pytest.raises(ValueError, match='trim_threshold'):
        malloc.tune_allocator(trim_threshold=0)
