"""``sidvid-rec embed --out FILE_OR_DIR``: embed every item's text of the configured data set.

Writes ``[N+1, D]`` float32 embeddings (row 0 = padding item, zeros) and a JSON manifest
(encoder identity and version, dim, pooling, data fingerprint, hashes). Texts already in the
embedding cache are not encoded again.
"""

import argparse
import json

from sidvid_rec.cli.common import add_config_args, config_from_args
from sidvid_rec.data import load_sequences
from sidvid_rec.text import embed_dataset, save_embeddings
from sidvid_rec.text.store import check_output


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed", help="embed every item's text (cached) into an embeddings file",
        description="Embeds the item texts of the configured data set with sids.encoder "
                    "(minilm, tfidf or a local Hugging Face model directory).")
    parser.add_argument("--out", required=True,
                        help="output: a *.safetensors / *.npz file, or a directory")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_config_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    check_output(args.out)  # fail before the expensive part
    data = load_sequences(cfg.data)
    vectors, manifest = embed_dataset(cfg, data, progress=not args.no_progress)
    tensor_path, manifest_path = save_embeddings(args.out, vectors, manifest)
    print(json.dumps({"embeddings": tensor_path, "manifest": manifest_path, "items": data.num_items,
                      "dim": int(vectors.shape[1]), "encoder": manifest["encoder"]["encoder"]}))
    return 0
