"""``sam3-nn label``: a folder labelled in batches equals per-image ``Sam3.predict``; a killed run
resumes to the same files; bad images are skipped and logged; the COCO file loads in
pycocotools and decodes to the predicted masks; YOLO-seg files parse; Ray Data gives the same
output as one process.

The tiny random model's scores sit around 0.2-0.26, so the thresholds below (0.24, and 0.22 for
one concept) keep some objects of each image and drop others. Comparisons are exact: the
batched calls (padding included) give the same floats as batch-1 calls on llvm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sam3_nn.runtime import rle
from sam3_nn.runtime.label.infer import greedy_nms, select
from sam3_nn.runtime.label.options import (ImageItem, LabelError, LabelOptions, list_images, load_exemplars,
                                           parse_class_thresholds, parse_concepts)
from sam3_nn.runtime.label.store import ShardStore
from tests.runtime.test_runtime import shared_artifacts, write_test_image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONCEPTS = ("cat", "red car")
THRESHOLDS = ["--score-threshold", "0.24", "--class-thresholds", "red car=0.22"]
EXEMPLAR_KEY = "sub/deep.jpg"
EXEMPLARS = {EXEMPLAR_KEY: {"cat": [[10, 12, 60, 70], [50, 60, 90, 110, 0]]}}


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six images (one in a subfolder, sizes differ) and a corrupt file."""
    folder = tmp_path_factory.mktemp("label_images")
    for i in range(5):
        write_test_image(str(folder / f"im{i}.png"), 90 + 7 * i, 130 + 11 * i, seed=i)
    (folder / "sub").mkdir()
    write_test_image(str(folder / "sub" / "deep.jpg"), 120, 100, seed=9)
    (folder / "broken.png").write_text("this is not a PNG")
    (folder / "exemplars.json").write_text(json.dumps(EXEMPLARS))
    return folder


def label_args(art, images, output, *extra):
    return ["label", "--library", art["library"], "--weights", art["converted"], "--tokenizer", art["snapshot"],
            "--images", str(images), "--concepts", ",".join(CONCEPTS), "--output", str(output),
            "--exemplars", str(images / "exemplars.json"), "--no-progress", *THRESHOLDS, *extra]


def cli(*args):
    import contextlib
    import io

    from sam3_nn.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def model(art):
    from sam3_nn.runtime.api import Sam3

    return Sam3.load(art["library"], art["converted"], tokenizer=art["snapshot"])


@pytest.fixture(scope="module")
def expected(model, images):
    """Per image: ``Sam3.predict`` for each concept (exemplar boxes where the file has them)."""
    options = LabelOptions(CONCEPTS, 0.24, {"red car": 0.22})
    out = {}
    for it in list_images(str(images)):
        if it.key == "broken.png":
            continue
        state = model.set_image(it.path)
        objs = []
        for ci, c in enumerate(CONCEPTS):
            ex = EXEMPLARS.get(it.key, {}).get(c)
            boxes = [b[:4] for b in ex] if ex else None
            labels = [b[4] if len(b) == 5 else 1 for b in ex] if ex else None
            det = model.predict(state, text=c, boxes=boxes, box_labels=labels,
                                score_threshold=options.threshold(c))
            objs += [(ci, det.scores[k], det.boxes[k], det.masks[k]) for k in range(len(det))]
        out[it.key] = {"size": state.original_size, "objects": objs}
    return out


@pytest.fixture(scope="module")
def labelled(art, images, tmp_path_factory):
    """One uninterrupted CLI run at batch 2 (the any-batch library; 6 images: the exemplar
    image's batch and the last are padded), both formats."""
    out = tmp_path_factory.mktemp("label_out") / "job"
    code, stdout, stderr = cli(*label_args(art, images, out, "--batch", "2", "--format", "both", "--shard-size", "4"))
    return {"out": out, "code": code, "stdout": stdout, "stderr": stderr}


def assert_records_equal_predict(records, expected):
    assert sorted(r["key"] for r in records) == sorted(expected)
    total = 0
    for r in records:
        exp = expected[r["key"]]
        assert (r["height"], r["width"]) == exp["size"]
        assert len(r["objects"]) == len(exp["objects"]), r["key"]
        for o, (ci, score, box, mask) in zip(r["objects"], exp["objects"]):
            assert o["concept"] == ci
            assert o["score"] == float(score)
            assert o["box"] == [float(v) for v in box]
            np.testing.assert_array_equal(rle.decode(o["segmentation"]), mask)
            assert o["area"] == int(mask.sum())
        total += len(r["objects"])
    assert total > 0


# ----------------------------------------------------------------------------
# labels equal predict
# ----------------------------------------------------------------------------
def test_label_folder_equals_predict(labelled, expected):
    """Batched labelling of a folder (exemplars on one image, per-concept thresholds) gives
    exactly ``predict``'s objects; both concepts are kept somewhere and dropped somewhere."""
    assert labelled["code"] == 1, labelled["stderr"]  # the corrupt image
    store = ShardStore(str(labelled["out"]))
    records = [r for r in store.records() if r["status"] == "ok"]
    assert_records_equal_predict(records, expected)
    kept = {c: sum(o["concept"] == c for r in records for o in r["objects"]) for c in range(2)}
    assert all(0 < kept[c] < 10 * len(records) for c in kept), kept  # 10 queries per image and concept
    assert len(store.shard_names()) == 2  # 7 images, shards of 4


@pytest.mark.parametrize("batch", [1, 4])
def test_label_stream_batches_equal_predict(model, images, expected, batch):
    from concurrent.futures import ThreadPoolExecutor

    from sam3_nn.runtime.label.infer import BatchLabeler
    from sam3_nn.runtime.label.job import label_stream

    options = LabelOptions(CONCEPTS, 0.24, {"red car": 0.22})
    items = list_images(str(images))
    ex = load_exemplars(str(images / "exemplars.json"), CONCEPTS, [it.key for it in items], 8)
    labeler = BatchLabeler(model, options, batch, ex)
    with ThreadPoolExecutor(2) as pool:
        records = list(label_stream(labeler, items, pool))
    assert [r["key"] for r in records] == [it.key for it in items]  # in order
    assert [r["status"] for r in records].count("error") == 1
    assert_records_equal_predict([r for r in records if r["status"] == "ok"], expected)
    assert len(labeler._text) == len(CONCEPTS)  # each concept's text encoded once


def test_exemplars_change_the_query(model, images, expected):
    """The exemplar image's "cat" objects differ from a text-only query's: so the equality
    above shows the boxes reached ``detect`` for that image and no other."""
    state = model.set_image(str(images / EXEMPLAR_KEY))
    text_only = model.predict(state, text="cat", score_threshold=0.0)
    with_boxes = [o for o in expected[EXEMPLAR_KEY]["objects"] if o[0] == 0]
    ref = model.predict(state, text="cat", score_threshold=0.0, boxes=[b[:4] for b in EXEMPLARS[EXEMPLAR_KEY]["cat"]],
                        box_labels=[1, 0])
    assert np.abs(ref.scores - text_only.scores).max() > 1e-3
    assert [float(s) for _, s, _, _ in with_boxes] == [float(s) for s in ref.scores if s > 0.24]


# ----------------------------------------------------------------------------
# corrupt image, COCO, YOLO-seg
# ----------------------------------------------------------------------------
def test_corrupt_image_is_skipped_with_a_log_line(labelled):
    assert labelled["code"] == 1
    log = labelled["stdout"] + labelled["stderr"]
    assert "skipped" in log and "broken.png" in log and "cannot be read as an image" in log
    assert "1 image(s) could not be labelled" in labelled["stdout"]
    assert "7 images: 7 processed now" in labelled["stdout"]
    errors = [r for r in ShardStore(str(labelled["out"])).records() if r["status"] == "error"]
    assert [r["key"] for r in errors] == ["broken.png"]


def test_coco_loads_and_decodes_to_the_predicted_masks(labelled, expected):
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(labelled["out"] / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CONCEPTS)
    names = sorted(img["file_name"] for img in coco.imgs.values())
    assert names == sorted(expected)  # the corrupt image is left out
    n = 0
    for img in coco.imgs.values():
        exp = expected[img["file_name"]]
        assert (img["height"], img["width"]) == exp["size"]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert len(anns) == len(exp["objects"])
        for ann, (ci, score, box, mask) in zip(anns, exp["objects"]):
            assert ann["category_id"] == coco.getCatIds(catNms=[CONCEPTS[ci]])[0]
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask)
            assert ann["score"] == float(score) and ann["area"] == int(mask.sum())
            x0, y0 = max(box[0], 0), max(box[1], 0)
            np.testing.assert_allclose(ann["bbox"][:2], [x0, y0], rtol=0, atol=1e-4)
            n += 1
    assert n == len(coco.anns) > 0


def parse_yolo_seg(path: str, classes: int):
    """A YOLO-seg label file -> [(class, [[x, y], ...])]; fails on anything else."""
    out = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            cls = int(fields[0])
            assert str(cls) == fields[0] and 0 <= cls < classes, line
            xy = np.asarray([float(v) for v in fields[1:]])
            assert len(xy) >= 6 and len(xy) % 2 == 0, line
            assert ((xy >= 0) & (xy <= 1)).all(), line
            out.append((cls, xy.reshape(-1, 2)))
    return out


def test_yolo_seg_files_parse_and_trace_the_masks(labelled, expected, images):
    import yaml

    folder = labelled["out"] / "yolo"
    data = yaml.safe_load((folder / "data.yaml").read_text())
    assert data["names"] == dict(enumerate(CONCEPTS))
    assert data["path"] == str(folder) and data["train"] == "images"
    labels = sorted(os.path.relpath(os.path.join(d, f), folder / "labels")
                    for d, _, fs in os.walk(folder / "labels") for f in fs)
    assert labels == sorted(os.path.splitext(k)[0] + ".txt" for k in expected)
    for key, exp in expected.items():
        assert os.path.samefile(folder / "images" / key, images / key)
        objs = parse_yolo_seg(str(folder / "labels" / (os.path.splitext(key)[0] + ".txt")), len(CONCEPTS))
        assert len(objs) == len(exp["objects"])  # none too small here
        h, w = exp["size"]
        for (cls, xy), (ci, _, _, mask) in zip(objs, exp["objects"]):
            assert cls == ci
            px = np.rint(xy * [w, h]).astype(int)  # boundary pixels of the object's mask
            assert mask[px[:, 1], px[:, 0]].all()


def test_coco_polygons(labelled, tmp_path):
    """``--polygons``: outer contours whose corners lie on the mask, loadable by pycocotools; a
    mask too small for a 3-point contour keeps its RLE."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    from sam3_nn.runtime.label.export import coco_dict, write_coco

    records = ShardStore(str(labelled["out"])).records()
    dot = np.zeros((40, 60), bool)
    dot[5, 7] = True
    shapes = np.zeros((40, 60), bool)
    shapes[10:30, 20:50] = True  # a rectangle: 4 corners at the corner pixels
    shapes[2:5, 2:5] = True  # and a 3x3 square: a second part
    obj = lambda m: {"concept": 1, "score": 0.9, "box": [0, 0, 1, 1], "area": int(m.sum()),  # noqa: E731
                     "segmentation": rle.encode(m)}
    records.append({"key": "zz-shapes.png", "file": "x", "status": "ok", "height": 40, "width": 60,
                    "objects": [obj(dot), obj(shapes)]})
    dataset, kept = coco_dict(records, CONCEPTS, polygons=True)
    assert kept == 1
    write_coco(str(tmp_path / "poly.json"), dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "poly.json"))
    last = max(coco.imgs)
    dot_ann, shapes_ann = coco.loadAnns(coco.getAnnIds(imgIds=[last]))
    np.testing.assert_array_equal(coco.annToMask(dot_ann).astype(bool), dot)  # kept as RLE
    polys = sorted(sorted(map(tuple, np.asarray(p).reshape(-1, 2).astype(int).tolist()))
                   for p in shapes_ann["segmentation"])
    assert polys == [[(2, 2), (2, 4), (4, 2), (4, 4)], [(20, 10), (20, 29), (49, 10), (49, 29)]]
    masks = {(r["key"], i): rle.decode(o["segmentation"]) for r in records if r["status"] == "ok"
             for i, o in enumerate(r["objects"])}
    n = 0
    for img in coco.imgs.values():
        for i, ann in enumerate(coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))):
            if isinstance(ann["segmentation"], dict):
                continue
            mask = masks[(img["file_name"], i)]
            for poly in ann["segmentation"]:  # corners of the outline: pixels of the mask
                assert len(poly) >= 6 and len(poly) % 2 == 0
                xy = np.asarray(poly).reshape(-1, 2).astype(int)
                assert mask[xy[:, 1], xy[:, 0]].all()
            n += 1
    assert n > 2


# ----------------------------------------------------------------------------
# resume
# ----------------------------------------------------------------------------
KILLER = textwrap.dedent('''
    import os, signal, sys
    from sam3_nn.runtime.label import infer
    calls = [0]
    real = infer.BatchLabeler._encode
    def encode_then_die(self, batch):
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a real crash
        return real(self, batch)
    infer.BatchLabeler._encode = encode_then_die
    from sam3_nn.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def yolo_files(job) -> dict:
    """{path under yolo/: label text, or the image a link points to}"""
    out = {}
    for d, _, fs in os.walk(job / "yolo"):
        for f in fs:
            p = os.path.join(d, f)
            rel = os.path.relpath(p, job / "yolo")
            out[rel] = os.path.realpath(p) if os.path.islink(p) else open(p).read().replace(str(job), "JOB")
    return out


def test_killed_run_resumes_to_the_same_output(art, images, labelled, tmp_path):
    """SIGKILL in the 6th batch's library calls (batch 1, shards of 2), then the same command again:
    the restart skips what the first run finished, and the files equal the uninterrupted run's."""
    out = tmp_path / "job"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    args = label_args(art, images, out, "--batch", "1", "--format", "both", "--shard-size", "2")
    env = dict(os.environ, KILL_AT="6", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    finished = ShardStore(str(out)).finished()
    assert 2 <= len(finished) < 7, finished
    assert not (out / "coco.json").exists()
    code, stdout, stderr = cli(*args)
    assert code == 1, stderr
    assert f"resuming: {len(finished)} of 7 images finished before" in stdout
    assert f"{7 - len(finished)} processed now" in stdout
    ref = json.loads((labelled["out"] / "coco.json").read_text())
    got = json.loads((out / "coco.json").read_text())
    assert got == ref
    assert len({i["file_name"] for i in got["images"]}) == len(got["images"])
    assert yolo_files(out) == yolo_files(labelled["out"])
    # a third run finds everything done and labels nothing
    code, stdout, _ = cli(*args)
    assert "resuming: 7 of 7" in stdout and "0 processed now" in stdout
    assert json.loads((out / "coco.json").read_text()) == ref


def test_store_recovers_unindexed_shards_and_drops_duplicates(tmp_path):
    store = ShardStore(str(tmp_path / "job"))
    store.begin({"options": {"a": 1}})
    ok = lambda k, n: {"key": k, "file": k, "status": "ok", "height": 1, "width": 1, "objects": [{"n": n}]}  # noqa: E731
    err = lambda k: {"key": k, "file": k, "status": "error", "error": "bad"}  # noqa: E731
    a = store.write_shard([ok("x", 1), err("y")], "run1", 1)
    store.add_to_index(a, {"x": "ok", "y": "error"})
    store.write_shard([ok("z", 2)], "run1", 2)  # killed before its index line
    with open(store.index, "a") as f:
        f.write('{"shard": "run1-000002.jsonl", "ima')  # and a torn line
    store.write_shard([ok("x", 3), ok("y", 4)], "run2", 1)  # a batch done twice; y retried
    assert store.finished() == {"x": "ok", "y": "ok", "z": "ok"}
    recs = store.records()
    assert [(r["key"], r["objects"][0]["n"]) for r in recs] == [("x", 1), ("y", 4), ("z", 2)]
    assert [r["key"] for r in store.records(["z", "nope"])] == ["z"]
    # the index now lists every shard, and reading it again changes nothing
    assert ShardStore(store.root).finished() == store.finished()
    # another job's settings are refused; the same are a resume
    assert store.begin({"options": {"a": 1}}) is True
    with pytest.raises(LabelError, match="other settings"):
        store.begin({"options": {"a": 2}})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("")
    with pytest.raises(LabelError, match="holds no label job"):
        ShardStore(str(tmp_path / "other")).begin({"options": {}})


def test_shard_write_error_stops_the_job_at_the_next_shard(tmp_path):
    """A shard the writing thread fails to write (a full disk) is raised when the next shard
    is handed over, not only when the job ends; the shards before it stay written."""
    from sam3_nn.runtime.label.job import ShardWriter

    class FullDisk(ShardStore):
        def write_shard(self, records, prefix, seq):
            if seq == 2:
                raise OSError(28, "No space left on device")
            return super().write_shard(records, prefix, seq)

    store = FullDisk(str(tmp_path / "job"))
    store.begin({"options": {}})
    writer = ShardWriter(store, "run", size=2)
    rec = lambda k: {"key": k, "file": k, "status": "error", "error": "x"}  # noqa: E731
    for k in "abcd":  # shards 1 and 2 handed over
        writer.add(rec(k))
    writer._writes[-1].exception()  # shard 2's write has ended (failed)
    writer.add(rec("e"))
    with pytest.raises(OSError, match="No space left"):
        writer.add(rec("f"))  # shard 3 handed over: shard 2's error
    writer.close()
    assert store.finished() == {"a": "error", "b": "error", "e": "error", "f": "error"}


def test_fast_masks_equal_post_process_instances():
    """``label.masks``: the same scores, boxes and masks as ``post_process_instances``, for
    thresholds inside and outside the logit band, up- and down-sizing, and logits placed right
    at the threshold's logit (where only the float32 sigmoid decides)."""
    import math

    from sam3_nn.runtime.label.masks import post_process
    from sam3_nn.runtime.postprocess import post_process_instances
    from tests.runtime.test_runtime import random_raw

    for seed, size in enumerate([(100, 160), (17, 13), (300, 41), (24, 20)]):
        raw = random_raw(seed, queries=12)
        for mask_threshold in (0.5, 0.3, 0.9, 0.0005):
            edge = np.float32(math.log(mask_threshold / (1 - mask_threshold)))
            raw["pred_masks"][0, :2] = edge + np.float32(1e-6) * np.arange(-240, 240).reshape(24, 20)
            ref = post_process_instances(raw, size, 0.1, mask_threshold)
            scores, boxes, masks = post_process(raw, size, 0.1, mask_threshold)
            np.testing.assert_array_equal(scores, ref.scores)
            np.testing.assert_array_equal(boxes, ref.boxes)
            np.testing.assert_array_equal(masks, ref.masks)
            assert 0 < masks.sum() < masks.size


# ----------------------------------------------------------------------------
# NMS, options, errors
# ----------------------------------------------------------------------------
def test_nms_and_the_per_image_cap():
    # three overlapping boxes of one concept, one far away of another
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 5], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.6, 0.9, 0.7, 0.8], np.float32)
    concept = np.array([0, 0, 0, 1])
    masks = np.zeros((4, 64, 64), bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.astype(int)):
        m[y0:y1, x0:x1] = True
    rles = rle.encode_many(masks)
    # IoU(0,1) = 90/110 = .82, IoU(0,2) = .5, IoU(1,2) = 45/105 = .43
    assert greedy_nms(scores[:3], rle.box_iou(boxes[:3], boxes[:3]), 0.6).tolist() == [1, 2]
    assert greedy_nms(scores[:3], rle.box_iou(boxes[:3], boxes[:3]), 0.4).tolist() == [1]
    o = lambda **k: LabelOptions(("a", "b"), **k)  # noqa: E731
    assert select(scores, concept, boxes, rles, o()).tolist() == [0, 1, 2, 3]
    assert select(scores, concept, boxes, rles, o(nms_iou=0.6)).tolist() == [1, 2, 3]
    assert select(scores, concept, boxes, rles, o(nms_iou=0.6, nms_kind="box")).tolist() == [1, 2, 3]
    assert select(scores, concept, boxes, rles, o(nms_iou=0.45)).tolist() == [1, 2, 3]  # .43 < .45 < .5
    assert select(scores, concept, boxes, rles, o(nms_iou=0.4)).tolist() == [1, 3]
    assert select(scores, concept, boxes, rles, o(max_detections=2)).tolist() == [1, 3]
    # across concepts: a "b" box on top of the best "a" one goes too
    boxes2 = boxes.copy()
    boxes2[3] = [1, 0, 11, 10]
    masks[3] = masks[1]
    rles2 = rle.encode_many(masks)
    assert select(scores, concept, boxes2, rles2, o(nms_iou=0.6)).tolist() == [1, 2, 3]
    assert select(scores, concept, boxes2, rles2, o(nms_iou=0.6, class_agnostic_nms=True)).tolist() == [1, 2]


def test_option_parsing_errors(tmp_path, images):
    assert parse_concepts(" person , red car") == ("person", "red car")
    for bad in ("", "a,,b", "a,a"):
        with pytest.raises(LabelError):
            parse_concepts(bad)
    assert parse_class_thresholds("b=0.3", ("a", "b")) == {"b": 0.3}
    for bad, msg in (("c=0.3", "not one of the concepts"), ("b=x", "not a number"), ("b", "pairs"),
                     ("b=1.5", r"\[0, 1\]")):
        with pytest.raises(LabelError, match=msg):
            parse_class_thresholds(bad, ("a", "b"))
    with pytest.raises(LabelError, match="nms-kind"):
        LabelOptions(("a",), nms_kind="iou")
    # images: a folder (recursive), a glob, a list file, one file
    keys = [it.key for it in list_images(str(images))]
    assert keys == ["broken.png", "im0.png", "im1.png", "im2.png", "im3.png", "im4.png", "sub/deep.jpg"]
    assert [it.key for it in list_images(str(images / "**" / "*.jpg"))] == ["sub/deep.jpg"]
    (tmp_path / "list.txt").write_text(f"# two images\n{images / 'im1.png'}\n\n{images / 'im0.png'}\n")
    assert [it.path for it in list_images(str(tmp_path / "list.txt"))] == [str(images / "im0.png"),
                                                                          str(images / "im1.png")]
    assert list_images(str(images / "im3.png")) == [ImageItem("im3.png", str(images / "im3.png"))]
    for bad in (str(tmp_path / "nope"), str(tmp_path / "*.png")):
        with pytest.raises(LabelError):
            list_images(bad)
    # exemplars
    good = {"im0.png": {"a": [[1, 2, 3, 4], [1, 2, 5, 6, 0]]}}
    (tmp_path / "ex.json").write_text(json.dumps(good))
    ex = load_exemplars(str(tmp_path / "ex.json"), ("a",), keys, 8)
    np.testing.assert_array_equal(ex["im0.png"]["a"][1], [1, 0])
    for data, msg in (({"nope.png": {"a": [[1, 2, 3, 4]]}}, "not images of this job"),
                      ({"im0.png": {"z": [[1, 2, 3, 4]]}}, "not one of the concepts"),
                      ({"im0.png": {"a": [[3, 2, 1, 4]]}}, "x0 < x1"),
                      ({"im0.png": {"a": [[1, 2, 3]]}}, r"\[x0, y0, x1, y1\]"),
                      ({"im0.png": {"a": [[1, 2, 3, 4, 2]]}}, "label must be"),
                      ({"im0.png": {"a": [[1, 2, 3, 4]] * 9}}, "at most 8")):
        (tmp_path / "ex.json").write_text(json.dumps(data))
        with pytest.raises(LabelError, match=msg):
            load_exemplars(str(tmp_path / "ex.json"), ("a",), keys, 8)


def test_cli_errors_leave_nothing(art, images, labelled, tmp_path):
    out = tmp_path / "out"
    cases = [
        (["--class-thresholds", "dog=0.3"], "'dog' is not one of the concepts"),
        (["--nms-iou", "2"], "--nms-iou must be a number in [0, 1]"),
        (["--shard-size", "0"], "--shard-size must be a positive integer"),
        (["--images", str(tmp_path / "nothing")], "no such folder, file or matching pattern"),
    ]
    for extra, msg in cases:
        code, _, err = cli(*label_args(art, images, out, *extra))
        assert code == 2 and msg in err and "Traceback" not in err, (extra, err)
        assert not out.exists(), extra
    code, _, err = cli(*label_args(art, images, out, "--batch", "0"))
    assert code == 2 and "--batch must be a positive integer" in err
    # resuming a job with other settings is refused, naming what differs
    code, _, err = cli(*label_args(art, images, labelled["out"], "--mask-threshold", "0.6"))
    assert code == 2 and "other settings" in err and "mask_threshold" in err


# ----------------------------------------------------------------------------
# Ray Data
# ----------------------------------------------------------------------------
def test_ray_job_equals_the_single_process_run(art, images, labelled, tmp_path):
    """A local Ray instance (2 CPUs, started here), 2 CPU actors, shards of 2: the same COCO
    file and YOLO labels as the one-process run."""
    import time

    import ray
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    print(f"ray.init: {time.perf_counter() - t0:.1f} s")
    try:
        out = tmp_path / "job"
        code, stdout, stderr = cli(*label_args(art, images, out, "--batch", "2", "--format", "both",
                                               "--ray", "--ray-actors", "2", "--shard-size", "2"))
    finally:
        ray.shutdown()
    assert code == 1, stderr
    assert "skipped broken.png" in stderr or "skipped broken.png" in stdout
    assert json.loads((out / "coco.json").read_text()) == json.loads((labelled["out"] / "coco.json").read_text())
    assert yolo_files(out) == yolo_files(labelled["out"])
    names = ShardStore(str(out)).shard_names()
    assert len(names) == 4  # 7 images in shards of 2, written by the actors


def test_batches_ahead_give_every_worker_an_image():
    from sam3_nn.runtime.label.job import batches_ahead
    assert batches_ahead(16, 1) == 16  # batch 1: an image per worker
    assert batches_ahead(16, 4) == 4
    assert batches_ahead(15, 4) == 4  # a partly filled batch still counts
    assert batches_ahead(2, 4) == 2  # never fewer than the least asked for
    assert batches_ahead(2, 1, least=3) == 3
