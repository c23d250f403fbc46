"""A per-thread stack of settings, pushed and popped by context managers.

``use_backend`` and ``use_cuda_graphs`` are both "the innermost block wins, in this thread"
settings; this is the one implementation they share. Per thread, because two threads may run
networks under different settings at once.
"""
import contextlib
import threading


class ThreadLocalStack:
    """Values pushed by ``pushed(value)`` blocks; ``top()`` is the innermost one of this thread."""

    def __init__(self):
        self._local = threading.local()

    def _items(self):
        if not hasattr(self._local, "items"):
            self._local.items = []
        return self._local.items

    def top(self, default=None):
        items = self._items()
        return items[-1] if items else default

    @contextlib.contextmanager
    def pushed(self, value):
        items = self._items()
        items.append(value)
        try:
            yield value
        finally:
            items.pop()
