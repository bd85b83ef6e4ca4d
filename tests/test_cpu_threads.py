"""TVM's CPU thread pool gets one thread per physical core (sam3_nn/cpu_threads.py), not
TVM's own default of half the hardware threads, which on a VM without SMT is one thread
for two cores; the user's TVM_NUM_THREADS / OMP_NUM_THREADS win."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sam3_nn import cpu_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_sysfs(tmp_path, siblings):
    for cpu, sib in siblings.items():
        d = tmp_path / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(sib + "\n")
    return str(tmp_path)


def test_physical_cores_counts_smt_siblings_once(tmp_path):
    root = _fake_sysfs(tmp_path, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    assert cpu_threads.physical_cores([0, 1, 2, 3], root) == 2   # 2 cores x 2 threads
    assert cpu_threads.physical_cores([0, 2], root) == 1         # both threads of one core
    root2 = _fake_sysfs(tmp_path / "nosmt", {0: "0", 1: "1"})
    assert cpu_threads.physical_cores([0, 1], root2) == 2        # a VM's vCPUs: all cores
    assert cpu_threads.physical_cores([0, 5], root2) is None     # unreadable: no guess


def _env_after_import(env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env.update(env_overrides)
    env["PYTHONPATH"] = ROOT
    code = ("import os, sam3_nn; print(os.environ.get('TVM_NUM_THREADS'), "
            "os.environ.get('OMP_NUM_THREADS'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return [None if v == "None" else v for v in out]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux CPU affinity")
def test_import_sets_one_thread_per_physical_core():
    want = cpu_threads.physical_cores()
    assert want is not None and 1 <= want <= len(os.sched_getaffinity(0))
    assert _env_after_import({}) == [str(want), None]


def test_the_users_thread_count_wins():
    assert _env_after_import({"TVM_NUM_THREADS": "3"}) == ["3", None]
    assert _env_after_import({"OMP_NUM_THREADS": "5"}) == [None, "5"]
