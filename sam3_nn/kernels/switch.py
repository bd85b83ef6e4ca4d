"""An on/off switch for routing ops to a hand-written kernel (tests and benchmarks
compare both paths)."""

from __future__ import annotations

import contextlib


class Switch:
    """``on``: route to the kernel. ``enabled()`` / ``disabled()`` set it for a ``with``
    block and restore it after."""

    def __init__(self, on: bool):
        self.on = on

    @contextlib.contextmanager
    def _set(self, value: bool):
        old, self.on = self.on, value
        try:
            yield
        finally:
            self.on = old

    def enabled(self):
        return self._set(True)

    def disabled(self):
        return self._set(False)
