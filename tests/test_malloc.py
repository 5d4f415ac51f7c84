"""glibc malloc tuning (uniform_vit.utils.malloc): applied by the CLI, keeps freed tensor pages, can be turned off.

mallopt settings last for the whole process, so every check runs in a fresh interpreter. The page-fault counts
(getrusage) do not depend on timing or machine load.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from uniform_vit.utils import malloc

glibc = pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
                           reason='mallopt tuning applies to glibc only')

# A "training step" in miniature: 192 MB of 8 MB tensors, allocated and freed together, as activations are. Freed
# at once they coalesce at the top of the heap, above the 64 MiB that glibc's adaptive trim threshold can reach.
_WORKLOAD = r'''
import json, resource, sys
import torch
from uniform_vit.utils.malloc import allocator_state, tune_allocator
applied = tune_allocator() if sys.argv[1] == 'tune' else False
def step():
    ts = [torch.ones(2 << 20) for _ in range(24)]
    return sum(float(t[-1]) for t in ts)
for _ in range(3):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10
print(json.dumps(dict(applied=applied, state=allocator_state(), faults=faults)))
'''


def _run(code: str, *args: str, env: dict | None = None) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if k not in ('UNIFORM_VIT_MALLOC', *malloc._GLIBC_ENV)} | (env or {})
    out = subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_tuned_allocator_stops_refaulting_freed_tensors():
    plain, tuned = _run(_WORKLOAD, 'plain'), _run(_WORKLOAD, 'tune')
    assert plain['applied'] is False and plain['state'] is None
    assert tuned['applied'] is True
    assert tuned['state'] == {'trim_threshold': 1 << 30, 'mmap_threshold': 32 << 20}
    # glibc as it comes maps the 49,152 pages of a step in again every time (mmap'd or trimmed); tuned, none
    assert plain['faults'] >= 10_000, plain
    assert tuned['faults'] <= 16, tuned


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
