"""A labelling job on one machine: images -> shards -> COCO / YOLO-seg, resumable.

``label_stream`` keeps the library busy: a thread pool decodes and pre-processes the next
``prefetch`` batches while the library runs the current one, and post-processes finished
batches while it runs the next (decoding, resizing, numpy and pycocotools release the GIL for
their heavy parts). ``run_job`` writes the records as shards, skips images a previous run
finished, shows a progress bar (tqdm: rate and ETA) and builds the final files.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from tqdm import tqdm

from sam3_nn.runtime.label.export import (COCO_FILE, YOLO_DIR, check_yolo_names, coco_dict, need_opencv,
                                          write_coco, write_yolo)
from sam3_nn.runtime.label.infer import BatchLabeler, Prepared
from sam3_nn.runtime.label.options import FORMATS, ImageItem, LabelError, LabelOptions
from sam3_nn.runtime.label.store import ShardStore, run_prefix


def default_workers() -> int:
    return max(2, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2))


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def batches_ahead(workers: int, batch: int, least: int = 2) -> int:
    """Batches to decode ahead of the library: at least ``least``, and enough to give every
    worker an image (at batch 1, two batches ahead kept 2 of 16 workers decoding while the
    library waited for them: 32% of an H100 job's time outside library calls)."""
    return max(least, -(-workers // batch))


def label_stream(labeler: BatchLabeler, items: Sequence[ImageItem], pool: ThreadPoolExecutor,
                 prefetch: int = 2) -> Iterator[Dict]:
    """Records of ``items``, in order (a bad image gives its error record); ``prefetch``
    batches are decoded ahead of the one the library runs, and a batch is post-processed while
    the library runs later ones (``BatchLabeler.stream``)."""
    b = labeler.batch
    batches = [list(items[i:i + b]) for i in range(0, len(items), b)]
    finishing: collections.deque = collections.deque()
    max_pending = (prefetch + 1) * b  # post-processing queued before the device thread waits on it

    def decoded() -> Iterator[List]:
        ahead: collections.deque = collections.deque()
        nxt = 0
        while nxt < min(prefetch + 1, len(batches)):
            ahead.append([pool.submit(labeler.prepare, it) for it in batches[nxt]])
            nxt += 1
        while ahead:
            prepared = [f.result() for f in ahead.popleft()]
            if nxt < len(batches):
                ahead.append([pool.submit(labeler.prepare, it) for it in batches[nxt]])
                nxt += 1
            yield prepared

    for prepared, per_image in labeler.stream(decoded()):
        raws = iter(per_image)
        for p in prepared:
            finishing.append(pool.submit(labeler.finish, p, next(raws)) if isinstance(p, Prepared) else _done(p))
        while finishing and (finishing[0].done() or len(finishing) > max_pending):
            yield finishing.popleft().result()
    while finishing:
        yield finishing.popleft().result()


class ShardWriter:
    """Records -> shards of ``size`` images (sooner when ``seconds`` have passed since the last
    one, so a slow job loses little when killed), each indexed as written. The writing (JSON,
    the atomic rename, the index's fsync) runs in a thread of its own, off the thread that
    keeps the library busy; ``close`` waits for it. A failed write (a full disk) is raised at
    the next shard handed over, so the job stops there instead of computing to its end."""

    def __init__(self, store: ShardStore, prefix: str, size: int = 64, seconds: float = 60.0,
                 index: bool = True):
        self.store, self.prefix, self.size, self.seconds, self.index = store, prefix, size, seconds, index
        self.pending: List[Dict] = []
        self.seq = 0
        self.last = time.monotonic()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="label-shards")
        self._writes: List[Future] = []

    def add(self, record: Dict) -> None:
        self.pending.append(record)
        if len(self.pending) >= self.size or time.monotonic() - self.last >= self.seconds:
            self.flush()

    def flush(self) -> None:
        """Hand the pending records to the writing thread as the next shard (raising the
        error of a write that failed since the last one)."""
        self._raise_failed()
        if not self.pending:
            return
        self.seq += 1
        self._writes.append(self._thread.submit(self._write, self.pending, self.seq))
        self.pending = []
        self.last = time.monotonic()

    def _raise_failed(self) -> None:
        done = [f for f in self._writes if f.done()]
        self._writes = [f for f in self._writes if f not in done]
        for f in done:
            f.result()

    def _write(self, records: List[Dict], seq: int) -> str:
        name = self.store.write_shard(records, self.prefix, seq)
        if self.index:
            self.store.add_to_index(name, {r["key"]: r["status"] for r in records})
        return name

    def close(self) -> None:
        """Flush, and wait until every shard is written (raising the first write's error)."""
        try:
            self.flush()
        finally:
            self._thread.shutdown(wait=True)
        writes, self._writes = self._writes, []
        for f in writes:
            f.result()


@dataclass
class Summary:
    images: int = 0  # in the job
    skipped: int = 0  # finished by an earlier run
    processed: int = 0  # by this run (failed ones included)
    errors: List[Dict] = field(default_factory=list)  # error records of the job's images
    objects: int = 0
    seconds: float = 0.0
    outputs: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        out = [f"{self.images} images: {self.processed} processed now ({rate:.2f} images/s), "
               f"{self.skipped} done before, {len(self.errors)} failed; {self.objects} objects"]
        out += self.notes
        out += [f"wrote {p}" for p in self.outputs]
        if self.errors:
            out.append(f"{len(self.errors)} image(s) could not be labelled:")
            out += [f"  {e['key']}: {e['error']}" for e in self.errors[:20]]
            if len(self.errors) > 20:
                out.append(f"  ... and {len(self.errors) - 20} more (the shards' error records list all)")
        return out


def job_record(options: LabelOptions, library: str, weights: str, batch: int, exemplars: Optional[str]) -> Dict:
    """What ``job.json`` holds: what decides the labels (paths as given: moving the output
    folder keeps it resumable)."""
    return {"options": options.record(), "library": os.path.basename(library),
            "weights": os.path.basename(os.path.normpath(weights)), "batch": batch,
            "exemplars": os.path.basename(exemplars) if exemplars else None}


def progress_bar(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, unit="img", desc="label", dynamic_ncols=True,
                disable=not enabled, file=sys.stderr, smoothing=0.1)


def export(store: ShardStore, items: Sequence[ImageItem], options: LabelOptions, formats: str,
           polygons: bool, summary: Summary, log: Callable[[str], None]) -> None:
    records = store.records([it.key for it in items])
    summary.errors = [r for r in records if r["status"] != "ok"]
    summary.objects = sum(len(r["objects"]) for r in records if r["status"] == "ok")
    if formats in ("coco", "both"):
        dataset, kept = coco_dict(records, options.concepts, polygons)
        path = os.path.join(store.root, COCO_FILE)
        write_coco(path, dataset)
        summary.outputs.append(path)
        if kept:
            summary.notes.append(f"{kept} object(s) too small for a polygon keep their RLE in {COCO_FILE}")
    if formats in ("yolo-seg", "both"):
        folder = os.path.join(store.root, YOLO_DIR)
        dropped = write_yolo(folder, records, options.concepts)
        summary.outputs.append(folder)
        if dropped:
            summary.notes.append(f"{dropped} object(s) too small for a polygon are left out of {YOLO_DIR}/")


def pending(store: ShardStore, items: Sequence[ImageItem], retry_errors: bool) -> List[ImageItem]:
    done = store.finished()
    return [it for it in items if it.key not in done or (retry_errors and done[it.key] != "ok")]


def run_job(labeler: BatchLabeler, items: Sequence[ImageItem], store: ShardStore, formats: str = "coco",
            polygons: bool = False, shard_size: int = 64, workers: Optional[int] = None,
            retry_errors: bool = False, progress: bool = True, prefetch: int = 2,
            log: Callable[[str], None] = print) -> Summary:
    """Label the images a previous run left (``store.begin`` called first), then write the
    final files from all shards."""
    check_formats(formats, polygons)
    if formats in ("yolo-seg", "both"):
        check_yolo_names([it.key for it in items])
    todo = pending(store, items, retry_errors)
    summary = Summary(images=len(items), skipped=len(items) - len(todo))
    if summary.skipped:
        log(f"resuming: {summary.skipped} of {len(items)} images finished before")
    writer = ShardWriter(store, run_prefix(), shard_size)
    t0 = time.perf_counter()
    bar = progress_bar(len(items), summary.skipped, progress)
    say = (lambda s: tqdm.write(s, file=sys.stderr)) if progress else log
    try:
        workers = workers or default_workers()
        with ThreadPoolExecutor(workers, thread_name_prefix="label") as pool:
            ahead = batches_ahead(workers, labeler.batch, prefetch)
            for record in label_stream(labeler, todo, pool, ahead):
                writer.add(record)
                summary.processed += 1
                if record["status"] != "ok":
                    say(f"skipped {record['file']}: {record['error']}")
                bar.update(1)
    finally:
        writer.close()  # what finished is kept, whatever stopped the loop
        bar.close()
    summary.seconds = time.perf_counter() - t0
    export(store, items, labeler.options, formats, polygons, summary, log)
    return summary


def check_formats(formats: str, polygons: bool) -> None:
    if formats not in FORMATS:
        raise LabelError(f"--format must be one of {', '.join(FORMATS)}, got {formats!r}")
    if polygons or formats in ("yolo-seg", "both"):
        need_opencv("--polygons" if polygons else "--format yolo-seg")
