"""Unsharded model building blocks: embedding tables, fusion, the HSTU encoder."""
