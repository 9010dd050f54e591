"""Shared by tests/test_faults.py and tests/test_bad_inputs.py: running the experiment scripts (as processes
or in process through their own `main` and `gsm.experiments.cli.run_main`) and fingerprinting the files they leave."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
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


def run_script(script: str, args: List, cwd: Path, kill_point: Optional[str] = None, timeout: float = 300,
               fresh_interpreter: bool = False, **env: str) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` as a process of its own, in `script_env(**env)`; with `kill_point` (JSON), armed as
    tests/kill_run.py arms it. By default the process is forked from a server that has imported torch and the
    project once (each fresh interpreter spends seconds importing torch); `fresh_interpreter` starts `python`
    itself."""
    if fresh_interpreter:
        prefix = [str(KILL_RUN), kill_point] if kill_point else []
        return subprocess.run([sys.executable, *prefix, str(SCRIPTS[script]), *map(str, args)], cwd=cwd,
                              env=script_env(**env), capture_output=True, text=True, timeout=timeout)
    return _SERVERS.run(str(SCRIPTS[script]), [str(a) for a in args], cwd, kill_point, timeout, script_env(**env))


class _ScriptServers:
    """Servers that have imported torch and the project, each forking one script process at a time (so that
    runs side by side take one server each). A forked child starts from the server's idle state: no thread
    pool running, one OpenMP thread (the server's environment), nothing trained."""

    def __init__(self) -> None:
        self.idle: List[subprocess.Popen] = []
        self.lock = threading.Lock()

    def run(self, script: str, args: List[str], cwd: Path, kill_point: Optional[str], timeout: float,
            env: Dict[str, str]) -> subprocess.CompletedProcess:
        with self.lock:
            server = self.idle.pop() if self.idle else None
        if server is None or server.poll() is not None:
            server = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "script_server.py")],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=script_env(), text=True)
        with tempfile.TemporaryDirectory() as folder:
            request = {"script": script, "args": args, "cwd": str(cwd), "kill_point": kill_point, "env": env,
                       "timeout": timeout, "stdout": os.path.join(folder, "stdout"),
                       "stderr": os.path.join(folder, "stderr")}
            server.stdin.write(json.dumps(request) + "\n")
            server.stdin.flush()
            reply = server.stdout.readline()
            if not reply:
                raise RuntimeError(f"the script server died running {script} {args}")
            returncode = json.loads(reply)["returncode"]
            output = [Path(request[name]).read_text(errors="replace") for name in ("stdout", "stderr")]
        with self.lock:
            self.idle.append(server)
        return subprocess.CompletedProcess([script, *args], returncode, *output)


_SERVERS = _ScriptServers()


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
