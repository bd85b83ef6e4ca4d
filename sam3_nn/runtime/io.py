"""Checking what a command is given before the expensive work, writing its outputs, and
running a batch that skips bad items: the pieces every command (``segment``, ``convert``,
a batch labeller) shares.

* ``check_*``: raise ``InputError`` saying what was wrong and what was expected; cheap, so a
  command runs them all before loading a model (the output-path ones live in
  ``sam3_nn.files``, which the compiler and the weights converter use too).
* ``atomic_write`` / ``write_text`` (from ``sam3_nn.files``): nothing half-written, ever.
* ``UserError``: the base of every error meaning "what was given is wrong" (print it, no
  traceback); ``InputError`` is one.
* ``run_batch``: one item's bad input is logged and skipped, the rest go on; the report
  says what failed, and ``exit_code`` is non-zero when anything did.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, List, Sequence, Tuple

from sam3_nn.errors import InputError, UserError  # noqa: F401 (re-exported)
from sam3_nn.files import (atomic_write, atomic_write_path, check_not_inputs,  # noqa: F401 (re-exported)
                           check_output_file, check_output_folder, write_text)

# exit statuses of the command line
EXIT_OK = 0
EXIT_SOME_FAILED = 1  # a batch ran, some items were skipped (the report lists them)
EXIT_USAGE = 2  # nothing done: the arguments, a file or the library is wrong


def check_fraction(name: str, value) -> float:
    """A threshold: a finite number in [0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise InputError(f"{name} must be a number in [0, 1], got {value!r}")
    return v


@dataclass
class BatchReport:
    """What a batch did: items done, items skipped with the reason."""

    total: int = 0
    done: List[str] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_OK if not self.failed else EXIT_SOME_FAILED

    def summary(self) -> str:
        head = f"{len(self.done)} of {self.total} done in {self.seconds:.1f} s"
        if not self.failed:
            return head
        lines = [f"{head}; {len(self.failed)} failed:"]
        lines += [f"  {item}: {why}" for item, why in self.failed]
        return "\n".join(lines)


# errors that condemn one item, not the batch: its input is bad, or its output cannot be written
ITEM_ERRORS = (InputError, OSError)


def run_batch(items: Sequence[str], work: Callable[[str, str], None],
              log: Callable[[str], None] = print,
              skipped: Sequence[Tuple[str, str]] = ()) -> BatchReport:
    """``work(item, tag)`` for each item (``tag``: ``[3/10] name`` for log lines); an
    ``ITEM_ERRORS`` error skips that item (logged with its reason), anything else stops the
    batch. ``skipped``: items already found bad (by the checks before the batch), reported
    with the rest."""
    report = BatchReport(total=len(items) + len(skipped), failed=list(skipped))
    t0 = time.perf_counter()
    for n, item in enumerate(items, 1):
        tag = f"[{n}/{len(items)}] {os.path.basename(item)}"
        try:
            work(item, tag)
        except ITEM_ERRORS as e:
            msg = str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}"
            log(f"{tag}: skipped: {msg}")
            report.failed.append((item, msg))
        else:
            report.done.append(item)
    report.seconds = time.perf_counter() - t0
    return report
