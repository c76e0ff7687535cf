"""CUDA checks (``@pytest.mark.gpu``: skipped with the reason where torch sees no CUDA device,
tests/conftest.py). The CPU-side halves of these checks are in tests/test_gpu_path.py."""

import copy
import json
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _exact_fp32():
    """Parity needs IEEE float32 matmuls (no TF32) on the GPU."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _batch(lengths, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    total = int(offsets[-1])
    x = torch.randn(total, dim, generator=g)
    ts = torch.cumsum(torch.randint(1, 10**6, (total,), generator=g), 0)
    return x, offsets, ts, lengths


def _encoder(max_len=32, heads=2):
    from sidvid_rec.modules.hstu import HSTUEncoder

    torch.manual_seed(0)
    return HSTUEncoder(max_len=max_len, dim=16, num_blocks=2, num_heads=heads, dqk=8, dv=8, dropout=0.0,
                       attn_dropout=0.0)


@pytest.mark.parametrize("fused", [True, False])
def test_jagged_hstu_forward_backward_on_cuda_equals_cpu(fused):
    cpu = _encoder()
    cpu.fused = fused
    gpu = copy.deepcopy(cpu).to(CUDA)
    x, offsets, ts, _ = _batch([7, 1, 0, 32, 12, 5], 16)
    xc = x.clone().requires_grad_(True)
    xg = x.to(CUDA).requires_grad_(True)
    out_c = cpu(xc, offsets, ts)
    out_g = gpu(xg, offsets.to(CUDA), ts.to(CUDA), host_offsets=offsets)
    weights = torch.randn(out_c.shape, generator=torch.Generator().manual_seed(3))
    (out_c * weights).sum().backward()
    (out_g * weights.to(CUDA)).sum().backward()
    assert (out_g.cpu() - out_c).abs().max() < 1e-5
    assert (xg.grad.cpu() - xc.grad).abs().max() < 1e-5
    for (name, pc), pg in zip(cpu.named_parameters(), gpu.parameters()):
        assert (pg.grad.cpu() - pc.grad).abs().max() < 1e-4, name


def test_jagged_hstu_on_cuda_equals_the_padded_reference():
    from sidvid_rec.modules.hstu_reference import PaddedHSTUEncoder
    from sidvid_rec.ops import jagged

    encoder = _encoder().to(CUDA)
    reference = PaddedHSTUEncoder(max_len=32, dim=16, num_blocks=2, num_heads=2, dqk=8, dv=8, dropout=0.0,
                                  attn_dropout=0.0)
    reference.load_state_dict({k: v.cpu() for k, v in encoder.state_dict().items()})
    x, offsets, ts, lengths = _batch([7, 1, 32, 12, 5], 16)
    out = encoder(x.to(CUDA), offsets.to(CUDA), ts.to(CUDA), host_offsets=offsets).cpu()
    padded = reference(jagged.jagged_to_padded(x, offsets, 32), lengths, jagged.jagged_to_padded(ts, offsets, 32))
    assert (jagged.padded_to_jagged(padded, offsets) - out).abs().max() < 1e-5


def test_encoder_step_never_syncs_the_host():
    encoder = _encoder().to(CUDA).train()
    x, offsets, ts, _ = _batch([7, 1, 32, 12, 5], 16)
    x, offsets_d, ts = x.to(CUDA).requires_grad_(True), offsets.to(CUDA), ts.to(CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        encoder(x, offsets_d, ts, host_offsets=offsets).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_bf16_encoder_on_cuda_is_close_to_fp32():
    encoder = _encoder().to(CUDA)
    x, offsets, ts, _ = _batch([7, 1, 32, 12, 5], 16)
    args = (x.to(CUDA), offsets.to(CUDA), ts.to(CUDA))
    fp32 = encoder(*args, host_offsets=offsets)
    encoder.precision = "bf16"
    bf16 = encoder(*args, host_offsets=offsets)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().max() < 5e-2


def test_stack_generator_and_rng_on_cuda():
    from sidvid_rec.stack import require_fbgemm
    from sidvid_rec.train import checkpoint as ckpt
    from sidvid_rec.train.trainer import negative_generator

    require_fbgemm.cache_clear()
    require_fbgemm()  # the CUDA fbgemm build runs its operators on CUDA tensors
    generator = negative_generator(CUDA)
    assert generator.device.type == "cuda"
    state = ckpt.rng_state(generator, CUDA)
    assert set(state) == {"torch", "generator", "cuda"}
    first = torch.rand(3, device=CUDA)
    assert ckpt.restore_rng_state(state, generator, CUDA) == []
    assert torch.equal(torch.rand(3, device=CUDA), first)


def test_faiss_index_on_the_current_device():
    from sidvid_rec.retrieval.faiss_index import VidIndex, gpu_available

    if not gpu_available():
        pytest.skip("faiss has no GPU support here")
    index = VidIndex.build(torch.randn(50, 8), torch.arange(1, 51), kind="flat", use_gpu=True)
    assert index.on_gpu and index.gpu == torch.cuda.current_device()


@pytest.mark.parametrize("mode", ["id", "sid", "sid_id", "cobra"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_training_step_per_mode_on_cuda(tmp_path, cache_dir, mode, precision):
    from sidvid_rec.cli import main

    common = [f"data.cache_dir={cache_dir}", "sids.encoder=tfidf", "sids.tfidf_dim=16", "sids.codebook_size=8",
              "sids.layers=2", "sids.kmeans_iters=3", "sids.balance_iters=3", "retrieval.use_gpu=false"]
    extra = []
    if mode != "id":
        sids = str(tmp_path / "sids")
        assert main(["sids", "build", "--out", sids, "--no-progress"] + common) == 0
        extra.append(f"sids.dir={sids}")
    run = str(tmp_path / "run")
    rc = main(["train", "--run-dir", run, f"model.mode={mode}", "train.device=cuda", f"train.precision={precision}",
               "train.epochs=1", "train.max_steps=2", "data.max_len=10", "train.batch_size=64", "model.dim=16",
               "model.dqk=16", "model.dv=16", "model.num_blocks=1", "eval.ks=[1,10]", "eval.batch_size=512"]
              + common + extra)
    assert rc == 0
    history = json.load(open(os.path.join(run, "history.json")))
    assert np.isfinite(history[-1]["loss"])
