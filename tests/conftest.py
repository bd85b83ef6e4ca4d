"""Test session setup: TVM's CPU thread pool gets one thread per physical core, as the
runtime engine gives it when it opens a CPU device (the tests also call libraries directly).
torch is imported first, so tvm_ffi keeps its torch interop in the test process (the runtime
imports tvm_ffi without torch when torch is not loaded yet: sam3_nn/runtime/ffi.py)."""

import torch  # noqa: F401

from sam3_nn.runtime import threads

threads.configure()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_interactive(tmp_path_factory):
    """One tiny llvm library with the interactive part (``vision`` + ``interactive``, 8 point
    slots, float32) and a ``Sam3TrackerModel`` with every parameter perturbed, its weights
    bound to it through the HF ``Sam3TrackerModel`` layout. Shared by the model, runtime and
    CLI tests of the interactive part (one compile)."""
    from transformers import Sam3TrackerModel

    from sam3_nn.compiler.build import build
    from sam3_nn.compiler.options import BuildOptions
    from sam3_nn.config import Sam3Config
    from sam3_nn.runtime.engine import CompiledModel
    from sam3_nn.weights import load_params
    from tests.refs import (expected_params, randomize_, save_hf_snapshot, state_dict_source,
                            tiny_tracker_hf_config)

    hf = randomize_(Sam3TrackerModel(tiny_tracker_hf_config()).eval(), seed=5)
    folder = save_hf_snapshot(hf, str(tmp_path_factory.mktemp("hf_sam3_tracker")))
    cfg = Sam3Config.from_pretrained(folder)
    art = build(cfg, BuildOptions(target="llvm", dtype="float32", parts=("vision", "interactive"),
                                  max_points=8), str(tmp_path_factory.mktemp("interactive_lib")))
    lib = CompiledModel(art["library"])

    def load(model):
        params, _ = load_params(cfg, state_dict_source(model.state_dict()), expected_params(lib),
                                lib.manifest["parts"])
        return params

    lib.bind(load(hf))
    return {"hf": hf, "lib": lib, "cfg": cfg, "snapshot": folder, "load": load,
            "library": art["library"]}


@pytest.fixture(scope="session")
def tiny_video(tmp_path_factory):
    """One tiny llvm library with every part (``vision``, ``text``, ``detector``,
    ``interactive``, ``video``; 8 point slots, float32) and a ``Sam3VideoModel`` with every
    parameter perturbed (``video_hf``), its weights bound through the HF ``Sam3VideoModel``
    layout; ``hf``: the ``Sam3TrackerVideoModel`` holding its tracker's weights (the trunk, the
    tracker neck, the tracker). Shared by the model, runtime and CLI tests of the video tracker
    and of the concept tracker (one compile; tests/refs.py ``build_tiny_video``)."""
    from tests.refs import build_tiny_video

    return build_tiny_video(str(tmp_path_factory.mktemp("video")))
