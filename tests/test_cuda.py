"""What a GPU must give (skipped without CUDA; ``benchmarks/gpu_check.sh`` runs them with
``pytest -m cuda``): the same answer as the CPU, within mixed precision's tolerance, and
a training step that stays finite under AMP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def sample_tif(tmp_path_factory, cmu_svs):
    from napari_zoomin.samples import write_sample_slide

    out = tmp_path_factory.mktemp("cuda") / "s.tif"
    return write_sample_slide(out, size=8192, label="positive", seed=3).path


@pytest.mark.parametrize("mode", ["sample", "topk"])
def test_demo_model_gives_the_cpu_answer_on_cuda(sample_tif, mode):
    from napari_zoomin.engine.checkpoints import load_model
    from napari_zoomin.engine.inference import classify

    cpu = classify(sample_tif, load_model("demo"), draws=4, seed=0, device="cpu", mode=mode)
    gpu = classify(sample_tif, load_model("demo"), draws=4, seed=0, device="cuda", mode=mode)
    assert gpu.device.startswith("cuda")
    # float16 autocast: attention maps agree to about 1e-3 of their total mass
    a, b = np.asarray(cpu.stage1_attention), np.asarray(gpu.stage1_attention)
    assert a.shape == b.shape and np.abs(a - b).sum() < 0.02
    assert abs(cpu.probability - gpu.probability) < 0.05
    assert gpu.pixels_decoded == pytest.approx(cpu.pixels_decoded, rel=0.2)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_warm_up_keeps_the_model_on_its_device(device):
    """The widget warms the model the user chose a device for: a CPU model stays on
    the CPU on a machine with CUDA (classify's "auto" would have moved it)."""
    from napari_zoomin.engine.checkpoints import load_model
    from napari_zoomin.engine.inference import warm_up

    ckpt = load_model("demo", device)
    assert warm_up(ckpt) is not None
    assert next(ckpt.model.parameters()).device.type == device


def test_training_step_on_cuda_with_amp_is_finite_and_moves_the_weights():
    from napari_zoomin.models import ZoomIn, ZoomInConfig, grad_scaler
    from napari_zoomin.models.source import TensorSource

    torch.manual_seed(0)
    m = ZoomIn(
        ZoomInConfig(
            view_scale=0.25,
            stage2_scale=0.5,
            tile_size=(32, 32),
            subtile_size=(16, 16),
            n_samples=3,
            feature_dim=8,
            feature_hidden=8,
        )
    ).to("cuda")
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    scaler = grad_scaler(torch.device("cuda"))
    assert scaler.is_enabled()
    images = [TensorSource(torch.rand(3, 256, 192)) for _ in range(2)]
    before = [p.detach().clone() for p in m.parameters()]
    terms = m.loss(images, [1, 0], generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(terms.total)
    scaler.scale(terms.total).backward()
    scaler.step(opt)
    scaler.update()
    after = list(m.parameters())
    moved = sum(not torch.equal(a, b.detach()) for a, b in zip(before, after, strict=True))
    assert moved > 0 and all(torch.isfinite(p).all() for p in m.parameters())
