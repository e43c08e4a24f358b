"""Tests of the host-free training loop (layerdiff_model/training/ and friends) with a small pure-torch model
that implements the TrainableModel protocol. The ComfyUI side is covered by tests/test_training.py."""
from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from comfy_headless.product import product_module, product_names
from layerdiff_toy.shapes import ShapesConfig, generate_samples

REPO = Path(__file__).resolve().parents[1]

train_state = product_module("layerdiff_model.training.state")
write_sample = product_names("layerdiff_model.data.sample_files", "write_sample")
EMA = product_names("layerdiff_model.training.ema", "EMA")
read_metrics = product_names("layerdiff_model.training.log", "read_metrics")
Trainer = product_names("layerdiff_model.training.loop", "Trainer")
TrainConfig, TrainConfigError, as_config, build_parser = product_names(
    "layerdiff_model.training.config", "TrainConfig", "TrainConfigError", "as_config", "build_parser")


class FakeDiffusion(torch.nn.Module):
    """Latents = 8x8 average pooling (+ a zero 4th channel); noise prediction = conv(noisy) + prompt embedding."""

    num_timesteps = 1000

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.device = torch.device("cpu")
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.time = torch.nn.Linear(1, 4)
        self.words = torch.nn.Embedding(64, 4)
        self.exported = []

    def trainable_parameters(self):
        return list(self.named_parameters())

    def encode_images(self, images):
        pooled = torch.nn.functional.avg_pool2d(images, 8) * 2 - 1
        return torch.cat([pooled, torch.zeros_like(pooled[:, :1])], dim=1)

    def encode_prompts(self, global_prompts, layer_prompts):
        ids = [zlib.crc32(g.encode()) % 64 for g in global_prompts]
        return self.words(torch.tensor(ids))

    def noise_latents(self, latents, noise, timesteps):
        a = (1 - timesteps.float() / 1000).view(-1, 1, 1, 1)
        return a.sqrt() * latents + (1 - a).sqrt() * noise

    def predict_noise(self, noisy, timesteps, conds):
        rows = noisy.shape[0] // conds.shape[0]
        cond = conds.repeat_interleave(rows, 0)[:, :, None, None]
        return self.conv(noisy) + self.time(timesteps[:, None].float() / 1000)[:, :, None, None] + cond

    def autograd_context(self):
        return torch.autograd.graph.allow_mutation_on_saved_tensors()

    def sample_layers(self, global_prompt, layer_prompts, seed, steps, cfg):
        s = 1 if layer_prompts is None else 2 * len(layer_prompts) - 1
        return torch.rand(s, 3, 16, 16, generator=torch.Generator().manual_seed(seed))

    def export(self, path, metadata):
        path = Path(path)
        train_state.atomic_torch_save({k: v.detach().clone() for k, v in self.state_dict().items()}, path)
        self.exported.append(dict(metadata))
        return path


def make_dataset(root: Path, count: int = 6, size: int = 32) -> Path:
    for i, sample in enumerate(generate_samples(3, count, ShapesConfig(size=size, min_foregrounds=1,
                                                                       max_foregrounds=2))):
        write_sample(root / f"{i:03d}", sample, overwrite=True)
    return root


def config(tmp: Path, data: Path, run: str, **kw) -> TrainConfig:
    base = dict(checkpoint="unused.safetensors", data=str(data), out=str(tmp / f"{run}.pt"), run_dir=str(tmp / run),
                resolution=16, batch_size=2, steps=6, lr=1e-2, seed=5, checkpoint_every=2, log_every=1,
                progress=False)
    base.update(kw)
    return as_config(base)


def run(cfg: TrainConfig, model_seed: int = 0) -> tuple[dict, FakeDiffusion]:
    model = FakeDiffusion(model_seed)
    return Trainer(cfg, model).run(), model


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("layers"))


def test_resume_reaches_the_same_weights_and_optimizer_state(tmp_path, data):
    opts = dict(grad_accum=2, ema_decay=0.9, lr_warmup=2, lr_schedule="cosine", steps=7)
    whole, whole_model = run(config(tmp_path, data, "whole", **opts))
    first, _ = run(config(tmp_path, data, "split", stop_after=3, **opts))
    assert first["step"] == 3 and not first["finished"]
    second, split_model = run(config(tmp_path, data, "split", resume=True, **opts), model_seed=99)
    assert second["resumed_at"] == 3 and second["finished"]
    for (name, a), (_, b) in zip(whole_model.named_parameters(), split_model.named_parameters()):
        assert torch.equal(a, b), name
    a = train_state.load_checkpoint(train_state.latest_checkpoint(tmp_path / "whole"))
    b = train_state.load_checkpoint(train_state.latest_checkpoint(tmp_path / "split"))
    for k in a["optimizer"]["state"]:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["optimizer"]["state"][k][field], b["optimizer"]["state"][k][field])
    assert a["scheduler"] == b["scheduler"] and a["data"] == b["data"]
    for k in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k])
    exported_a = torch.load(tmp_path / "whole.pt")
    exported_b = torch.load(tmp_path / "split.pt")
    assert all(torch.equal(exported_a[k], exported_b[k]) for k in exported_a)
    steps = [m["step"] for m in read_metrics(tmp_path / "split")]
    assert steps == list(range(1, 8)), "metrics of the resumed run read like one run"


def test_interrupted_run_without_resume_flag_and_incompatible_resume_are_refused(tmp_path, data):
    run(config(tmp_path, data, "r", stop_after=2))
    with pytest.raises(TrainConfigError, match="--resume"):
        run(config(tmp_path, data, "r"))
    with pytest.raises(TrainConfigError, match=r"--batch-size 2 -> 3"):
        run(config(tmp_path, data, "r", resume=True, batch_size=3))


def test_checkpoint_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    good = train_state.save_checkpoint(tmp_path, 1, {"trainable": {"w": torch.ones(3)}})

    def broken_save(obj, fh, *a, **k):
        fh.write(b"partial bytes of a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train_state.save_checkpoint(tmp_path, 2, {"trainable": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    folder = train_state.checkpoint_dir(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == [good.name], "no temp file and no step-2 file left"
    assert torch.equal(train_state.load_checkpoint(good)["trainable"]["w"], torch.ones(3))
    assert train_state.latest_checkpoint(tmp_path) == good


def test_old_checkpoints_are_pruned_and_corrupt_ones_are_reported(tmp_path):
    for step in (1, 2, 3):
        train_state.save_checkpoint(tmp_path, step, {}, keep=2)
    assert [s for s, _ in train_state.list_checkpoints(tmp_path)] == [2, 3]
    bad = train_state.checkpoint_dir(tmp_path) / train_state.checkpoint_name(4)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(train_state.CheckpointError, match="cannot be read"):
        train_state.load_checkpoint(bad)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    data = make_dataset(tmp_path / "data", count=6)
    (data / "001" / "foreground_1.png").write_bytes(b"not a png")  # only found when the images are loaded
    summary, model = run(config(tmp_path, data, "bad", steps=4))
    assert summary["finished"] and summary["skipped"] == 1
    assert model.exported[-1]["skipped_samples"] == 1
    assert read_metrics(tmp_path / "bad")[-1]["skipped"] == 1


def test_empty_dataset_error_carries_the_validator_report(tmp_path):
    data = make_dataset(tmp_path / "data", count=1)
    (data / "000" / "mask_1.png").unlink()
    with pytest.raises(Exception, match=r"(?s)train_layerdiff.py.*no usable sample.*BAD 000"):
        run(config(tmp_path, data, "empty"))


def test_validation_grid_and_prompt_dropout(tmp_path, data):
    summary, _ = run(config(tmp_path, data, "val", steps=2, validate_every=2, validation_samples=2,
                            prompt_dropout=0.5))
    grid = tmp_path / "val" / "validation" / "step-00000002.png"
    with Image.open(grid) as im:
        width, height = im.size
    assert height == 2 * 18 + 2  # two prompts, 16 px images, 2 px padding
    assert width in (4 * 18 + 2, 6 * 18 + 2)  # S slots + composite of the widest row (1 or 2 foregrounds)


def test_loss_decreases_on_a_tiny_overfit_task(tmp_path):
    data = make_dataset(tmp_path / "one", count=1)
    summary, model = run(config(tmp_path, data, "fit", steps=80, batch_size=1, lr=2e-2, prompt_dropout=0.0,
                                checkpoint_every=0))
    losses = [m["loss"] for m in read_metrics(tmp_path / "fit")]
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20


def test_ema_tracks_parameters_and_swaps_back():
    p = torch.nn.Parameter(torch.zeros(2))
    ema = EMA([("p", p)], decay=0.5)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()  # first decay min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.shadow["p"], torch.full((2,), 0.9))
    with ema.swapped():
        assert torch.allclose(p, torch.full((2,), 0.9))
    assert torch.equal(p.detach(), torch.ones(2))


@pytest.mark.slow  # script runs in fresh processes (~12 s)
def test_help_lists_every_option():
    text = subprocess.run([sys.executable, str(REPO / "scripts" / "train_layerdiff.py"), "--help"],
                          capture_output=True, text=True, check=True).stdout
    for flag in ("--checkpoint", "--data", "--out", "--run-dir", "--resolution", "--batch-size", "--steps", "--lr",
                 "--seed", "--train", "--composites", "--max-foregrounds", "--no-inter-layer", "--no-intra-layer",
                 "--no-enhancer", "--enhancer-width", "--grad-accum", "--mixed-precision", "--grad-checkpointing",
                 "--ema-decay", "--checkpoint-every", "--validate-every", "--resume", "--prompt-dropout",
                 "--toy-model", "--threads", "--stop-after", "--comfyui", "--init-weights", "--workers"):
        assert flag in text, flag
    parser_dests = {a.dest for a in build_parser()._actions} - {"help"}
    assert parser_dests == set(TrainConfig().to_dict()) - {"extra"}, "every config field has exactly one option"


def test_config_errors_name_the_option():
    base = dict(checkpoint="c", data="d", out="o", run_dir="r")
    with pytest.raises(TrainConfigError, match="--composites"):
        as_config({**base, "train": "unet"})
    with pytest.raises(TrainConfigError, match="--resolution"):
        as_config({**base, "resolution": 30})
    with pytest.raises(TrainConfigError, match="unknown training options"):
        as_config({**base, "learning_rate": 1})
    assert as_config(["--checkpoint", "c", "--data", "d", "--out", "o", "--run-dir", "r", "--train", "unet",
                      "--composites"]).trains_unet
    json.dumps(as_config(base).to_dict())


def test_min_snr_weighting_down_weights_low_noise_rows():
    training = product_module("layerdiff_model.training.loop")

    pred, noise = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)  # per-row MSE 1
    sigmas = torch.tensor([0.1, 10.0])  # SNR 100 (low noise) and 0.01 (high noise)
    plain = training.epsilon_loss(pred, noise)
    weighted = training.epsilon_loss(pred, noise, sigmas, min_snr_gamma=5.0)
    assert float(plain) == pytest.approx(1.0)
    assert float(weighted) == pytest.approx((5.0 / 100 + 1.0) / 2)  # min(1, gamma / SNR) per row
    assert float(training.epsilon_loss(pred, noise, sigmas, min_snr_gamma=0.0)) == pytest.approx(1.0)


def test_high_noise_weight_keeps_x0_errors_of_noisy_rows():
    training = product_module("layerdiff_model.training.loop")

    pred, noise = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)  # per-row eps-MSE 1
    sigmas = torch.tensor([0.1, 10.0])
    # v-prediction weighting (SNR + 1 in x0 terms) = eps-MSE * (1 + sigma^2)
    v_like = training.epsilon_loss(pred, noise, sigmas, high_noise_weight=1.0)
    assert float(v_like) == pytest.approx(((1 + 0.01) + (1 + 100.0)) / 2)
    both = training.epsilon_loss(pred, noise, sigmas, min_snr_gamma=5.0, high_noise_weight=0.5)
    assert float(both) == pytest.approx(((0.05 + 0.5 * 0.01) + (1.0 + 0.5 * 100.0)) / 2)
    with pytest.raises(TrainConfigError, match="--high-noise-weight"):
        as_config(["--checkpoint", "x", "--data", "y", "--out", "z.safetensors", "--run-dir", "r",
                   "--high-noise-weight", "-1"])


def test_base_model_images_add_each_layer_with_its_own_prompt(data):
    BatchStream, base_model_images, open_dataset = product_names(
        "layerdiff_model.training.data", "BatchStream", "base_model_images", "open_dataset")

    batch = next(iter(BatchStream(open_dataset(str(data), 32, 0), 2, 0)))
    n = batch["num_foregrounds"]
    composites, prompts = base_model_images(batch, layer_images=False)
    assert composites.shape[0] == 2 and prompts == list(batch["global_prompts"])
    images, prompts = base_model_images(batch, layer_images=True)
    assert images.shape[0] == 2 + 2 * (1 + n) == len(prompts)
    torch.testing.assert_close(images[:2], composites)
    assert prompts[2:] == [p for lp in batch["layer_prompts"] for p in lp]
    torch.testing.assert_close(images[2], batch["slots"][0])  # sample 0's background slot
    torch.testing.assert_close(images[3 + n], batch["slots"][2 * n + 1])  # sample 1's background slot
    with pytest.raises(TrainConfigError, match="--layer-images"):
        as_config(["--checkpoint", "x", "--data", "y", "--out", "z.safetensors", "--run-dir", "r", "--layer-images"])


DISTRIBUTED_WORKER = r'''
import os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from layerdiff_model.training.loop import Distributed, TrainingDivergedError  # this process: pure, no ComfyUI


def worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    d = Distributed(rank, 2, rank)
    shared, only_rank1 = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    shared.grad = torch.full((3,), float(rank + 1))   # rank 0: 1, rank 1: 2 -> mean 1.5
    if rank == 1:
        only_rank1.grad = torch.tensor([4.0, 6.0])    # rank 0 never used it -> joins with zeros: mean 2, 3
    d.average_gradients([shared, only_rank1])
    result = {"shared": shared.grad.tolist(), "only_rank1": only_rank1.grad.tolist()}
    d.check_in_sync([("a", shared)], step=1)          # equal on both ranks: passes
    with torch.no_grad():
        shared += rank
    try:
        d.check_in_sync([("a", shared)], step=2)
        result["diverged"] = ""
    except TrainingDivergedError as exc:
        result["diverged"] = str(exc)
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(port, sys.argv[2]), nprocs=2)
'''


def test_two_processes_average_gradients_and_detect_divergence(tmp_path):
    """Two Gloo processes: gradients are averaged (a parameter only one rank used joins with zeros on the other,
    so both reduce the same tensors), equal weights pass the sync check, different weights raise a clear error."""
    script = tmp_path / "worker.py"
    script.write_text(DISTRIBUTED_WORKER)
    subprocess.run([sys.executable, str(script), str(REPO), str(tmp_path)], check=True, timeout=120)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for r in results:
        assert r["shared"] == [1.5, 1.5, 1.5] and r["only_rank1"] == [2.0, 3.0]
        assert "diverged" in r["diverged"] and "values of a" in r["diverged"] and "at step 2" in r["diverged"]


def test_mask_follow_puts_the_layer_slots_ahead_of_the_masks(tmp_path, data):
    training = product_module("layerdiff_model.training.loop")

    n, samples = 2, 4000
    shared = torch.randint(0, 1000, (samples,)).repeat_interleave(2 * n + 1)
    gen = torch.Generator().manual_seed(0)
    out = training.layers_ahead_of_masks(shared, n, 0.5, gen).view(samples, 2 * n + 1)
    before = shared.view(samples, 2 * n + 1)
    assert torch.equal(out[:, n + 1:], before[:, n + 1:])  # masks keep the sample's timestep
    assert (out[:, :n + 1] <= before[:, :n + 1]).all()  # layers are never noisier than their masks
    moved = (out[:, 0] != before[:, 0])
    assert 0.45 < moved.float().mean() < 0.55  # about prob of the samples (a few draw t itself)
    assert (out[:, :n + 1] == out[:, :1]).all()  # background and foregrounds of a sample share one timestep
    ratio = out[moved, 0].float() / before[moved, 0].float()
    assert abs(float(ratio.mean()) - 0.5) < 0.03  # uniform below the mask timestep
    assert torch.equal(training.layers_ahead_of_masks(shared, n, 0.0, gen), shared)
    # in a run: it trains, and a resume with another value is refused (the noise depends on it)
    summary, _ = run(config(tmp_path, data, "follow", steps=2, checkpoint_every=1, mask_follow_prob=0.5))
    assert summary["finished"]
    with pytest.raises(TrainConfigError, match="--mask-follow-prob"):
        run(config(tmp_path, data, "follow", steps=4, resume=True, mask_follow_prob=0.0))
    with pytest.raises(TrainConfigError, match="--mask-follow-prob"):
        as_config({**dict(checkpoint="c", data="d", out="o", run_dir="r"), "mask_follow_prob": 1.5})
