"""Range checks of the numeric config fields: bad values are refused at load, in one line."""

import dataclasses
import subprocess
import sys
import typing

import pytest
import yaml

from sidvid_rec import config as config_module
from sidvid_rec.config import Config, config_from_dict, dump_config, load_config
from sidvid_rec.errors import ConfigError

BIG = str(10**30)  # an int YAML parses exactly and torch cannot take (beyond int64)

# Each of these loaded before and then crashed with a traceback later (in torch, numpy, FAISS or
# after the first epoch), or silently trained with a meaningless value.
BAD = [
    ("train.lr=.nan", "train.lr must be positive and finite, got nan"),
    ("train.lr=.inf", "train.lr must be positive and finite, got inf"),
    ("train.lr=0", "train.lr must be positive and finite, got 0.0"),
    ("train.embedding_lr=-0.1", "train.embedding_lr must be positive and finite"),
    ("loss.temperature=.inf", "loss.temperature must be positive and finite, got inf"),
    ("loss.temperature=.nan", "loss.temperature must be positive and finite"),
    ("eval.soft_tau=0", "eval.soft_tau must be positive and finite"),
    ("eval.beta=-1", "eval.beta must be >= 0 and finite"),
    ("eval.beta=.inf", "eval.beta must be >= 0 and finite"),
    ("train.betas=[1.0, 0.9]", "train.betas values must lie in [0, 1), got (1.0, 0.9)"),
    ("train.betas=[0.9, -0.1]", "train.betas values must lie in [0, 1)"),
    ("train.betas=[0.9, .nan]", "train.betas values must lie in [0, 1)"),
    ("train.weight_decay=-0.01", "train.weight_decay must be >= 0 and finite"),
    ("train.weight_decay=.inf", "train.weight_decay must be >= 0 and finite"),
    ("train.seed=-1", "train.seed must lie in [0, 2147483647], got -1"),
    ("sids.seed=-1", "sids.seed must lie in [0, 2147483647], got -1"),
    ("train.seed=2147483648", "train.seed must lie in [0, 2147483647]"),
    (f"train.seed={BIG}", f"train.seed must fit a 64-bit integer, got {BIG}"),
    (f"train.max_steps={BIG}", "train.max_steps must fit a 64-bit integer"),
    (f"eval.ks=[10, {BIG}]", "eval.ks must fit a 64-bit integer"),
    ("sids.seed=2147483647", "sids.seed + sids.layers - 1 (the last layer's k-means seed) must be at most"),
    ("train.eval_every=0", "train.eval_every must be positive, got 0"),
    ("train.patience=0", "train.patience must be positive"),
    ("train.patience=-3", "train.patience must be positive"),
    ("train.max_steps=-1", "train.max_steps must be >= 0, got -1"),
    ("train.checkpoint_every=-1", "train.checkpoint_every must be >= 0"),
    ("model.num_time_buckets=-1", "model.num_time_buckets must be >= 0"),
    ("model.sid_table_size=-1", "model.sid_table_size must be 0 or at least 2, got -1"),
    ("model.sid_table_size=1", "model.sid_table_size must be 0 or at least 2, got 1"),
    ("model.cobra_sid_layers=-1", "model.cobra_sid_layers must be >= 0"),
    ("loss.queue_size=0", "loss.queue_size must be positive"),
    ("loss.vid_num_negatives=-1", "loss.vid_num_negatives must be >= 0"),
    ("loss.vid_max_in_batch=-1", "loss.vid_max_in_batch must be >= 0"),
    ("loss.vid_weight=-0.5", "loss.vid_weight must be >= 0 and finite"),
    ("loss.vid_weight=.nan", "loss.vid_weight must be >= 0 and finite"),
    ("eval.beam_ann=0", "eval.beam_ann must be positive"),
    ("retrieval.hnsw_m=0", "retrieval.hnsw_m must be at least 2"),
    ("retrieval.hnsw_m=1", "retrieval.hnsw_m must be at least 2"),
    ("retrieval.ef_search=0", "retrieval.ef_search must be positive"),
    ("retrieval.nprobe=0", "retrieval.nprobe must be positive"),
    ("retrieval.ivf_nlist=-1", "retrieval.ivf_nlist must be >= 0"),
    ("sids.max_tokens=0", "sids.max_tokens must be positive"),
    ("sids.tfidf_dim=0", "sids.tfidf_dim must be positive"),
    ("sids.kmeans_iters=0", "sids.kmeans_iters must be positive"),
    ("sids.max_points_per_code=0", "sids.max_points_per_code must be positive"),
    ("sids.balance_iters=-1", "sids.balance_iters must be >= 0"),
    ("sids.threads=-1", "sids.threads must be >= 0"),
    ("eval.ks=[1, 5, 50]", "eval.ks must include 10 (validation ndcg@10 selects checkpoints"),
]


@pytest.mark.parametrize("override, message", BAD)
def test_bad_values_are_refused_at_load(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("override", [
    "train.betas=[0.0, 0.0]", "train.weight_decay=0", "train.seed=0", "train.seed=2147483647",
    "sids.seed=2147483645", "train.max_steps=0", "train.checkpoint_every=0", "model.num_time_buckets=0",
    "model.sid_table_size=0", "model.sid_table_size=2", "model.cobra_sid_layers=0", "loss.vid_weight=0",
    "loss.vid_num_negatives=0", "loss.vid_max_in_batch=0", "retrieval.ivf_nlist=0", "retrieval.hnsw_m=2",
    "sids.balance_iters=0", "sids.threads=0", "eval.beta=0", "eval.alpha=1", "eval.ks=[10]",
    "eval.ks=[10, 10, 1]",  # duplicates are harmless: RankMetrics keeps each cut-off once
])
def test_edge_values_still_load(override):
    dotted, raw = override.split("=")
    section, key = dotted.split(".")
    got = getattr(getattr(load_config(None, [override]), section), key)
    assert (list(got) if isinstance(got, tuple) else got) == yaml.safe_load(raw)


def test_yaml_file_and_saved_config_are_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match="train.lr must be positive and finite, got nan"):
        load_config(str(path))
    path.write_text("loss:\n  temperature: .inf\n")
    with pytest.raises(ConfigError, match="loss.temperature must be positive and finite, got inf"):
        load_config(str(path))
    # A run's config.yaml goes through config_from_dict (evaluate, export, resume).
    saved = yaml.safe_load(dump_config(Config()))
    saved["train"]["eval_every"] = 0
    with pytest.raises(ConfigError, match="train.eval_every must be positive"):
        config_from_dict(saved)


def _numeric_fields() -> typing.List[str]:
    """``section.key`` of every int/float field and every list/tuple of them."""
    numeric = (int, float)
    names = []
    for section in dataclasses.fields(Config):
        for key, hint in typing.get_type_hints(section.type).items():
            args = typing.get_args(hint)
            if hint in numeric or (typing.get_origin(hint) in (list, tuple) and args and all(a in numeric for a in args)):
                names.append(f"{section.name}.{key}")
    return names


def test_every_numeric_field_has_a_range():
    fields = _numeric_fields()
    assert "train.lr" in fields and "train.betas" in fields and "eval.ks" in fields
    covered = set(config_module._RANGES) | set(config_module._ANY_VALUE)
    missing = [name for name in fields if name not in covered]
    assert not missing, f"numeric config fields without a range in config._RANGES: {missing}"
    assert not set(config_module._RANGES) & set(config_module._ANY_VALUE)
    stale = sorted(covered - set(fields))
    assert not stale, f"config._RANGES / _ANY_VALUE name no numeric field: {stale}"
    assert all(reason.strip() for reason in config_module._ANY_VALUE.values())


def test_select_metric_matches_the_required_cutoff():
    from sidvid_rec.train.trainer import SELECT_METRIC

    assert SELECT_METRIC == f"ndcg@{config_module.SELECT_K}"


def test_cli_reports_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sidvid_rec", "train", "--run-dir", str(tmp_path / "r"),
                           "train.seed=-1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "train.seed must lie in [0, 2147483647], got -1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
