"""Dataset construction (scripts/build_dataset.py, layerdiff_model/data/construction): the automatic pipeline on
shapes pictures with stand-in backends recovers the true layers; broken inputs are counted, not fatal; a killed
run resumes without redoing or duplicating units; the shards read back with the webdataset library and train."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layerdiff_host import package_module

REPO = Path(__file__).resolve().parents[1]


def construction(name: str):
    return package_module(f"layerdiff_model.data.construction.{name}")


def shapes_pictures(folder: Path, count: int, size: int = 128, split: str = "test", start: int = 0):
    """Flat shapes pictures with their global prompts as sidecar captions; returns the true samples."""
    from layerdiff_toy import shapes
    from scripts.shapes_construction_proof import write_pictures

    truth = list(shapes.generate_samples(0, count, shapes.config_for_split(split, size=size), start=start))
    write_pictures(truth, folder)
    return truth


def build(args: list[str]) -> None:
    from scripts import build_dataset

    assert build_dataset.main(args) == 0


def test_phrases_of_captions():
    finder = construction("phrases").RulePhraseFinder()
    parts = finder.parts("A red circle, a green square and a blue ring on a white dotted background.")
    assert parts.objects == ["a red circle", "a green square", "a blue ring"]
    assert parts.background == "a white dotted background"
    parts = finder.parts("a dog sitting on a couch next to a cat")
    assert parts.objects == ["a dog", "a cat"] and parts.background == "a couch"
    assert finder.parts("a tall building in front of the sky").objects == ["a tall building"]
    assert finder.parts("a view of").objects == []


def test_pipeline_recovers_the_true_layers_of_shapes_pictures(tmp_path):
    """The proof (docs/DATASET.md): stand-in detector/segmenter, OpenCV inpainting, occlusion order; the shards
    are read with the webdataset library itself."""
    from layerdiff_toy.shapes_construction import score_construction
    from scripts.shapes_construction_proof import read_back_with_webdataset

    truth = shapes_pictures(tmp_path / "pictures", 40)
    out = tmp_path / "shards"
    build(["pictures", str(tmp_path / "pictures"), "--out", str(out), "--detector", "toy-colours", "--max-side",
           "0", "--images-per-unit", "16", "--no-progress", "--device", "cpu"])
    shards = sorted(out.glob("*.tar"))
    assert [p.name for p in shards] == [f"pictures-{i:06d}-000000.tar" for i in range(3)]
    recovered = read_back_with_webdataset(shards)
    score = score_construction(truth, recovered).to_json()
    assert score["recovered"] == 40 and score["matched"] == score["layers"]
    assert score["mask_iou_visible_mean"] >= 0.9, score
    assert score["depth_order_correct_overlapping"] >= 0.9, score  # 0.987 on 200 test pictures
    assert score["hole_psnr_db"] > 20, score
    first = next(s for s in recovered if s.key == truth[0].key)
    assert first.global_prompt == truth[0].global_prompt and first.background_prompt == truth[0].background_prompt
    report = json.loads((out / "report.json").read_text())
    assert report["pictures"] == 40 and report["samples"] == 40
    assert set(report["stage_seconds"]) >= {"detect", "segment", "depth order", "inpaint", "residue check"}


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_broken_inputs_are_counted_and_skipped(tmp_path):
    truth = shapes_pictures(tmp_path / "in", 3, size=64)
    folder = tmp_path / "in"
    picture = np.asarray(Image.open(folder / f"{truth[0].key}.png"))
    square = np.full((64, 64, 3), 25, np.uint8)  # a white square on black survives grayscale and CMYK
    square[16:40, 20:44] = 245
    caption = "a white square on a plain black background"
    (folder / "zero.png").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(_jpeg(picture)[:600])
    (folder / "text.png").write_bytes(b"this is not an image")
    for name, image in (("grey.png", Image.fromarray(square).convert("L")),
                        ("cmyk.tif", Image.fromarray(square).convert("CMYK")),
                        ("deep.png", Image.fromarray(square[..., 0].astype(np.uint16) * 257))):  # 16-bit grey
        image.save(folder / name)
        (folder / name).with_suffix(".txt").write_text(caption)
    Image.fromarray(picture).save(folder / "nothing.png")
    (folder / "nothing.txt").write_text("a pink elephant on a plain green background")  # names nothing found
    Image.fromarray(picture).save(folder / "uncaptioned.png")
    # an img2dataset-style shard that stops in the middle of its second image
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for key, data in (("000000000.png", (folder / f"{truth[0].key}.png").read_bytes()),
                          ("000000000.txt", truth[0].global_prompt.encode()), ("000000001.jpg", _jpeg(picture))):
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    shard.write_bytes(shard.read_bytes()[:last.offset_data + last.size // 2])
    out = tmp_path / "out"
    build(["pictures", str(folder), str(shard), "--out", str(out), "--detector", "toy-colours", "--no-progress",
           "--device", "cpu"])
    report = json.loads((out / "report.json").read_text())
    assert report["rejects"] == {
        "zero-byte image file": 1, "truncated image": 1, "unreadable image": 1,
        "no object found for the caption's phrases": 1, "no caption (give one, or a captioning model)": 1,
        "input shard ends mid-member (ReadError)": 1}, report["rejects"]
    assert report["converted"] == {"grayscale": 1, "CMYK": 1, "16-bit": 1}, report["converted"]
    samples = list(package_module("layerdiff_model.data.shards").iter_shard_samples(sorted(out.glob("*.tar"))))
    assert sorted(s.key for s in samples) == sorted([t.key for t in truth] + ["cmyk", "deep", "grey", "000000000"])
    for key in ("grey", "cmyk", "deep"):
        sample = next(s for s in samples if s.key == key)
        assert sample.foreground_prompts == ["a white square"]
        assert int(sample.masks.sum()) == 24 * 24 and bool(sample.masks[0, 0, 16:40, 20:44].all())


def test_work_shares_follow_the_launcher_environment():
    shares = construction("work_shares")
    units = list(range(10))
    assert shares.my_share(units, shares.worker_position({})) == units
    torchrun = [shares.worker_position({"RANK": str(r), "WORLD_SIZE": "4", "LOCAL_RANK": str(r)}) for r in range(4)]
    assert [p.launcher for p in torchrun] == ["torchrun"] * 4 and torchrun[2].local_rank == 2
    parts = [shares.my_share(units, p) for p in torchrun]
    assert sorted(u for part in parts for u in part) == units and parts[1] == [1, 5, 9]
    slurm = [shares.worker_position({"SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_MIN": "1",
                                     "SLURM_ARRAY_TASK_MAX": "3"}) for t in (1, 2, 3)]
    assert [(p.index, p.count) for p in slurm] == [(0, 3), (1, 3), (2, 3)]
    both = {shares.worker_position({"SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_COUNT": "2", "RANK": str(r),
                                    "WORLD_SIZE": "2"}).index for t in range(2) for r in range(2)}
    assert both == {0, 1, 2, 3}
    with pytest.raises(package_module("layerdiff_model.errors").DatasetError, match="WORLD_SIZE"):
        shares.worker_position({"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.slow  # two script runs in subprocesses (~20 s)
def test_killed_run_resumes_without_redoing_or_duplicating_units(tmp_path):
    """SIGKILL while the second unit is being written; the re-run keeps unit 1's files and finishes the rest."""
    shapes_pictures(tmp_path / "pictures", 36, size=128)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts" / "build_dataset.py"), "pictures", str(tmp_path / "pictures"),
           "--out", str(out), "--detector", "toy-colours", "--images-per-unit", "12", "--no-progress",
           "--device", "cpu", "--max-side", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    second = out / ".pictures-000001-000000.tar.tmp"
    while not second.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert second.exists(), "the run did not reach the second unit"  # killed mid-unit 2
    marker = out / "pictures-000000.done.json"
    assert marker.is_file() and not (out / "pictures-000001.done.json").exists()
    first_shard = out / "pictures-000000-000000.tar"
    before = (first_shard.read_bytes(), marker.stat().st_mtime_ns)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (first_shard.read_bytes(), marker.stat().st_mtime_ns) == before  # not redone
    assert "3 work units, 2 to build" in result.stderr
    assert not list(out.glob(".*.tmp"))
    records = list(package_module("layerdiff_model.data.shards").iter_shard_records(sorted(out.glob("*.tar"))))
    keys = [r.key for r in records]
    assert all(r.sample is not None for r in records) and len(keys) == len(set(keys)) == 36
    assert json.loads((out / "report.json").read_text())["samples"] == 36


def test_constructed_shards_train_the_toy_model(tmp_path, tiny_sd15):
    """The shards the pipeline writes feed scripts/train_layerdiff.py unchanged."""
    import comfy_host
    from scripts import train_layerdiff

    shapes_pictures(tmp_path / "pictures", 4, size=32)
    out = tmp_path / "shards"
    build(["pictures", str(tmp_path / "pictures"), "--out", str(out), "--detector", "toy-colours", "--no-progress",
           "--device", "cpu", "--min-mask-fraction", "0.005"])
    result = train_layerdiff.train(dict(
        checkpoint=str(comfy_host.host().model_path("checkpoints", tiny_sd15)), data=str(out),
        out=str(tmp_path / "m.safetensors"), run_dir=str(tmp_path / "run"), resolution=32, batch_size=2, steps=2,
        lr=1e-3, seed=3, toy_model=True, enhancer_width=32, checkpoint_every=0, log_every=1, progress=False))
    assert result["finished"] and result["step"] == 2 and result["skipped"] == 0, result
    assert np.isfinite(result["loss"]) and (tmp_path / "m.safetensors").is_file()


def test_layered_files_command_imports_psd_and_ora_and_counts_rejects(tmp_path):
    files = package_module("layerdiff_model.layers.layered_files")
    folder = tmp_path / "files"
    folder.mkdir()
    rng = np.random.default_rng(0)
    wall = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    car = np.zeros((64, 80, 4), np.uint8)
    car[10:30, 20:50] = (200, 30, 30, 255)
    composite = wall.copy()
    composite[10:30, 20:50] = (200, 30, 30)
    files.write_psd(folder / "street.psd", [("a red car", car)], ("a city street", wall), composite)
    files.write_ora(folder / "again.ora", [("a red car", car)], ("a city street", wall), composite)
    files.write_psd(folder / "plain.psd", [("Layer 1", car)], ("Background", wall), composite)  # default names
    (folder / "broken.psd").write_bytes((folder / "street.psd").read_bytes()[:300])
    out = tmp_path / "out"
    build(["layered-files", str(folder), "--out", str(out), "--no-progress", "--device", "cpu"])
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 2 and report["rejects"] == {"default-layer-names": 1, "unreadable": 1}, report
    samples = {s.key: s for s in package_module("layerdiff_model.data.shards").iter_shard_samples(
        sorted(out.glob("*.tar")))}
    assert set(samples) == {"street", "again"}
    for s in samples.values():
        assert s.foreground_prompts == ["a red car"] and s.background_prompt == "a city street"
        assert s.global_prompt == "a red car in front of a city street"
        assert int(s.masks.sum()) == 20 * 30
        assert np.array_equal((s.composed().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), composite)


def test_cutouts_command_composes_deterministic_samples_split_over_units(tmp_path):
    cut, bg = tmp_path / "cutouts", tmp_path / "backgrounds"
    cut.mkdir()
    bg.mkdir()
    for name, colour in (("red_apple", (220, 30, 30)), ("green_pear", (30, 200, 30))):
        rgba = np.zeros((40, 30, 4), np.uint8)
        rgba[5:35, 5:25] = (*colour, 255)
        Image.fromarray(rgba).save(cut / f"{name}.png")
    Image.fromarray(np.full((40, 30, 3), 9, np.uint8)).save(cut / "no_alpha.jpg")  # skipped: no alpha
    Image.fromarray(np.full((96, 128, 3), 120, np.uint8)).save(bg / "kitchen.png")
    (bg / "kitchen.txt").write_text("a wooden kitchen table")
    args = ["cutouts", "--cutouts", str(cut), "--backgrounds", str(bg), "--count", "5", "--size", "64", "--seed",
            "3", "--samples-per-unit", "2", "--no-progress", "--device", "cpu", "--max-foregrounds", "2"]
    build(args + ["--out", str(tmp_path / "a")])
    build(args + ["--out", str(tmp_path / "b")])
    shards = package_module("layerdiff_model.data.shards")
    a = list(shards.iter_shard_samples(sorted((tmp_path / "a").glob("*.tar"))))
    b = list(shards.iter_shard_samples(sorted((tmp_path / "b").glob("*.tar"))))
    assert len(sorted((tmp_path / "a").glob("*.tar"))) == 3 and len(a) == 5
    assert [s.key for s in a] == [f"cutout{i:08d}" for i in range(5)]
    for x, y in zip(a, b):
        assert x.foreground_prompts == y.foreground_prompts and bool((x.masks == y.masks).all())
    for s in a:
        assert set(s.foreground_prompts) <= {"red apple", "green pear"} and s.background_prompt == \
            "a wooden kitchen table"
        assert "in front of a wooden kitchen table" in s.global_prompt
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["samples"] == 5 and sum(report["rejects"].values()) == 1, report
