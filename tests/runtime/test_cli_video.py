"""``sam3-nn track``: masks as COCO RLE JSON lines equal to a ``VideoSession`` run with the same
prompts, the overlay (PNG frames, or an MP4 through PyAV), progress lines, and bad input
refused before the model is loaded (exit status 2, ``error: ...``, no traceback, nothing
written)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from sam3_nn import cli
from sam3_nn.runtime import rle
from sam3_nn.runtime.api import Sam3
from sam3_nn.runtime.video import VideoSession, parse_track_prompt
from sam3_nn.errors import InputError
from tests.runtime.test_video_runtime import synthetic_video


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    for i, f in enumerate(synthetic_video()):
        Image.fromarray(f).save(folder / f"{i:04d}.png")
    return str(folder)


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _base(tiny_video, video, out):
    return ["track", "--library", tiny_video["library"], "--weights", tiny_video["snapshot"], "--video", video,
            "--output", str(out)]


def test_track_folder_matches_session(tiny_video, frames_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, log, err = _run(capsys, *_base(tiny_video, frames_dir, out), "--point", "1:20,30@2",
                          "--point", "1:60,80:neg@2", "--box", "2:8,18,38,52@3", "--overlay", "png",
                          "--log-every", "3")
    assert code == 0, err
    assert "frames/s" in log
    lines = [json.loads(x) for x in (out / "masks.jsonl").read_text().splitlines()]
    assert sorted(x["frame"] for x in lines) == list(range(10))
    assert len(os.listdir(out / "overlay")) == 10
    # the same prompts through the runtime: the same masks, frame by frame
    session = VideoSession(Sam3(tiny_video["lib"]), frames_dir)
    session.add_points(2, 1, [(20, 30), (60, 80)], [1, 0])
    session.add_box(3, 2, (8, 18, 38, 52))
    want = {r.frame_index: r for r in session.propagate(start=2)}
    want.update({r.frame_index: r for r in session.propagate(start=1, reverse=True)})
    for line in lines:
        r = want[line["frame"]]
        assert [o["id"] for o in line["objects"]] == r.object_ids == [1, 2]
        for k, o in enumerate(line["objects"]):
            np.testing.assert_array_equal(rle.decode(o["mask"]), r.masks[k])
            assert o["score"] == pytest.approx(float(r.object_scores[k]), abs=1e-4)


def test_track_video_file_writes_overlay_video(tiny_video, tmp_path, capsys):
    av = pytest.importorskip("av")
    from sam3_nn.runtime.video import VideoWriter

    src = str(tmp_path / "clip.mp4")
    w = VideoWriter(src, (100, 120), 10.0)
    for f in synthetic_video():
        w.write(f)
    w.close()
    out = tmp_path / "out"
    code, log, err = _run(capsys, *_base(tiny_video, src, out), "--point", "1:20,30@0")
    assert code == 0, err
    assert len((out / "masks.jsonl").read_text().splitlines()) == 10
    with av.open(str(out / "overlay.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 10


@pytest.mark.parametrize("args, message", [
    (["--point", "1:20,30"], "expected ID:x,y"),
    (["--point", "a:20,30@0"], "must be integers"),
    (["--point", "1:20,30:maybe@0"], "':pos' or ':neg'"),
    (["--box", "1:1,2,3@0"], "4 finite coordinates"),
    (["--box", "1:1,2,30,40@0", "--box", "1:2,3,30,40@0"], "two boxes"),
    (["--point", "1:20,30@10"], "past the video's last frame (9)"),
    (["--point", "1:500,30@0"], "outside the 120x100 image"),
    ([], "give at least one --point"),
])
def test_track_bad_input(tiny_video, frames_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code, _, err = _run(capsys, *_base(tiny_video, frames_dir, out), *args)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_track_needs_a_video_library(tiny_video, frames_dir, tmp_path, capsys):
    lib = tmp_path / "lib.so"
    shutil.copy(tiny_video["library"], lib)
    manifest = json.loads(open(os.path.splitext(tiny_video["library"])[0] + ".json").read())
    for f in ("track_step", "encode_memory", "mask_prompt"):
        manifest["functions"].pop(f)
    (tmp_path / "lib.json").write_text(json.dumps(manifest))
    code, _, err = _run(capsys, "track", "--library", str(lib), "--weights", tiny_video["snapshot"],
                        "--video", frames_dir, "--output", str(tmp_path / "o"), "--point", "1:2,3@0")
    assert code == 2 and "--parts vision,interactive,video" in err


def test_track_missing_video(tiny_video, tmp_path, capsys):
    code, _, err = _run(capsys, *_base(tiny_video, str(tmp_path / "nope.mp4"), tmp_path / "o"),
                        "--point", "1:2,3@0")
    assert code == 2 and "no such file" in err


def test_parse_track_prompt():
    p = parse_track_prompt("3:10.5,20@7", "point")
    assert (p.obj_id, p.frame, p.point, p.label) == (3, 7, (10.5, 20.0), 1)
    assert parse_track_prompt("3:10,20:neg@0", "point").label == 0
    assert parse_track_prompt("4:1,2,3,4@2", "box").box == (1.0, 2.0, 3.0, 4.0)
    with pytest.raises(InputError, match="negative"):
        parse_track_prompt("1:1,2@-1", "point")
