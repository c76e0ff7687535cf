"""Data: readers (one per format) -> jagged user sequences + splits -> KJT batches."""

from sidvid_rec.data.sequences import SequenceData, Split, load_sequences, make_split, training_item_counts

__all__ = ["SequenceData", "Split", "load_sequences", "make_split", "training_item_counts"]
