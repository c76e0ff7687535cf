"""How often a trained COBRA run's SID head puts the test target's SID first / in its top 10.

Either head: ``whole`` (the softmax over the valid SIDs) or ``codes`` (the trie-constrained code
beam), through the decoders' own :class:`~sidvid_rec.decode.base.DecodeState`. Reads the run's
latest checkpoint.

Run::

    OMP_NUM_THREADS=1 python -m benchmarks.cobra_sid_hits runs/cc/whole runs/cc/codes
"""

import sys
from typing import Dict

import torch


def sid_hits(run: str, k: int = 10) -> Dict[str, float]:
    """``{"top1": share, "topk": share, "users": n}`` on the run's test split."""
    from sidvid_rec.config import load_run_config
    from sidvid_rec.data import load_sequences, make_split
    from sidvid_rec.data.batches import BatchIterator
    from sidvid_rec.decode.base import DecodeState
    from sidvid_rec.eval.evaluate import cobra_decode_context
    from sidvid_rec.models.build import build_model
    from sidvid_rec.train import checkpoint as ckpt

    cfg = load_run_config(run)
    data = load_sequences(cfg.data)
    model = build_model(cfg, data, table_device="cpu")
    model.load_state_dict(ckpt.read_full_tensors(ckpt.latest_checkpoint(run), "model.")[1])
    ctx = cobra_decode_context(model.eval(), cfg)
    split = make_split(data, "test", cfg.data.protocol, cfg.data.max_len)
    top1 = topk = users = 0
    with torch.no_grad():
        for batch in BatchIterator(split, 256, shuffle=False):
            _, _, sids = DecodeState(ctx, batch).top_sids(k)
            target = model.sid_of_item[batch.jagged("target_id").values()]
            top1 += int((sids[:, 0] == target).sum())
            topk += int((sids == target[:, None]).any(dim=1).sum())
            users += target.numel()
    return {"top1": top1 / users, "topk": topk / users, "users": users}


if __name__ == "__main__":
    torch.set_num_threads(1)
    for path in sys.argv[1:]:
        print(path, sid_hits(path), flush=True)
