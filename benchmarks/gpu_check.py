"""GPU check with torch alone: HSTU encoder + sampled-softmax parity (device vs CPU), HSTU
training-step throughput (fp32 and bf16) and a bf16 matmul baseline.

Needs only torch (e.g. torch 2.11 CUDA on a machine without network): fbgemm, torchrec and faiss
are *blocked* on import here (an import of any of them fails loudly), so what runs is exactly
the package's torch-only part: :mod:`sidvid_rec.ops`, :mod:`sidvid_rec.modules.hstu`,
:mod:`sidvid_rec.losses`. Item vectors come from a plain ``nn.Embedding`` instead of the
TorchRec tables.

Usage::

    benchmarks/gpu_check.sh                       # CUDA, default sizes
    python benchmarks/gpu_check.py --device cpu --batch 4 --max-len 16 --steps 1   # CPU fallback (tests)

Prints one JSON object (also written to ``--out``):

* ``parity``: max abs error of the encoder outputs, the loss and the gradients (inputs,
  parameters, item table) between ``--device`` and the CPU, fp32 with TF32 off;
* ``throughput.<fp32|bf16>``: ``tokens_per_s``, ``steps_per_s`` and ``flop_per_s`` of one
  training step (encoder forward + loss + backward; FLOPs counted analytically: the matmuls of
  every layer and the chunked attention, backward = 2x forward);
* ``matmul_bf16``: FLOP/s of a square bf16 matmul (what the device can do at best).
"""

import argparse
import copy
import importlib.abc
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

BLOCKED = ("fbgemm_gpu", "torchrec", "faiss")
"""Packages this check must not need."""


class _Blocker(importlib.abc.MetaPathFinder):
    """Refuses the stack's other packages, so a torch-only machine and this one behave alike."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"benchmarks/gpu_check.py runs on torch alone; {name} is blocked")
        return None


def block_stack_imports() -> None:
    if not any(isinstance(f, _Blocker) for f in sys.meta_path):
        sys.meta_path.insert(0, _Blocker())


block_stack_imports()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from sidvid_rec.losses import SampledSoftmaxLoss  # noqa: E402
from sidvid_rec.modules.hstu import HSTUEncoder  # noqa: E402
from sidvid_rec.ops import hstu_attention  # noqa: E402


def jagged_batch(batch: int, max_len: int, dim: int, seed: int, full: bool = False):
    """A random jagged batch (CPU): ``x [T, D]``, ``offsets [B+1]``, ``timestamps [T]``, ``targets [T]``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.full((batch,), max_len) if full else torch.randint(1, max_len + 1, (batch,), generator=g)
    offsets = torch.zeros(batch + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    total = int(offsets[-1])
    x = torch.randn(total, dim, generator=g) * 0.1
    ts = torch.cumsum(torch.randint(1, 10**5, (total,), generator=g), 0)
    return x, offsets, ts


def build(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(args.seed)
    model = nn.Module()
    model.encoder = HSTUEncoder(max_len=args.max_len, dim=args.dim, num_blocks=args.blocks, num_heads=args.heads,
                                dqk=args.dqk, dv=args.dv, dropout=0.0, attn_dropout=0.0)
    model.items = nn.Embedding(args.items + 1, args.dim)
    nn.init.normal_(model.items.weight, std=0.02)
    model.loss = SampledSoftmaxLoss(args.items, num_negatives=args.negatives, temperature=0.05)
    return model


def step(model: nn.Module, ids: torch.Tensor, offsets: torch.Tensor, ts: torch.Tensor, targets: torch.Tensor,
         negatives: torch.Tensor, host_offsets: torch.Tensor):
    """One training step's forward + backward: returns (outputs, loss)."""
    x = model.items(ids)
    h = model.encoder(x, offsets, ts, host_offsets=host_offsets)
    out = model.loss(h, targets, model.items, negative_ids=negatives)
    out.loss.backward()
    return h, out.loss


def _inputs(args: argparse.Namespace, device: torch.device, seed: int, full: bool = False):
    _, offsets, ts = jagged_batch(args.batch, args.max_len, args.dim, seed, full)
    total = int(offsets[-1])
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(1, args.items + 1, (total,), generator=g)
    targets = torch.randint(1, args.items + 1, (total,), generator=g)
    negatives = torch.randint(1, args.items + 1, (total, args.negatives), generator=g)
    moved = [t.to(device) for t in (ids, offsets, ts, targets, negatives)]
    return moved + [offsets]


def parity(args: argparse.Namespace, device: torch.device) -> Dict[str, float]:
    """Max abs differences between ``device`` and the CPU (fp32, TF32 off)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cpu_model = build(args)
        dev_model = copy.deepcopy(cpu_model).to(device)
        h_cpu, loss_cpu = step(cpu_model, *_inputs(args, torch.device("cpu"), args.seed))
        h_dev, loss_dev = step(dev_model, *_inputs(args, device, args.seed))
        grads = [(pc.grad, pd.grad) for pc, pd in zip(cpu_model.parameters(), dev_model.parameters())
                 if pc.grad is not None]
        return {
            "encoder_max_abs_err": float((h_dev.detach().cpu() - h_cpu.detach()).abs().max()),
            "loss_cpu": float(loss_cpu.detach()),
            "loss_abs_err": float((loss_dev.detach().cpu() - loss_cpu.detach()).abs()),
            "grad_max_abs_err": max(float((gd.cpu() - gc).abs().max()) for gc, gd in grads),
        }
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def step_flops(args: argparse.Namespace, offsets: torch.Tensor) -> float:
    """Analytic FLOPs of one training step (forward x 3 for forward + backward)."""
    total = int(offsets[-1])
    h, dim = args.heads, args.dim
    per_token = 2 * dim * h * (2 * args.dv + 2 * args.dqk) + 2 * h * args.dv * dim  # uvqk + o
    plan = hstu_attention.build_attention_plan(offsets, torch.zeros(total, dtype=torch.int64),
                                               torch.zeros(total, dtype=torch.int64), None, args.max_len, 128, True)
    attention = sum(2 * c.num_seqs * h * c.width * c.width * (args.dqk + args.dv) for c in plan.layout.chunks)
    loss = 2 * total * (1 + args.negatives) * dim
    return 3.0 * (args.blocks * (per_token * total + attention) + loss)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(args: argparse.Namespace, device: torch.device, precision: str) -> Dict[str, float]:
    model = build(args).to(device)
    model.encoder.precision = precision
    inputs = _inputs(args, device, args.seed + 7, full=True)
    flops = step_flops(args, inputs[-1])
    tokens = int(inputs[-1][-1])
    for _ in range(args.warmup):
        model.zero_grad(set_to_none=True)
        step(model, *inputs)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        model.zero_grad(set_to_none=True)
        step(model, *inputs)
    _sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    return {"tokens_per_step": tokens, "steps_per_s": 1.0 / seconds, "tokens_per_s": tokens / seconds,
            "flop_per_step": flops, "flop_per_s": flops / seconds}


def matmul_bf16(size: int, device: torch.device, repeats: int) -> Dict[str, float]:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    seconds = (time.perf_counter() - start) / repeats
    return {"size": size, "flop_per_s": 2.0 * size ** 3 / seconds}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default; fails without CUDA) or cpu (the fallback, for tests)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dqk", type=int, default=64)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--items", type=int, default=10000)
    p.add_argument("--negatives", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--matmul-repeats", type=int, default=20)
    p.add_argument("--parity-batch", type=int, default=16, help="sequences of the parity batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); "
              "run with --device cpu for the CPU fallback", file=sys.stderr)
        return 2
    report: Dict[str, Any] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "blocked_imports": list(BLOCKED),
        "sizes": {k: getattr(args, k) for k in ("batch", "max_len", "dim", "dqk", "dv", "heads", "blocks", "items",
                                                  "negatives")},
    }
    parity_args = copy.copy(args)
    parity_args.batch = min(args.parity_batch, args.batch)
    report["parity"] = parity(parity_args, device)
    report["throughput"] = {p: throughput(args, device, p) for p in ("fp32", "bf16")}
    report["matmul_bf16"] = matmul_bf16(args.matmul_size, device, args.matmul_repeats)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    report["stack_modules_loaded"] = loaded  # always [] (the blocker refuses them)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
