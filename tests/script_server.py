"""Runs the experiment scripts for the tests: imports torch and the project once, then for each request (a JSON
line on stdin) forks a child that runs the script as `python SCRIPT ARGS` would (its `__main__`, its folder first
on sys.path, the request's folder, environment and output files), optionally armed to be killed as
tests/kill_run.py arms it, and answers its exit status (negative: killed by that signal), one JSON line each."""
import json
import os
import runpy
import signal
import sys
import time
import traceback

import torch  # noqa: F401  (imported once here, inherited by every child)
import torch._dynamo  # noqa: F401  (what a torch optimizer's first construction imports: seconds)
import torch.distributed.tensor  # noqa: F401
import torch.utils.tensorboard  # noqa: F401

import dataset  # noqa: F401
import gsm.experiments.cli  # noqa: F401
import gsm.experiments.lottery  # noqa: F401
import gsm.experiments.rc56  # noqa: F401
import kill_run


def child(request: dict) -> int:
    """In the forked child: become the script's process, run it, return its exit status."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    sys.stdin = open(0, closefd=False)
    if request["kill_point"]:
        kill_run.arm(json.loads(request["kill_point"]))
    script = request["script"]
    sys.argv = [script, *request["args"]]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: B902 - as the interpreter would: the traceback, exit 1
        traceback.print_exc()
        return 1


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                status = child(request)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        deadline = time.monotonic() + request["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"returncode": code}), flush=True)


if __name__ == "__main__":
    serve()
