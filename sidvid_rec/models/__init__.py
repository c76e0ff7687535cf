"""Sequence models assembled from modules: HSTU over item tables (id/sid/sid_id) and COBRA."""
