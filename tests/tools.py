"""Running the project's command-line tools from tests, as a user would: a subprocess in the repository."""

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tool(tool, args, env=None, wait=True, timeout=300, cwd=ROOT, **kw):
    """`python tool args` in the repository, with `env` added to the environment; the finished process
    (text stdout / stderr captured), or with wait=False the running one (in a session of its own, so that
    os.killpg ends its decode workers too)."""
    cmd = [sys.executable, os.path.join(ROOT, tool), *map(str, args)]
    env = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, **kw)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
