"""Data: readers (one per format) -> jagged user sequences + splits -> KJT batches."""

from sidvid_rec.data.sequences import SequenceData, Split, load_sequences, make_split

__all__ = ["SequenceData", "Split", "load_sequences", "make_split"]
