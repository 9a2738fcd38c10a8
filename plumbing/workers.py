"""Decode workers: fn(item) for many items in parallel processes, with a time limit per item.

Native decoders can crash or hang on a bad file, and a hang cannot be interrupted from Python, so
each call runs in a worker process that is killed and replaced when it takes too long or dies; the
caller gets a VideoError for that item and the rest go on. Workers are isolated `python -I`
subprocesses (no current folder, no PYTHONPATH, no secrets in their environment: they parse
untrusted files) that import this file, data.py and fn's own module (shots.py: no torch, so they
start in a fraction of a second), fed pickled (function, item) messages over their stdin and
answering over their stdout, with heartbeats from a long decode that moves on (heartbeat).
"""

import os
import pickle
import queue
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from multiprocessing.connection import wait

from plumbing.sources import UNREADABLE, VideoError


def _send(stream, obj):
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _read(stream, n):
    """Exactly n bytes (the parent reads its workers unbuffered, so that select() sees every
    message)."""
    parts, got = [], 0
    while got < n:
        part = stream.read(n - got)
        if not part:
            raise EOFError
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _recv(stream):
    n = struct.unpack("<Q", _read(stream, 8))[0]
    return pickle.loads(_read(stream, n))


CODEC_THREADS = 0   # threads a decoder may use (0: FFmpeg's choice); a decode worker sets its own


def heartbeat():
    """Called as a long decode moves on (shot detection decodes every frame): a decode worker
    replaces it to tell its parent, whose time limit then counts from the last beat, not from the
    start."""


def _serve():
    """The worker's loop: the function and the memory limit first, then items until the parent
    closes the pipe. The limit is on the data segment and private writable mappings (RLIMIT_DATA),
    which is where a decoder's frames live, so a file that lies about its size gets a MemoryError,
    not the machine."""
    _die_with_parent()
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr   # a stray print must not corrupt the protocol
    # Ctrl-C is the parent's to handle; we end when it closes our pipe
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        fn, limit, threads = _recv(inp)
        global CODEC_THREADS, heartbeat
        CODEC_THREADS, heartbeat = threads, _beats(out)
        if limit:
            import resource
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        while True:
            item = _recv(inp)
            try:
                _send(out, (True, fn(item)))
            except MemoryError:
                why = f"{item}: decoding needed more than {limit / 2**30:.1f} GiB of memory"
                _send(out, (False, VideoError(why, "decode_memory")))
            except VideoError as e:
                _send(out, (False, e))
            except Exception as e:   # any failure is reported for this item; the worker lives on
                _send(out, (False, VideoError(f"{item}: {type(e).__name__}: {e}")))
    except (EOFError, BrokenPipeError):
        return


def _at_fork():
    """In the new worker, before Python starts in it (Popen's preexec_fn): SIGKILL when its parent
    ends, so that a worker stopped or stuck while it starts dies with a killed client too. Only the
    prctl call, found before the fork: nothing that could wait on a lock another thread held at the
    fork."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


try:
    import ctypes
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):   # not Linux
    _PRCTL = None


def _die_with_parent():
    """SIGKILL for this worker when the process that started it ends, however it ends (Linux): a
    worker stopped (SIGSTOP) or stuck in a decoder never reads the end of its pipe, and would
    outlive a client that was killed. Set at the fork already (_at_fork); said again here, where the
    parent's death before it can be seen."""
    parent = os.getppid()
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):   # not Linux: the closed pipe ends it, when it reads again
        return
    if os.getppid() != parent:   # the parent died before the line above: nobody to serve
        os._exit(0)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)


def _import_path(fn) -> list:
    """Where a worker imports from: the repository, and the folder of fn's own top-level package (a
    test's helper, say): never the folder the tool was started in, where a user's `data.py` would
    shadow ours."""
    module = sys.modules[getattr(fn, "func", fn).__module__]
    folder = os.path.dirname(os.path.abspath(module.__file__))
    # numpy's own folder holds its "typing"
    package = os.path.basename(module.__file__) == "__init__.py"
    for _ in range(module.__name__.count(".") + package):
        folder = os.path.dirname(folder)
    return list(dict.fromkeys([ROOT, folder]))


def _beats(out, every=1.0):
    """heartbeat() in a worker: a (None, None) message to the parent, at most once every `every`
    s."""
    last = [time.monotonic()]

    def beat():
        if time.monotonic() - last[0] >= every:
            last[0] = time.monotonic()
            _send(out, (None, None))
    return beat


BEAT = object()   # what _Worker.result() gives for a heartbeat: the item is still being decoded


class _Worker:
    def __init__(self, fn, limit, threads):
        # -I: an isolated interpreter (neither the current folder nor PYTHONPATH on its import
        # path); no secrets in its environment, as it parses untrusted files
        env = {k: v for k, v in os.environ.items() if not SECRET.search(k)}
        boot = (f"import sys; sys.path[:0] = {_import_path(fn)!r}; "
                "from plumbing import workers; workers._serve()")
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", boot], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                     preexec_fn=_at_fork)
        _send(self.proc.stdin, (fn, limit, threads))
        self.item, self.deadline = None, None

    def fileno(self):
        return self.proc.stdout.fileno()

    def start(self, item, timeout):
        self.item, self.deadline = item, time.monotonic() + timeout
        _send(self.proc.stdin, item)

    def result(self):
        try:
            ok, value = _recv(self.proc.stdout)
        except (EOFError, OSError):   # the worker died: a decoder crash, or the OOM killer
            self.proc.wait()
            return VideoError(f"{self.item}: the decoder process died (exit code "
                              f"{self.proc.returncode})", "decoder_died")
        return BEAT if ok is None else value

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:   # it died: nothing to tell it
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()


RETRIED = ("decode_timeout", "decoder_died", "decode_memory")   # failures that may not happen again
TRIES = 3   # runs in which one video may meet them before it counts as unreadable


def failure(error: VideoError, tries_before: int = 0) -> dict:
    """The fields of a decode failure's row: a failure that may not happen again (a stalled or slow
    disk, a decoder killed for memory) is not final, and the next run tries the video again, up to
    TRIES runs; after that, and for a file that cannot be read at all, the code is UNREADABLE
    (final)."""
    tries = tries_before + 1
    if error.code in RETRIED and tries < TRIES:
        return {"error": str(error), "code": error.code, "tries": tries}
    why = f" (after {tries} tries)" if error.code in RETRIED else ""
    return {"error": str(error) + why, "code": UNREADABLE, **({"tries": tries} if why else {})}


def tries_of(row) -> int:
    """How many runs have tried a row's video and met a failure that may not happen again."""
    tries = row.get("tries", 1)
    return tries if row.get("code") in RETRIED and isinstance(tries, int) else 0


class PoolError(Exception):
    """The decoding processes themselves failed (not one item): nothing more will come from them."""


def imap_unordered(fn, items, workers: int = 4, timeout: float = 300.0, buffer: int = 8,
                   memory_gb: float = None, threads: int = None, stop: threading.Event = None):
    """Yield (item, result) for each item, result being fn(item) or a VideoError, as they finish.

    fn runs in `workers` processes, so decoding overlaps whatever the caller does with the results
    (up to `buffer` finished ones wait for it). A call that takes longer than `timeout` seconds
    (native decoders can hang, and a hang cannot be interrupted from Python), or as long since its
    last heartbeat() (a long decode that moves on), gets its worker killed and replaced, and
    its item a VideoError; so does one that needs more than `memory_gb` GiB. Each decoder gets
    `threads` threads (default: this rank's cores shared by the workers). Once `stop` is set
    (SIGTERM in label.py) the stream ends within a fraction of a second, even while a decode is
    stalled. fn must be picklable (a module-level function or a partial) from a module the workers
    can import, not from the script being run."""
    if getattr(getattr(fn, "func", fn), "__module__", None) == "__main__":
        raise ValueError("imap_unordered needs a function from an importable module, not from "
                         "__main__")
    out, todo = queue.Queue(maxsize=buffer), queue.Queue(maxsize=max(1, workers))
    done, failed, told, stop = object(), [], stop, threading.Event()
    limit = int(memory_gb * 2**30) if memory_gb else None
    threads = threads or codec_threads(workers)
    # a byte when the feeder hands over an item: the loop waits on it too
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    # held to write to the pipe, and to close it: no write after the close
    pipe = threading.Lock()

    def wake():
        with pipe:
            if wake_w is not None:
                try:
                    os.write(wake_w, b".")
                except BlockingIOError:   # bytes already wait to be read: the loop wakes anyway
                    pass

    # items are read on a thread of their own: a source that blocks never holds up results
    def feed():
        try:
            for item in items:
                if stop.is_set():
                    return
                todo.put(item)
                wake()
        except BaseException as e:
            failed.append(e)
        finally:
            todo.put(done)
            wake()

    def run():
        idle, busy, ended = [_Worker(fn, limit, threads) for _ in range(max(1, workers))], [], False
        try:
            while not stop.is_set():
                while idle and not ended and not todo.empty():
                    item = todo.get_nowait()
                    if item is done:
                        ended = True
                        break
                    w = idle.pop()
                    try:
                        w.start(item, timeout)
                    # it died while idle (the OOM killer, say): a new one takes the item
                    except OSError:
                        w.kill()
                        w = _Worker(fn, limit, threads)
                        w.start(item, timeout)
                    busy.append(w)
                if ended and not busy:
                    break
                soonest = min((w.deadline for w in busy), default=time.monotonic() + 60)
                for w in wait(busy + [wake_r], timeout=max(0.0, soonest - time.monotonic())):
                    if w == wake_r:
                        os.read(wake_r, 1 << 16)
                        continue
                    result = w.result()
                    if result is BEAT:   # moving on: its time limit counts from now
                        w.deadline = time.monotonic() + timeout
                        continue
                    busy.remove(w)
                    out.put((w.item, result))
                    idle.append(w if w.proc.poll() is None else _Worker(fn, limit, threads))
                for w in [w for w in busy if time.monotonic() > w.deadline and not wait([w], 0)]:
                    w.kill()
                    busy.remove(w)
                    out.put((w.item,
                             VideoError(f"{w.item}: decoding took longer than {timeout:.0f} s",
                                        "decode_timeout")))
                    idle.append(_Worker(fn, limit, threads))
        except BaseException as e:   # told to the caller, not lost with this thread
            failed.append(e)
        finally:
            for w in idle:
                w.close()
            for w in busy:
                w.kill()
            nonlocal wake_w
            with pipe:
                os.close(wake_r)
                os.close(wake_w)
                wake_w = None
            out.put(done)

    threading.Thread(target=feed, daemon=True).start()
    threading.Thread(target=run, daemon=True).start()
    finished = False
    try:
        while True:
            try:
                got = out.get(timeout=0.2)
            except queue.Empty:
                if told is not None and told.is_set():
                    return
                continue
            if got is done:
                break
            yield got
        finished = True
    finally:
        if not finished:   # ended early (an error, a Stop): the workers go, the threads end
            stop.set()
            wake()
            while out.get() is not done:   # let the loop finish putting what it has
                pass
    if failed:
        raise PoolError(f"the decoding processes failed: {type(failed[0]).__name__}: "
                        f"{failed[0]}") from failed[0]


def decode_workers(parent: int) -> list:
    """The pids of the decode workers process `parent` started (their command line names
    workers._serve): what a test or an operator stops or kills to see a decoder hang (Linux)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"workers._serve" in cmd:
            found.append(int(pid))
    return found


def cores_per_rank() -> int:
    """This process's share of the cores it may run on. Under torchrun the ranks of a node either
    share one affinity (the default) or were each bound to cores of their own (numactl, Slurm's
    --cpu-bind): the ranks compare their affinities, and cores that several ranks of one node share
    are divided."""
    import socket
    mine = os.sched_getaffinity(0)
    share = 1
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, (socket.gethostname(), sorted(mine)))
            share = sum(1 for host,
                        cores in everyone if host == socket.gethostname() and mine & set(cores))
    except ImportError:   # a decode worker: no torch, and no ranks
        pass
    return max(1, len(mine) // share)


def codec_threads(processes: int, cores: int = None) -> int:
    """Threads each of `processes` decoding processes may give its decoder: the rank's cores shared
    out (FFmpeg's own choice is one per core of the machine, in every one of them)."""
    return max(1, (cores or cores_per_rank()) // max(1, processes))
