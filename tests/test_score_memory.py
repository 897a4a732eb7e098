"""Scoring memory and precision: ``score_batch_size: auto`` under a memory budget, autocast when ``amp`` is on."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.data.dataset import PreprocessConfig, load_subjects
from pipeline.data.transforms import preprocess_transforms
from pipeline.errors import InputError
from pipeline.model.network import diffusion_unet, make_scheduler
from pipeline.model.noise import make_noise
from pipeline.scoring import memory
from pipeline.scoring.memory import AutocastModel, LiveTensorBytes, SliceCost, memory_budget, peak_bytes, with_amp
from pipeline.scoring.score import load_scorer, score_subject
from pipeline.scoring.settings import ScoreSettings

PREPROCESS = PreprocessConfig(image_size=32, pixdim=(4.0, 4.0, 4.0))
MB = 2**20


def _network() -> torch.nn.Module:
    """The tiny scoring UNet with seeded random weights (a fresh UNet's output convolution is zero)."""
    net = diffusion_unet(32, 1, (32, 32, 32))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return net


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("memory") / "model.pt"
    torch.save(_network().state_dict(), path)
    return path


def _scorer(model_path, memory_gb=None, **settings):
    settings = ScoreSettings(**{"sampler": "x0", "t_start": 50, **settings})
    return load_scorer(diffusion_unet(32, 1, (32, 32, 32)), model_path, make_scheduler(), make_noise("gaussian", seed=1),
                       settings, PREPROCESS, memory_gb=memory_gb)


def test_live_tensor_bytes_counts_what_is_alive_at_once():
    def three_then_one():
        kept = [torch.zeros(MB // 4) for _ in range(3)]  # 3 x 1 MB alive together
        del kept
        view = torch.ones(MB // 4)
        view[:10].add_(1)  # a view and an in-place result share the storage: counted once
        return view

    assert peak_bytes(three_then_one) == 3 * MB
    with LiveTensorBytes() as counter:
        for _ in range(5):
            torch.zeros(MB // 4)  # each freed before the next
    assert counter.peak == MB and counter.live == 0


def test_auto_picks_a_smaller_batch_for_a_smaller_budget(model_path):
    """The measured cost of one x0 call on the tiny UNet grows with the slices; the batch follows the budget."""
    batches = [_scorer(model_path, memory_gb=gb, batch_size="auto").settings.batch_size for gb in (0.02, 0.05, 0.2)]
    assert 1 <= batches[0] < batches[1] < batches[2] <= memory.MAX_AUTO_BATCH
    cost = SliceCost(fixed=10 * MB, per_slice=MB)
    assert cost.largest_batch(int(memory.HEADROOM * 42 * MB)) == 32  # (42 MB - 10 MB fixed) / 1 MB per slice
    assert cost.largest_batch(MB) == 1 and cost.largest_batch(10**15) == memory.MAX_AUTO_BATCH


def test_maps_with_auto_equal_maps_with_an_explicit_batch_size(model_path, synth_root):
    """Auto only chooses how many slices go through the network at once: the maps are the same as with a batch
    of every slice of the subject, and as with the batch auto chose, given explicitly."""
    auto = _scorer(model_path, memory_gb=0.02, batch_size="auto")
    chosen = auto.settings.batch_size
    item = load_subjects(synth_root).data[0]
    transform = preprocess_transforms(PREPROCESS, with_label=True)
    depth = score_subject(item, transform, replace(auto, settings=replace(auto.settings, batch_size=1000)))
    assert chosen < depth.grid["map"].shape[-1]  # the subject takes several auto batches
    maps = [score_subject(item, transform, scorer).score
            for scorer in (auto, _scorer(model_path, batch_size=chosen))]
    for found in maps:
        np.testing.assert_allclose(found, depth.score, rtol=1e-5, atol=1e-6)
    assert depth.score.max() > 0


def test_memory_budget_from_the_setting_the_gpu_or_the_cpu_default(monkeypatch):
    cpu = torch.device("cpu")
    assert memory_budget(cpu) == int(memory.CPU_DEFAULT_GB * 2**30)
    assert memory_budget(cpu, 0.5) == 2**29
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    gpu = torch.device("cuda", 0)
    assert memory_budget(gpu) == int(10 * 2**30 * memory.GPU_FREE_FRACTION)
    assert memory_budget(gpu, 2) == 2 * 2**30 and memory_budget(gpu, 100) == memory_budget(gpu)
    for bad in (0, -1, "lots", True):
        with pytest.raises(InputError, match="score_memory_gb"):
            memory_budget(cpu, bad)


def test_auto_and_bad_batch_sizes_in_the_settings():
    assert ScoreSettings(batch_size="auto").batch_size == "auto"
    for bad in ("big", 0, 1.5):
        with pytest.raises(InputError, match="score_batch_size"):
            ScoreSettings(batch_size=bad)


def test_amp_autocasts_the_network_on_a_gpu_only():
    """With ``amp`` the network (not the samplers' arithmetic) runs under autocast on a GPU, its output back in
    float32; on CPU nothing changes, as in training. The wrapper itself, run on CPU in bfloat16, computes the
    same map to within half precision."""
    net = _network().eval()
    assert with_amp(net, True, "cpu") is net and with_amp(net, False, "cuda") is net and with_amp(None, True, "cuda") is None
    wrapped = with_amp(net, True, torch.device("cuda", 0))
    assert isinstance(wrapped, AutocastModel) and wrapped.model is net and wrapped.dtype == torch.float16
    x, t = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([50, 50])
    with torch.no_grad():
        full = net(x, t)
        half = AutocastModel(net, "cpu", torch.bfloat16)(x, t)
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    assert (half - full).abs().max() < 0.05 * full.abs().max()
