"""COBRA decoders: ``direct``, ``neighbor``, ``soft`` and ``beam`` (SPEC section 7).

Example::

    ctx = DecodeContext(model, sid_table, index, DecoderSettings(beam_size=5))
    top = decode("beam", ctx, batch, k=10)          # top.items [B, 10], distinct, no history
"""

from typing import TYPE_CHECKING, Callable, Dict

from sidvid_rec.config import DecoderSettings
from sidvid_rec.decode.base import DecodeContext, ItemSearcher, TopK
from sidvid_rec.decode.beam import decode_beam
from sidvid_rec.decode.direct import decode_direct
from sidvid_rec.decode.neighbor import decode_neighbor
from sidvid_rec.decode.soft import decode_soft

from sidvid_rec.types import DecoderKind

if TYPE_CHECKING:  # torchrec-free at run time: an export decodes without the training stack
    from sidvid_rec.data.batches import SequenceBatch

DECODERS: Dict[str, Callable[[DecodeContext, "SequenceBatch", int], TopK]] = {
    "direct": decode_direct,
    "neighbor": decode_neighbor,
    "soft": decode_soft,
    "beam": decode_beam,
}


def decode(kind: DecoderKind, ctx: DecodeContext, batch: "SequenceBatch", k: int) -> TopK:
    """Top-``k`` distinct items of every example of ``batch`` with decoder ``kind``."""
    if kind not in DECODERS:
        raise ValueError(f"unknown decoder {kind!r}; choose one of {', '.join(DECODERS)}")
    return DECODERS[kind](ctx, batch, k)


__all__ = ["DECODERS", "DecodeContext", "DecoderKind", "DecoderSettings", "ItemSearcher", "TopK", "decode"]
