"""Shared by tests/test_faults.py and tests/test_bad_inputs.py: running the experiment scripts (as processes
or in process through their own `main` and `gsm.experiments.cli.run_main`) and fingerprinting the files they leave."""
from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from gsm.experiments.cli import run_main

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "lenet300": REPO_ROOT / "gsm" / "gsm_lottery_ticket_lenet300.py",
    "lenet5": REPO_ROOT / "gsm" / "gsm_lottery_ticket_lenet5.py",
    "rc56": REPO_ROOT / "gsm" / "gsm_rc56.py",
    "show_log": REPO_ROOT / "show_log.py",
    "display_hdf5": REPO_ROOT / "display_hdf5.py",
}
# The module whose `main(argv)` each script's `__main__` block runs.
MODULES = {"lenet300": "gsm.gsm_lottery_ticket_lenet300", "lenet5": "gsm.gsm_lottery_ticket_lenet5",
           "rc56": "gsm.gsm_rc56", "show_log": "show_log", "display_hdf5": "display_hdf5"}
# Scripts whose `__main__` goes through run_main (show_log and display_hdf5 report their own errors).
RUN_MAIN_SCRIPTS = ("lenet300", "lenet5", "rc56")
KILL_RUN = Path(__file__).resolve().parent / "kill_run.py"


def script_env(**extra: str) -> dict:
    """One thread per process (several share 2 cores, and results are compared bit for bit), no dataset
    variables, and any download refused at once by a proxy on a closed local port."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MNIST_PATH", "CIFAR10_PATH", "no_proxy", "NO_PROXY")}
    closed_port = "http://127.0.0.1:9"
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", http_proxy=closed_port, https_proxy=closed_port,
               HTTP_PROXY=closed_port, HTTPS_PROXY=closed_port)
    env.update(extra)
    return env


def run_script(script: str, args: List, cwd: Path, kill_point: Optional[str] = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` as a process; with `kill_point` (JSON), through tests/kill_run.py."""
    prefix = [str(KILL_RUN), kill_point] if kill_point else []
    return subprocess.run([sys.executable, *prefix, str(SCRIPTS[script]), *map(str, args)], cwd=cwd,
                          env=script_env(), capture_output=True, text=True, timeout=timeout)


def call_script(script: str, argv: List, monkeypatch, capsys) -> Tuple[object, str, str]:
    """(exit status, stdout, stderr) of `python SCRIPT ARGV`, run in this process: the scripts' `__main__`
    blocks only call `sys.exit(run_main(main))` (or `sys.exit(main())`), so this is the same code path."""
    module = importlib.import_module(MODULES[script])
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS[script])])  # argparse and run_main name the script from it
    capsys.readouterr()
    try:
        if script in RUN_MAIN_SCRIPTS:
            status = run_main(module.main, [str(a) for a in argv])
        else:
            status = module.main([str(a) for a in argv])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def fingerprint(root: Path) -> Dict[str, Tuple[str, int]]:
    """{relative path: (sha256 of the bytes, mtime_ns)} of every file under root, but the run locks (which
    every run takes, and which hold no result)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(Path(root).rglob("*")) if p.is_file() and ".locks" not in p.relative_to(root).parts}


def entries(folder: Path) -> List[str]:
    """The sorted names in a folder, without the run locks' folder and the TensorBoard event files (one more
    each time a stage resumes)."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name != ".locks" and not p.name.startswith("events.out.tfevents"))
