"""Running the project's command-line tools from tests, as a user would: a subprocess in the
repository."""

import contextlib
import importlib
import io
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(tool, args, env=None):
    """`python tool args` in this process: tool's main(args) with `env` added to the environment,
    its stdout and stderr captured and its exit status read from SystemExit as the interpreter would
    (a string: printed to stderr, status 1). For what ends before any work starts (flags, inputs,
    model folders checked at start), at a fraction of a subprocess's cost."""
    module = importlib.import_module(os.path.splitext(os.path.basename(tool))[0])
    out, err, saved = io.StringIO(), io.StringIO(), dict(os.environ)
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.main([str(a) for a in args])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess([tool, *args], code, out.getvalue(), err.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tool(tool, args, env=None, wait=True, timeout=300, cwd=ROOT, **kw):
    """`python tool args` in the repository, with `env` added to the environment; the finished
    process (text stdout / stderr captured), or with wait=False the running one (in a session of its
    own, so that os.killpg ends its decode workers too)."""
    return run_command([sys.executable, os.path.join(ROOT, tool), *map(str, args)], env, wait,
                       timeout, cwd, **kw)


# the processes started with wait=False: conftest kills the groups of those still running
STARTED = []


def run_command(cmd, env=None, wait=True, timeout=300, cwd=ROOT, output=True, **kw):
    """As run_tool, for any command (torchrun): on a timeout or a failing test, its whole process
    group is killed, so no orphan keeps a core busy (with wait=False, at the end of the test).
    output=False: its output goes nowhere (a long run nobody reads must not fill a pipe and
    stall)."""
    env = {**os.environ, **(env or {})}
    pipe = subprocess.PIPE if output else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=True,
                            start_new_session=True, **kw)
    if not wait:
        STARTED.append(proc)
        return proc
    try:
        out, err = proc.communicate(timeout=timeout)
    # a timeout, or the test failing: the tool and every process it started go
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_started():
    """Every process group started with wait=False that is still running: killed, and reaped."""
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()


def stop_a_decode_worker(proc, deadline=60):
    """SIGSTOP on the first decode worker `proc` starts (a decoder stuck on a network disk): its
    pid, or None when proc ended, or the deadline passed, before one started."""
    from plumbing.workers import decode_workers
    end = time.time() + deadline
    while time.time() < end and proc.poll() is None:
        pids = decode_workers(proc.pid)
        if pids:
            os.kill(pids[0], signal.SIGSTOP)
            return pids[0]
        time.sleep(0.005)
    return None
