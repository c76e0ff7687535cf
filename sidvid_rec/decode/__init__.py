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
from sidvid_rec.errors import ConfigError

from sidvid_rec.types import DecoderKind

if TYPE_CHECKING:  # torchrec-free at run time: an export decodes without the training stack
    from sidvid_rec.data.batches import SequenceBatch

DECODERS: Dict[str, Callable[[DecodeContext, "SequenceBatch", int], TopK]] = {
    "direct": decode_direct,
    "neighbor": decode_neighbor,
    "soft": decode_soft,
    "beam": decode_beam,
}


CODES_HEAD_DECODERS = ("direct", "neighbor", "beam")
"""Decoders of a COBRA model with ``model.cobra_sid_head=codes`` (``soft`` mixes SIDs by their
whole-SID cosines, which that head does not produce)."""


def check_codes_head_decoder(kind: str) -> None:
    """One-line ConfigError unless decoder ``kind`` works with the codes head."""
    if kind not in CODES_HEAD_DECODERS:
        raise ConfigError(f"decoder {kind!r} needs the whole-SID head (model.cobra_sid_head=whole); with "
                          f"model.cobra_sid_head=codes use {', '.join(CODES_HEAD_DECODERS)}")


def decode(kind: DecoderKind, ctx: DecodeContext, batch: "SequenceBatch", k: int) -> TopK:
    """Top-``k`` distinct items of every example of ``batch`` with decoder ``kind``."""
    if kind not in DECODERS:
        raise ValueError(f"unknown decoder {kind!r}; choose one of {', '.join(DECODERS)}")
    if ctx.sid_beam is not None:
        check_codes_head_decoder(kind)
    return DECODERS[kind](ctx, batch, k)


__all__ = ["CODES_HEAD_DECODERS", "DECODERS", "check_codes_head_decoder", "DecodeContext", "DecoderKind", "DecoderSettings", "ItemSearcher", "TopK", "decode"]
