"""TVM's CPU thread pool gets one thread per physical core (sam3_nn/runtime/threads.py), not
TVM's own default of half the hardware threads, which on a VM without SMT is one thread
for two cores; the user's TVM_NUM_THREADS / OMP_NUM_THREADS win."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sam3_nn.runtime import threads as cpu_threads

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def _env_after_open(env_overrides) -> tuple:
    """In a fresh process: the thread variables after ``import sam3_nn`` (and its runtime),
    then after the engine opens a CPU device, and the threads TVM's pool then has."""
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env.update(env_overrides)
    env["PYTHONPATH"] = ROOT
    code = ("import os, sam3_nn, sam3_nn.runtime\n"
            "g = lambda: [os.environ.get('TVM_NUM_THREADS'), os.environ.get('OMP_NUM_THREADS')]\n"
            "before = g()\n"
            "from sam3_nn.runtime.engine import open_device\n"
            "open_device('llvm')\n"
            "import tvm\n"
            "import json; print(json.dumps([before, g(), tvm.runtime.num_threads()]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    before, after, pool = json.loads(out)
    return before, after, pool


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux CPU affinity")
def test_opening_a_cpu_device_sets_one_thread_per_physical_core():
    want = cpu_threads.physical_cores()
    assert want is not None and 1 <= want <= len(os.sched_getaffinity(0))
    before, after, pool = _env_after_open({})
    assert before == [None, None]  # importing the package sets nothing
    assert after == [str(want), None] and pool == want


def test_the_users_thread_count_wins():
    assert _env_after_open({"TVM_NUM_THREADS": "1"})[1:] == (["1", None], 1)
    assert _env_after_open({"OMP_NUM_THREADS": "1"})[1] == [None, "1"]
