"""A job's output folder: the job record, result shards, and the index of finished images.

    OUTPUT/job.json              what the job is (options, library, weights): a restart with
                                 other settings is refused
    OUTPUT/shards/*.jsonl        results, one JSON line per image (``infer``'s records); a shard
                                 appears whole or not at all (written aside, then renamed)
    OUTPUT/shards/index.jsonl    the manifest of finished images: one line per shard,
                                 ``{"shard": name, "images": {key: "ok" | "error"}}``

The shards are the truth; the index saves reading them on a restart. A shard renamed into
place whose index line was never written (a kill in between, or a torn last line) is read
and indexed on the next start, so nothing finished is done twice and nothing is lost. Only
one process writes the index (the job's driver); shard writers (Ray actors) write shards only.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Iterator, List, Optional, Sequence

from sam3_nn.files import write_text
from sam3_nn.runtime.label.options import LabelError

JOB_FORMAT = "sam3_nn-label-job"
INDEX = "index.jsonl"


def run_prefix(tag: str = "") -> str:
    """A shard-name prefix unique to one writer, ordered by start time."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}{('-' + tag) if tag else ''}"


class ShardStore:
    def __init__(self, root: str):
        self.root = root
        self.shards = os.path.join(root, "shards")
        self.index = os.path.join(self.shards, INDEX)

    # -- the job record ------------------------------------------------------
    def begin(self, job: Dict) -> bool:
        """Record the job, or check that the folder holds the same job. -> True on a restart."""
        path = os.path.join(self.root, "job.json")
        job = {"format": JOB_FORMAT, **job}
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    old = json.load(f)
            except ValueError as e:
                raise LabelError(f"{path}: unreadable job record ({e}); use another --output") from None
            if old.get("format") != JOB_FORMAT:
                raise LabelError(f"{path} is not a label job record; use another --output")
            diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
            if diff:
                detail = "; ".join(f"{k}: {old.get(k)!r} before, {job.get(k)!r} now" for k in diff[:4])
                raise LabelError(f"--output {self.root} holds a job with other settings ({detail}): "
                                 f"give another --output, or the same settings to resume it")
            return True
        if os.path.isdir(self.root) and any(not n.startswith(".") for n in os.listdir(self.root)):
            raise LabelError(f"--output {self.root} exists and holds no label job; give an empty or new folder")
        write_text(path, json.dumps(job, indent=1, sort_keys=True))
        os.makedirs(self.shards, exist_ok=True)
        return False

    # -- shards --------------------------------------------------------------
    def write_shard(self, records: Sequence[Dict], prefix: str, seq: int) -> str:
        name = f"{prefix}-{seq:06d}.jsonl"
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        write_text(os.path.join(self.shards, name), text)
        return name

    def shard_names(self) -> List[str]:
        if not os.path.isdir(self.shards):
            return []
        return sorted(n for n in os.listdir(self.shards) if n.endswith(".jsonl") and n != INDEX
                      and not n.startswith("."))

    def read_shard(self, name: str) -> Iterator[Dict]:
        with open(os.path.join(self.shards, name), encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)

    # -- the index (one writer) ----------------------------------------------
    def add_to_index(self, name: str, statuses: Dict[str, str]) -> None:
        line = json.dumps({"shard": name, "images": statuses}, separators=(",", ":")) + "\n"
        with open(self.index, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def finished(self) -> Dict[str, str]:
        """``{key: "ok" | "error"}`` of every image in a shard (an ``ok`` anywhere wins)."""
        listed: Dict[str, Dict[str, str]] = {}
        if os.path.exists(self.index):
            with open(self.index, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        listed[entry["shard"]] = entry["images"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn line: its shard is read again below
        for name in self.shard_names():
            if name not in listed:
                statuses = {r["key"]: r["status"] for r in self.read_shard(name)}
                self.add_to_index(name, statuses)
                listed[name] = statuses
        out: Dict[str, str] = {}
        for name in sorted(listed):
            for key, status in listed[name].items():
                if out.get(key) != "ok":
                    out[key] = status
        return out

    def records(self, keys: Optional[Sequence[str]] = None) -> List[Dict]:
        """One record per image (``keys``: of these images only), sorted by key: where shards
        hold an image more than once (a batch redone after a kill), the first ``ok`` record in
        shard-name order, else the first error."""
        want = set(keys) if keys is not None else None
        best: Dict[str, Dict] = {}
        for name in self.shard_names():
            for r in self.read_shard(name):
                k = r["key"]
                if want is not None and k not in want:
                    continue
                if k not in best or (best[k]["status"] != "ok" and r["status"] == "ok"):
                    best[k] = r
        return [best[k] for k in sorted(best)]
