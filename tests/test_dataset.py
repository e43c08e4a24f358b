"""Layered dataset format, validation, shards, torch datasets, bucketing and collation (docs/DESIGN.md 2.1, 2.6)."""
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_headless.product import product_module, product_names

REPO_ROOT = Path(__file__).resolve().parents[1]

batching = product_module("layerdiff_model.data.batching")
layered_sample = product_module("layerdiff_model.data.layered_sample")
loading = product_module("layerdiff_model.data.loading")
sample_folders = product_module("layerdiff_model.data.sample_files")
shards = product_module("layerdiff_model.data.shards")
data_validation = product_module("layerdiff_model.data.validation")
_split_member = product_names("layerdiff_model.data.shards", "_split_member")
DatasetError = product_names("layerdiff_model.errors", "DatasetError")
unpack = product_names("layerdiff_model.slots", "unpack")


def make_sample(n: int, size: int = 16, seed: int = 0, key: str = "") -> layered_sample.LayeredSample:
    """Random layers already quantised to k/255, so a PNG round trip is exact."""
    g = torch.Generator().manual_seed(seed)
    q = lambda *shape: torch.randint(0, 256, shape, generator=g).float() / 255  # noqa: E731
    masks = (torch.rand(n, 1, size, size, generator=g) > 0.5).float()
    masks[:, :, 0, 0] = 1  # never empty
    return layered_sample.LayeredSample(
        global_prompt=f"scene {seed}", background_prompt=f"background {seed}",
        foreground_prompts=[f"object {k} of {seed}" for k in range(1, n + 1)],
        background=q(3, size, size), foregrounds=q(n, 3, size, size), masks=masks,
        meta={"seed": seed}, key=key)


def assert_same(a: layered_sample.LayeredSample, b: layered_sample.LayeredSample) -> None:
    assert (a.global_prompt, a.background_prompt, a.foreground_prompts) == \
        (b.global_prompt, b.background_prompt, b.foreground_prompts)
    for name in ("background", "foregrounds", "masks"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-6), name
    assert a.meta == b.meta


def test_folder_round_trip_is_exact(tmp_path):
    sample = make_sample(2)
    sample_folders.write_sample(tmp_path / "s", sample, with_composite=True)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "background.png", "composite.png", "foreground_1.png", "foreground_2.png", "mask_1.png", "mask_2.png",
        "sample.json"]
    header = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert header["format"] == sample_folders.SAMPLE_FORMAT
    assert header["foreground_prompts"] == sample.foreground_prompts
    assert Image.open(tmp_path / "s" / "mask_1.png").mode == "L"
    assert Image.open(tmp_path / "s" / "foreground_1.png").mode == "RGB"
    back = sample_folders.read_sample(tmp_path / "s")
    assert_same(sample, back)
    assert back.key == "s" and back.num_foregrounds == 2 and back.size == (16, 16)
    assert back.layer_prompts == [sample.background_prompt, *sample.foreground_prompts]
    assert torch.allclose(back.composite, sample.composed(), atol=1 / 255)
    assert sample_folders.validate_sample(tmp_path / "s") == []


def test_write_is_atomic_and_refuses_to_clobber(tmp_path):
    sample_folders.write_sample(tmp_path / "s", make_sample(1, seed=1))
    with pytest.raises(DatasetError, match="already exists"):
        sample_folders.write_sample(tmp_path / "s", make_sample(2, seed=2))
    sample_folders.write_sample(tmp_path / "s", make_sample(2, seed=2), overwrite=True)
    assert sample_folders.read_sample(tmp_path / "s").num_foregrounds == 2
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temp folders left behind
    bad = make_sample(2)
    bad.foreground_prompts = ["only one"]
    with pytest.raises(DatasetError, match="foreground prompts"):
        sample_folders.write_sample(tmp_path / "bad", bad)
    assert not (tmp_path / "bad").exists()


def test_composite_formula_top_layer_wins():
    bg = torch.full((3, 2, 2), 0.1)
    fgs = torch.stack([torch.full((3, 2, 2), 0.9), torch.full((3, 2, 2), 0.5)])
    masks = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [0.0, 0.0]]]])  # [N=2, 1, 2, 2]
    out = layered_sample.composite(bg, fgs, masks)
    assert torch.allclose(out[0], torch.tensor([[0.9, 0.5], [0.1, 0.1]]))


def test_composite_is_compose_channel_first():
    LayeredImages, compose = product_names("layerdiff_model.layers.compose", "LayeredImages", "compose")
    g = torch.Generator().manual_seed(3)
    bg, fgs, masks = torch.rand(2, 3, 5, 4, generator=g), torch.rand(2, 3, 3, 5, 4, generator=g), \
        torch.rand(2, 3, 1, 5, 4, generator=g)  # [B,3,H,W], [B,N,3,H,W], soft [B,N,1,H,W]
    channel_last = LayeredImages(bg.movedim(1, -1), fgs.movedim(2, -1), masks[:, :, 0])
    assert torch.allclose(layered_sample.composite(bg, fgs, masks).movedim(1, -1), compose(channel_last), atol=1e-6)


# ----------------------------------------------------------------------------------------------- breakage


def _grey_mask(folder):
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(folder / "mask_1.png")


def _empty_mask(folder):
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "mask_1.png")


def _wrong_size(folder):
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(folder / "foreground_1.png")


def _edit_json(**changes):
    def edit(folder):
        header = json.loads((folder / "sample.json").read_text())
        header.update(changes)
        (folder / "sample.json").write_text(json.dumps(header))
    return edit


BREAKERS = {
    "missing_background": (lambda f: (f / "background.png").unlink(), "missing background.png"),
    "missing_mask": (lambda f: (f / "mask_2.png").unlink(), "mask_k.png files"),
    "missing_json": (lambda f: (f / "sample.json").unlink(), "missing sample.json"),
    "wrong_size": (_wrong_size, "is 12x8 but the layers are 16x16"),
    "grey_mask": (_grey_mask, "mask_1.png is not binary"),
    "empty_mask": (_empty_mask, "mask_1.png is empty"),
    "prompt_count": (_edit_json(foreground_prompts=["a", "b", "c"]), "3 foreground prompts"),
    "empty_prompt": (_edit_json(global_prompt="  "), "global_prompt is empty"),
    "corrupt_json": (lambda f: (f / "sample.json").write_text("{not json"), "not valid JSON"),
    "unreadable_image": (lambda f: (f / "foreground_2.png").write_bytes(b"\x89PNG garbage"),
                         "foreground_2.png is not a readable image"),
}


@pytest.mark.parametrize("kind", sorted(BREAKERS))
def test_validator_names_each_problem(tmp_path, kind):
    folder = sample_folders.write_sample(tmp_path / kind, make_sample(2))
    breaker, expected = BREAKERS[kind]
    breaker(folder)
    problems = sample_folders.validate_sample(folder)
    assert any(expected in p for p in problems), problems
    with pytest.raises(DatasetError, match=re.escape(expected)):
        sample_folders.read_sample(folder)


def test_mask_tolerates_a_few_stray_pixels(tmp_path):
    folder = sample_folders.write_sample(tmp_path / "s", make_sample(1, size=64))
    arr = np.array(Image.open(folder / "mask_1.png"))
    arr[0, :3] = 128  # 3 of 4096 pixels: under the 0.1% tolerance
    Image.fromarray(arr).save(folder / "mask_1.png")
    assert sample_folders.validate_sample(folder) == []


@pytest.fixture
def mixed_root(tmp_path):
    """4 good samples (N = 1, 2, 2, 3) and one broken sample per breaker (all N = 2)."""
    root = tmp_path / "data"
    for i, n in enumerate([1, 2, 2, 3]):
        sample_folders.write_sample(root / f"good{i}", make_sample(n, seed=i))
    for j, (kind, (breaker, _)) in enumerate(sorted(BREAKERS.items())):
        breaker(sample_folders.write_sample(root / f"bad_{kind}", make_sample(2, seed=100 + j)))
    return root


def test_validate_dataset_report(mixed_root):
    report = data_validation.validate_dataset(mixed_root)
    assert report.by_foregrounds == {1: 1, 2: 2, 3: 1}
    assert sorted(name for name, _ in report.bad) == sorted(f"bad_{k}" for k in BREAKERS)
    assert report.total == 4 + len(BREAKERS) and not report.ok
    text = report.format()
    assert "2 foreground(s): 2 samples" in text and "BAD bad_grey_mask" in text


def test_folder_dataset_skips_bad_samples_with_a_count(mixed_root, caplog):
    with caplog.at_level(logging.WARNING, logger="LayerDiff.dataset"):
        ds = loading.LayeredFolderDataset(mixed_root, resolution=16)  # drops samples bad in sample.json / file names
        for _ in range(2):  # second pass: no new warnings, same count
            items = [ds[i] for i in range(len(ds))]
    assert ds.skipped == len(BREAKERS)
    warned = [r for r in caplog.records if "Skipping bad layered sample" in r.getMessage()]
    assert len(warned) == len(BREAKERS)  # one warning per bad sample
    for i, item in enumerate(items):
        assert item["num_foregrounds"] == ds.foreground_counts[i]  # a replacement keeps the bucket
        assert item["key"].startswith("good")
        assert item["foregrounds"].shape == (item["num_foregrounds"], 3, 16, 16)
        assert item["masks"].shape == (item["num_foregrounds"], 1, 16, 16)


def test_folder_dataset_resizes_and_crops(tmp_path):
    sample = make_sample(2, size=32)
    sample.masks[:] = 0
    sample.masks[:, :, 8:24, 8:24] = 1
    sample_folders.write_sample(tmp_path / "d" / "a", sample)
    item = loading.LayeredFolderDataset(tmp_path / "d", resolution=(16, 8))[0]
    assert item["background"].shape == (3, 16, 8) and item["masks"].shape == (2, 1, 16, 8)
    assert set(item["masks"].unique().tolist()) <= {0.0, 1.0}
    assert item["masks"][0, 0, 8, 4] == 1 and item["masks"][0, 0, 0, 0] == 0
    with pytest.raises(DatasetError, match="multiples of 8"):
        loading.LayeredFolderDataset(tmp_path / "d", resolution=20)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="No usable"):
        loading.LayeredFolderDataset(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------- shards

WEBDATASET_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext


def test_shards_round_trip_in_webdataset_layout(tmp_path):
    samples = [make_sample(1 + i % 3, seed=i) for i in range(5)]
    paths = shards.write_shards(samples, tmp_path, samples_per_shard=2)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]  # no temp files left
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
    assert names[:4] == ["000000000.sample.json", "000000000.background.png", "000000000.foreground_1.png",
                         "000000000.mask_1.png"]
    keys = [WEBDATASET_KEY.match(n).group(1) for n in names]
    assert keys == sorted(keys) and len(set(keys)) == 2  # members of a sample are contiguous
    assert {WEBDATASET_KEY.match(n).group(2) for n in names} >= {"sample.json", "foreground_2.png", "mask_2.png"}
    back = list(shards.iter_shard_samples(paths))
    assert [s.key for s in back] == [f"{i:09d}" for i in range(5)]
    for a, b in zip(samples, back):
        assert_same(a, b)
    assert data_validation.validate_dataset(tmp_path).by_foregrounds == {1: 2, 2: 2, 3: 1}


def test_member_key_split_matches_webdataset():
    for name in ["k1.sample.json", "k1.foreground_12.png", "dir.x/k2.mask_1.png", "a/b/c.background.png"]:
        m = WEBDATASET_KEY.match(name)
        assert _split_member(name) == (m.group(1), m.group(2))
    with pytest.raises(DatasetError, match="key"):
        shards.write_shards([("bad.key", make_sample(1))], "/nonexistent-never-created", 1)


def _bad_shard(path: Path, good: layered_sample.LayeredSample):
    files = sample_folders.sample_files(good)
    grey = io.BytesIO()
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(grey, format="PNG")
    with tarfile.open(path, "w") as tar:
        for key in ("a", "b", "c"):
            for name, data in files.items():
                data = grey.getvalue() if (key == "b" and name == "mask_1.png") else data
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_shard_readers_skip_or_raise_on_bad_samples(tmp_path):
    _bad_shard(tmp_path / "s.tar", make_sample(2))
    with pytest.raises(DatasetError, match="s.tar:b"):
        list(shards.iter_shard_samples([tmp_path / "s.tar"]))
    assert [s.key for s in shards.iter_shard_samples([tmp_path / "s.tar"], skip_bad=True)] == ["a", "c"]
    report = data_validation.validate_shards([tmp_path / "s.tar"])
    assert report.good == 2 and report.bad[0][0] == "s.tar:b" and "not binary" in report.bad[0][1][0]
    ds = loading.LayeredShardDataset([tmp_path / "s.tar"], resolution=8)
    items = list(ds)
    assert [i["key"] for i in items] == ["a", "c"] and ds.skipped == 1
    assert items[0]["foregrounds"].shape == (2, 3, 8, 8)


def test_truncated_shard_is_reported(tmp_path):
    path = shards.write_shards([make_sample(1, seed=i) for i in range(3)], tmp_path, 10)[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    report = data_validation.validate_shards([path])
    assert not report.ok and any("truncated" in p or "unreadable" in p for _, ps in report.bad for p in ps)


def test_shard_dataset_splits_shards_across_ranks(tmp_path):
    paths = shards.write_shards([make_sample(1, seed=i) for i in range(6)], tmp_path, 1)
    keys = [[item["key"] for item in loading.LayeredShardDataset(paths, rank=r, world_size=2, shuffle_shards=True)]
            for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 3 and not set(keys[0]) & set(keys[1])


# ----------------------------------------------------------------------------------------------- batching


def test_collate_packs_slots_in_b_s_order():
    items = [loading.sample_to_item(make_sample(2, seed=s, key=f"k{s}")) for s in (1, 2)]
    batch = batching.collate_layered(items)
    assert batch["num_foregrounds"] == 2 and batch["keys"] == ["k1", "k2"]
    assert batch["slots"].shape == (2 * 5, 3, 16, 16)
    assert batch["global_prompts"] == ["scene 1", "scene 2"]
    assert batch["layer_prompts"][1] == ["background 2", "object 1 of 2", "object 2 of 2"]
    bg, fgs, masks = unpack(batch["slots"], 2)
    assert torch.equal(bg[1], items[1]["background"]) and torch.equal(fgs[0, 1], items[0]["foregrounds"][1])
    assert torch.equal(masks[1, 0], items[1]["masks"][0].expand(3, -1, -1))  # RGB-replicated mask
    assert torch.equal(batch["slots"][5 + 3], items[1]["masks"][0].expand(3, -1, -1))  # row = b*S + N + k
    with pytest.raises(DatasetError, match="mixes foreground counts"):
        batching.collate_layered([items[0], loading.sample_to_item(make_sample(1))])


COUNTS = [1, 2, 3, 2, 1, 1, 3, 2, 2, 1, 3, 3, 2, 1, 2, 1, 1, 2, 3, 2, 2, 1, 3]


def test_bucket_sampler_batches_one_foreground_count_and_covers_the_epoch():
    assert batching.bucket_by_foregrounds(range(5), COUNTS) == {1: [0, 4], 2: [1, 3], 3: [2]}
    sampler = batching.BucketBatchSampler(COUNTS, batch_size=3, seed=5)
    batches = list(sampler)
    assert all(len({COUNTS[i] for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(COUNTS)))
    assert len(batches) == len(batching.BucketBatchSampler(COUNTS, batch_size=3, seed=5))
    dropped = list(batching.BucketBatchSampler(COUNTS, batch_size=3, drop_last=True))
    assert all(len(b) == 3 for b in dropped)


def test_bucket_sampler_is_deterministic_and_reshuffles_per_epoch():
    a, b = batching.BucketBatchSampler(COUNTS, 2, seed=1), batching.BucketBatchSampler(COUNTS, 2, seed=1)
    a0, b0, a1 = list(a), list(b), list(a)
    assert a0 == b0 and a0 != a1 and a.state_dict() == {"epoch": 2, "position": 0, "seed": 1}
    assert list(batching.BucketBatchSampler(COUNTS, 2, seed=2)) != a0
    ranks = [batching.BucketBatchSampler(COUNTS, 2, seed=1, rank=r, world_size=2).epoch_batches(0) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}


def test_bucket_sampler_resumes_exactly():
    reference = batching.BucketBatchSampler(COUNTS, 2, seed=3)
    uninterrupted = list(reference) + list(reference)  # two epochs
    run = batching.BucketBatchSampler(COUNTS, 2, seed=3)
    first = []
    for batch in run:
        first.append(batch)
        if len(first) == 4:
            break
    state = json.loads(json.dumps(run.state_dict()))  # as a checkpoint would store it
    assert state == {"epoch": 0, "position": 4, "seed": 3}
    resumed = batching.BucketBatchSampler(COUNTS, 2, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    assert first + rest == uninterrupted
    with pytest.raises(DatasetError, match="seed"):
        batching.BucketBatchSampler(COUNTS, 2, seed=4).load_state_dict(state)


def test_dataloader_with_bucket_sampler(mixed_root):
    ds = loading.LayeredFolderDataset(mixed_root)
    sampler = batching.BucketBatchSampler(ds.foreground_counts, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=batching.collate_layered)
    batches = list(loader)
    # N=2 holds 2 good samples + 4 that fail only when their images are decoded (replaced by good N=2 samples)
    assert sorted(b["num_foregrounds"] for b in batches) == [1, 2, 2, 2, 3]
    assert ds.skipped == len(BREAKERS)
    for b in batches:
        assert b["slots"].shape[0] == len(b["keys"]) * (2 * b["num_foregrounds"] + 1)


def test_bucketed_batches_for_streams():
    items = [{"num_foregrounds": n, "i": i} for i, n in enumerate([1, 2, 1, 2, 2, 1, 3])]
    batches = list(batching.bucketed_batches(items, 2))
    assert [[x["i"] for x in b] for b in batches] == [[0, 2], [1, 3], [5], [4], [6]]  # leftovers by N
    assert len(list(batching.bucketed_batches(items, 2, drop_last=True))) == 2


# ----------------------------------------------------------------------------------------------- script


@pytest.mark.slow  # script runs in fresh processes (~12 s)
def test_validate_script_exit_codes(mixed_root, tmp_path):
    script = [sys.executable, str(REPO_ROOT / "scripts" / "validate_dataset.py")]
    bad = subprocess.run(script + [str(mixed_root), "--json", str(tmp_path / "r.json")], capture_output=True,
                         text=True, cwd=REPO_ROOT)
    assert bad.returncode == 1, bad.stderr
    assert "BAD bad_corrupt_json" in bad.stdout
    assert len(json.loads((tmp_path / "r.json").read_text())[0]["bad"]) == len(BREAKERS)
    for kind in BREAKERS:
        shutil.rmtree(mixed_root / f"bad_{kind}")
    from scripts import validate_dataset
    assert validate_dataset.main(validate_dataset.parse_args([str(mixed_root)])) == 0
