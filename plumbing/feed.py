"""The videos for the engine as they become ready (engine.py): it takes what is ready and decodes on
while the next videos' frames are still being read, instead of waiting on the decoders."""

import queue
import threading


class Feed:
    """The videos as they become ready. A list or tuple is ready as it is; an iterator (whose next()
    may wait on decoders) is read ahead by a thread into a queue of `ahead` videos, so that take()
    returns what is ready at once and waits only when asked to."""

    def __init__(self, items, ahead: int):
        self.ended, self.closed, self.ready = False, False, queue.Queue(max(1, ahead))
        if isinstance(items, (list, tuple)):
            self.source, self.thread = iter(items), None
        else:
            self.source = None
            self.thread = threading.Thread(target=self._read, args=(iter(items),), daemon=True)
            self.thread.start()

    _END = object()

    def _read(self, items):
        try:
            for item in items:
                while not self.closed:
                    try:
                        self.ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.closed:
                    return
            self.ready.put(self._END)
        except BaseException as e:   # raised where the engine takes its next video
            self.ready.put(e)
        finally:
            getattr(items, "close", lambda: None)()

    def take(self, n: int, wait: bool) -> list:
        """Up to n videos that are ready; with `wait`, at least one unless the feed has ended."""
        got = []
        while len(got) < n and not self.ended:
            if self.source is not None:
                item = next(self.source, self._END)
            else:
                try:
                    item = self.ready.get(block=wait and not got)
                except queue.Empty:
                    break
            if item is self._END:
                self.ended = True
            elif isinstance(item, BaseException):
                self.ended = True
                raise item
            else:
                got.append(item)
        return got

    def close(self):
        self.closed = True
