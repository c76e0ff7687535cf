"""Semantic IDs: balanced residual k-means or an RQ-VAE, codebook artifacts, quality report."""

from sidvid_rec.semantic_ids.artifacts import PAD_CODE, SidArtifacts, load_report, load_sid_artifacts
from sidvid_rec.semantic_ids.codebook import SemanticIdCodebook
from sidvid_rec.semantic_ids.build import SemanticIds, build_semantic_ids, write_semantic_ids
from sidvid_rec.semantic_ids.kmeans import SizeBounds, balanced_kmeans, plain_kmeans, size_bounds
from sidvid_rec.semantic_ids.report import render_compare, render_markdown, sid_report
from sidvid_rec.semantic_ids.residual import RqParams, dedup_codes, quantize, residual_kmeans
from sidvid_rec.semantic_ids.rqvae import RqVaeParams, RqVaeResult, train_rqvae

__all__ = ["PAD_CODE", "RqParams", "RqVaeParams", "RqVaeResult", "SemanticIdCodebook", "SemanticIds",
           "SidArtifacts", "SizeBounds", "balanced_kmeans", "build_semantic_ids", "dedup_codes", "load_report",
           "load_sid_artifacts", "plain_kmeans", "quantize", "render_compare", "render_markdown",
           "residual_kmeans", "sid_report", "size_bounds", "train_rqvae", "write_semantic_ids"]
