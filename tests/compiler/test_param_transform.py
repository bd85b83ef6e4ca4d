"""Weight-only work lifted out of the exported functions (sam3_nn.compiler.passes.param_transform): the
library runs it once when weights are bound, and every call gives what it gave before."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from sam3_nn.compiler.build import build, export
from sam3_nn.compiler.options import BuildOptions
from sam3_nn.config import Sam3Config
from sam3_nn.runtime.engine import CompiledModel
from sam3_nn.compiler.passes.param_transform import lift_pass, packed_functions, transform_name


def _tiny() -> Sam3Config:
    from tests.refs import tiny_hf_config

    return Sam3Config.from_hf(tiny_hf_config().to_dict())


def _ops(func) -> set:
    return set(re.findall(r"= R\.([a-z_.]+)\(", func.script()))


def test_lift_moves_weight_work_out_of_encode_image():
    target = tvm.target.Target("llvm")
    _, mod, _, _ = export(_tiny(), "float32", ("vision",), 1)
    names = packed_functions(mod)
    assert sorted(names) == ["encode_image", "image_position_encoding"]  # not release_outputs
    before = _ops(mod["encode_image"])
    with target:
        lifted = lift_pass(names)(mod)
    tf, fn = lifted[transform_name("encode_image")], lifted["encode_image"]
    # the position table tiled over the 12x12 grid (pretrain grid 5) is weight-only work
    assert "concat" in before and "concat" in _ops(tf) and "concat" not in _ops(fn)
    # one packed weight tuple again, holding only the weights the function reads
    n_in = int(fn.attrs["num_input"])
    assert len(fn.params) == n_in + 1
    n_weights = len(fn.params[n_in].ty.fields)
    assert n_weights == len(tf.ret_ty.fields) < len(mod["encode_image"].params[n_in].ty.fields)
    # release_outputs keeps its signature (no weights, no transform)
    assert transform_name("release_outputs") not in [gv.name_hint for gv in lifted.functions]
    assert len(lifted["release_outputs"].params) == 1


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """The tiny vision library built as shipped (transforms lifted) and without the lift."""
    import sam3_nn.compiler.build as compiler

    cfg = _tiny()
    options = BuildOptions(parts=("vision",), batch=1)
    lifted = build(cfg, options, str(tmp_path_factory.mktemp("lifted")))
    orig = compiler.packed_functions
    compiler.packed_functions = lambda mod: []
    try:
        plain = build(cfg, options, str(tmp_path_factory.mktemp("plain")))
    finally:
        compiler.packed_functions = orig
    return cfg, lifted["library"], plain["library"]


def test_lifted_library_matches_unlifted(libraries):
    cfg, lifted_lib, plain_lib = libraries
    lifted, plain = CompiledModel(lifted_lib), CompiledModel(plain_lib)
    assert set(lifted.manifest["param_transforms"]) == {"encode_image", "image_position_encoding"}
    assert "param_transforms" not in plain.manifest or not plain.manifest["param_transforms"]
    rng = np.random.default_rng(3)
    weights = {p["name"]: rng.standard_normal(p["shape"]).astype(p["dtype"]) * 0.1
               for p in lifted.manifest["params"]}
    lifted.bind(dict(weights))
    plain.bind(dict(weights))
    assert len(lifted.params) == 0  # the bound tuple is dropped: each function holds its own
    pixels = rng.standard_normal((1, 3, cfg.image_size, cfg.image_size)).astype("float32")
    a, b = lifted("encode_image", pixels), plain("encode_image", pixels)
    assert len(a) == len(b) == len(cfg.vision.scale_factors)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    # new weights: the transforms run again on bind (no stale tuple from the first)
    weights2 = {k: v * 2.0 for k, v in weights.items()}
    lifted.bind(dict(weights2))
    plain.bind(dict(weights2))
    for x, y in zip(lifted("encode_image", pixels), plain("encode_image", pixels)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert not np.allclose(lifted("encode_image", pixels)[0], a[0])
