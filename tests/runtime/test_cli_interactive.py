"""``segment --point`` / ``--task interactive``: the same PNG and JSON as a concept query, read
back against ``Sam3.predict_points``; flags of the two tasks not mixed; errors leave no files.
Uses the session's tiny interactive library (``conftest.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sam3_nn.runtime import rle
from tests.runtime.test_cli import cli, files_under
from tests.runtime.test_runtime import write_test_image


@pytest.fixture(scope="module")
def art(tiny_interactive, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_interactive")
    image = write_test_image(str(folder / "photo.png"))  # 160 x 100
    converted = str(folder / "tiny.safetensors")
    code, _, err = cli("convert", tiny_interactive["snapshot"], tiny_interactive["library"], converted)
    assert code == 0, err
    return {"library": tiny_interactive["library"], "weights": converted, "image": image}


def run(art, output, *extra):
    return cli("segment", "--library", art["library"], "--weights", art["weights"],
               "--image", art["image"], "--output", output, *extra)


@pytest.mark.parametrize("prompt, count", [(("--point", "60,40"), 3),
                                           (("--point", "60,40", "--point", "120,70:neg"), 1),
                                           (("--task", "interactive", "--box", "20,10,110,80"), 1),
                                           (("--point", "60,40", "--box", "20,10,110,80", "--multimask"), 3)])
def test_segment_interactive_outputs_read_back(art, tmp_path, prompt, count):
    from PIL import Image

    from sam3_nn.runtime.api import Sam3

    out = tmp_path / "out"
    code, stdout, stderr = run(art, out, *prompt)
    assert code == 0, stderr
    assert files_under(out) == ["photo.json", "photo.png"]
    result = json.load(open(out / "photo.json"))
    assert result["task"] == "interactive" and (result["height"], result["width"]) == (100, 160)
    assert len(result["objects"]) == count
    assert Image.open(out / "photo.png").size == (160, 100)
    # the same as the API's answer for the same prompt
    model = Sam3.load(art["library"], art["weights"])
    p = result["prompt"]
    res = model.predict_points(model.set_image(art["image"]), p["points"], p["point_labels"],
                               box=p["box"], multimask=p["multimask"])
    assert result["best"] == res.best
    for k, obj in enumerate(result["objects"]):
        np.testing.assert_array_equal(rle.decode(obj["segmentation"]), res.masks[k])
        assert obj["score"] == pytest.approx(float(res.scores[k]), abs=1e-5)
        assert obj["area"] == int(res.masks[k].sum())
    assert result["object_score_logit"] == pytest.approx(res.object_score, abs=1e-5)


@pytest.mark.parametrize("extra, message", [
    (("--point", "60,40", "--task", "concept"), "--point is an interactive prompt"),
    (("--point", "60,40", "--text", "cat"), "--text is a concept prompt"),
    (("--point", "60,40", "--box", "1,1,20,20", "--box", "30,30,50,50"), "takes one --box"),
    (("--point", "60,40", "--box", "1,1,20,20:neg"), "negative --box"),
    (("--task", "interactive"), "needs --point"),
    (("--text", "cat", "--multimask"), "apply to interactive segmentation"),
    (("--point", "60"), "--point: point '60': expected x,y"),
    (("--point", "600,40"), "outside the 160x100 image"),
    (("--point", "60,40", "--mask-threshold", "1.5"), "expected a number in [0, 1]"),
    (("--point", "60,40", "--mask-threshold", "1"), "strictly between 0 and 1"),
    (("--text", "cat"), "has no detect function"),
])
def test_segment_interactive_errors_leave_no_files(art, tmp_path, extra, message):
    out = tmp_path / "out"
    code, _, stderr = run(art, out, *extra)
    assert code == 2, stderr
    assert message in stderr and "Traceback" not in stderr, stderr
    assert files_under(out) == []


def test_compile_options_for_the_interactive_part():
    """``compile --parts ... --max-points N`` reach the build options (recorded in the
    manifest); an interactive part without the vision part, or no point slot, is refused
    before any work."""
    from sam3_nn.cli import build_parser, compile_options
    from sam3_nn.compiler.build import resolve

    args = build_parser().parse_args(["compile", "--parts", "vision,interactive", "--max-points", "4"])
    options = compile_options(args)
    assert options.parts == ("vision", "interactive") and options.max_points == 4
    assert resolve(options)[1].record()["max_points"] == 4
    for parts, points, message in ((("interactive",), 16, "needs the vision part"),
                                   (("vision", "interactive"), 0, "max_points must be at least 1")):
        with pytest.raises(ValueError, match=message):
            resolve(options.with_(parts=parts, max_points=points))
    code, _, err = cli("compile", "--parts", "interactive", "--output", "/nonexistent/x")
    assert code == 2 and "needs the vision part" in err
