"""Flush-to-zero of subnormal floats on every CPU thread: checked by behaviour in fresh processes with two
threads (the flag is per thread, and the rest of the suite runs single-threaded)."""
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from gsm import host_kernels
from gsm.denormals import openmp_runtime_path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# x86 processors have the flush-to-zero and denormals-are-zero modes (SSE3, part of x86-64).
pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the processor has no flush-to-zero mode")

# Runs first in every child: start torch's OpenMP pool on two threads, as a user's code does long before it
# builds an optimizer (weight initialisation, data preparation).
_START_POOL = """
import torch
torch.set_num_threads(2)
torch.full((1 << 20,), 1.0).mul_(2.0)
from gsm.denormals import subnormal_products_flushed
"""


def _run_two_threads(body: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    result = subprocess.run([sys.executable, "-c", _START_POOL + textwrap.dedent(body)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def a_running_pool() -> dict:
    """What one fresh process with a running two-thread pool observes, step by step (one process for the
    whole sequence: each step starts from the state the previous one left)."""
    out = _run_two_threads("""
        import json
        from gsm.denormals import flush_denormals, set_flush_denormals
        seen = {"at start": subnormal_products_flushed()}
        seen["set_flush_denormal"] = [torch.set_flush_denormal(True), subnormal_products_flushed()]
        tiny = torch.full((1 << 20,), 1e-30)
        seen["flush_denormals"] = [flush_denormals(), subnormal_products_flushed(),
                                   int(torch.count_nonzero(tiny * 1e-10))]
        seen["off again"] = [set_flush_denormals(False), subnormal_products_flushed()]
        # A user who only builds the optimizer gets the mode; a late GSM state (passive weights near 1e-37 and
        # their momentum) then never holds a subnormal weight or buffer.
        from gsm import GSM
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(256, 256) * 1e-36)
        optimizer = GSM([weight], lr=0.1, momentum=0.99, weight_decay=5e-4, nonzero_ratio=0.01)
        for _ in range(30):
            weight.grad = torch.randn(256, 256)
            optimizer.step()
        def subnormals(t):
            return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())
        seen["GSM"] = [subnormal_products_flushed(), subnormals(weight),
                       subnormals(optimizer.state[weight]["momentum_buffer"])]
        print(json.dumps(seen))
    """)
    return json.loads(out)


def test_set_flush_denormal_alone_misses_the_running_pool(a_running_pool):
    # The hazard the module exists for: the flag is per thread, so half of the probe stays subnormal.
    assert a_running_pool["at start"] is False
    assert a_running_pool["set_flush_denormal"] == [True, None]  # None: flushed on some threads only


def test_flush_denormals_reaches_every_thread_of_a_running_pool(a_running_pool):
    assert a_running_pool["flush_denormals"] == [True, True, 0]


def test_flushing_can_be_turned_off_again_on_every_thread(a_running_pool):
    assert a_running_pool["off again"] == [True, False]


def test_gsm_on_cpu_parameters_flushes_every_thread(a_running_pool):
    assert a_running_pool["GSM"] == [True, 0, 0]


@pytest.mark.parametrize("argv, pipeline", [(["gsm/gsm_lottery_ticket_lenet300.py", "60"], "gsm.experiments.lottery.run_lottery"),
                                            (["gsm/gsm_rc56.py"], "gsm.experiments.rc56.run_resnet")])
def test_scripts_flush_at_start_up(argv, pipeline):
    # The script's own __main__, with its pipeline replaced by the probe: what the training would start with.
    module, name = pipeline.rsplit(".", 1)
    out = _run_two_threads(f"""
        import importlib, runpy, sys
        before = subnormal_products_flushed()
        setattr(importlib.import_module("{module}"), "{name}", lambda config: print(before, subnormal_products_flushed()))
        sys.argv = {argv + ["--device", "cpu"]!r}
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as exc:
            print("exit", exc.code)
    """)
    assert out.split() == ["False", "True", "exit", "0"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the runtime is found in /proc/self/maps")
def test_torchs_openmp_runtime_is_found_beside_a_foreign_one(tmp_path):
    """With a second OpenMP runtime loaded (a copy of torch's under a name that sorts first, as another
    extension may bring), the kernels still run on torch's: the one whose thread count follows
    torch.set_num_threads."""
    torchs = openmp_runtime_path()
    if torchs is None:
        pytest.skip("torch computes without an OpenMP runtime here")
    # Where the copy's path sorts before torch's (as a search by name would find it first), when possible.
    shm = "/dev/shm"
    folder = tempfile.mkdtemp(dir=shm) if os.access(shm, os.W_OK) and shm < torchs else str(tmp_path)
    foreign = os.path.join(folder, "libgomp.so.1")
    shutil.copyfile(torchs, foreign)
    script = textwrap.dedent(f"""
        import ctypes, torch
        ctypes.CDLL({foreign!r}).omp_get_max_threads()
        from gsm.denormals import _loaded_openmp_runtimes, openmp_runtime_path
        from gsm import host_kernels
        assert len(_loaded_openmp_runtimes()) == 2, _loaded_openmp_runtimes()
        print(openmp_runtime_path())
        print(host_kernels.status())
    """)
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    found, status = result.stdout.splitlines()
    assert found == torchs
    assert "torch's OpenMP pool" in status or not host_kernels.available()
