"""RQ-VAE semantic IDs: an encoder, L residual codebooks of K codes and a decoder trained together.

The alternative to residual k-means (``sids.method=rqvae``), after TIGER (Rajput et al., 2023):

* encoder MLP ``D -> rqvae_hidden -> rqvae_latent`` maps an item embedding ``x`` to ``z``;
* residual quantization of ``z``: ``r_1 = z``, ``c_l = argmin_k ||r_l - E_l[k]||``,
  ``r_{l+1} = r_l - sg[E_l[c_l]]``; ``z_q = sum_l E_l[c_l]``;
* decoder MLP ``rqvae_latent -> rqvae_hidden -> D`` reconstructs ``x`` from ``z_q`` through the
  straight-through estimator ``z + sg[z_q - z]``;
* loss per item: ``||x - xhat||^2 + sum_l (||sg[r_l] - e_l||^2 + beta ||r_l - sg[e_l]||^2)``
  (reconstruction, codebook and commitment losses, squared errors summed over dims, mean over
  the batch), minimised with Adam;
* each codebook starts as the k-means centroids (:func:`~sidvid_rec.semantic_ids.kmeans.plain_kmeans`)
  of its layer's residuals of the first batch (at least K items);
* dead-code restarts (``rqvae_restarts``): a code no training item picked during an epoch is
  re-seeded from a random residual of that layer in the epoch's last full batch (its Adam state reset);
* early stopping: ``rqvae_val_fraction`` of the items (seeded) are held out; training stops when
  their reconstruction loss has not improved for ``rqvae_patience`` epochs, and the best epoch's
  weights code every item.

Everything is seeded by ``seed`` (model initialisation, split, batch order, restarts, the k-means
of layer l with ``seed + l``), so a build is deterministic on one machine and thread count.

The codebooks live in the latent space (``[L, K, rqvae_latent]``): the report's reconstruction
errors decode the summed codes first (:meth:`RqVaeModel.decode_numpy`), and the encoder/decoder
weights are stored beside the artifacts (:data:`WEIGHTS_FILE`) so that ``sids report
--embeddings`` can recompute them.

Example::

    result = train_rqvae(x, RqVaeParams(layers=3, codebook_size=128), progress=False)
    result.codes        # [N, L] int64
    result.codebooks    # [L, K, latent] float32
"""

import copy
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sidvid_rec.config import RqVaeParams
from sidvid_rec.errors import ArtifactError, UserError
from sidvid_rec.semantic_ids.artifacts import SidArtifacts, read_checked
from sidvid_rec.semantic_ids.kmeans import plain_kmeans
from sidvid_rec.semantic_ids.residual import check_embeddings

WEIGHTS_FILE = "rqvae.safetensors"
"""Encoder/decoder weights of an ``rqvae`` build (hashed in the manifest like the other files)."""

_CHUNK = 1 << 14  # items per block when coding or decoding everything (bounds temporaries)


class RqVaeModel(nn.Module):
    """Encoder, residual codebooks ``[L, K, latent]`` and decoder (see the module docstring)."""

    def __init__(self, dim: int, hidden: int, latent: int, layers: int, codebook_size: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.codebooks = nn.Parameter(torch.zeros(layers, codebook_size, latent))

    def quantize(self, z: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        """Residual codes ``[B, L]`` of ``z [B, latent]``, the chosen code vectors and the residuals per layer."""
        r = z
        codes, chosen, residuals = [], [], []
        for book in self.codebooks:
            dist = r.pow(2).sum(1, keepdim=True) - 2.0 * r @ book.t() + book.pow(2).sum(1)
            c = dist.argmin(1)
            e = book[c]
            codes.append(c)
            chosen.append(e)
            residuals.append(r)
            r = r - e.detach()
        return torch.stack(codes, 1), chosen, residuals

    def losses(self, x: torch.Tensor, beta: float) -> Dict[str, Any]:
        """Reconstruction and codebook/commitment losses of a batch ``x [B, D]``, plus its codes."""
        z = self.encoder(x)
        codes, chosen, residuals = self.quantize(z)
        z_q = torch.stack(chosen).sum(0)
        xhat = self.decoder(z + (z_q - z).detach())  # straight-through estimator
        recon = (xhat - x).pow(2).sum(1).mean()
        vq = sum(((r.detach() - e).pow(2).sum(1) + beta * (r - e.detach()).pow(2).sum(1)).mean()
                 for e, r in zip(chosen, residuals))
        return {"recon": recon, "vq": vq, "codes": codes, "residuals": residuals}

    @torch.no_grad()
    def encode_codes(self, x: np.ndarray) -> np.ndarray:
        """Codes ``[N, L]`` int64 of ``x [N, D]``, block by block."""
        out = [self.quantize(self.encoder(torch.from_numpy(x[s:s + _CHUNK])))[0] for s in range(0, x.shape[0], _CHUNK)]
        return torch.cat(out).numpy().astype(np.int64)

    @torch.no_grad()
    def decode_numpy(self, latent: np.ndarray) -> np.ndarray:
        """Decoder output ``[B, D]`` float32 of latent vectors ``[B, latent]`` (the report's ``decode``)."""
        return self.decoder(torch.from_numpy(np.ascontiguousarray(latent, dtype=np.float32))).numpy()


@dataclass
class RqVaeResult:
    """A trained RQ-VAE and the codes of every item.

    Attributes:
        model: the weights of the best epoch (by held-out reconstruction loss).
        codebooks: ``[L, K, latent]`` float32.
        codes: ``[N, L]`` int64.
        stats: epochs run, best epoch, losses, restarts per epoch (JSON-able; goes into the manifest).
    """

    model: RqVaeModel
    codebooks: np.ndarray
    codes: np.ndarray
    stats: Dict[str, Any] = field(default_factory=dict)

    def weights(self) -> Dict[str, np.ndarray]:
        """Encoder/decoder tensors for :data:`WEIGHTS_FILE`."""
        return {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items() if k != "codebooks"}


def check_rqvae_inputs(x: np.ndarray, params: RqVaeParams) -> Tuple[int, int]:
    """Raises :class:`UserError` on bad embeddings or sizes; returns ``(train items, held-out items)``."""
    check_embeddings(x, params.codebook_size)
    for name in ("layers", "codebook_size", "rqvae_hidden", "rqvae_latent", "rqvae_epochs", "rqvae_patience",
                 "rqvae_batch_size", "kmeans_iters", "max_points_per_code"):
        if getattr(params, name) < 1:
            raise UserError(f"sids.{name} must be positive, got {getattr(params, name)}")
    if not (params.rqvae_lr > 0 and np.isfinite(params.rqvae_lr)) or not (0 <= params.rqvae_beta < np.inf):
        raise UserError(f"sids.rqvae_lr must be positive and sids.rqvae_beta >= 0 (both finite), got "
                        f"{params.rqvae_lr} and {params.rqvae_beta}")
    if not 0 < params.rqvae_val_fraction < 1:
        raise UserError(f"sids.rqvae_val_fraction must lie in (0, 1), got {params.rqvae_val_fraction}")
    n = x.shape[0]
    n_val = min(n - 1, max(1, int(round(n * params.rqvae_val_fraction))))
    if n - n_val < params.codebook_size:
        raise UserError(f"codebook_size K={params.codebook_size} is larger than the number of RQ-VAE training "
                        f"items ({n - n_val} of {n} after holding out sids.rqvae_val_fraction="
                        f"{params.rqvae_val_fraction}); use sids.codebook_size <= {n - n_val}")
    return n - n_val, n_val


@torch.no_grad()
def _init_codebooks(model: RqVaeModel, batch: torch.Tensor, params: RqVaeParams) -> None:
    """Layer l's codebook = k-means centroids (seed + l) of the first batch's layer-l residuals."""
    r = model.encoder(batch).numpy().astype(np.float32)
    for layer in range(params.layers):
        km = plain_kmeans(np.ascontiguousarray(r), params.codebook_size, params.kmeans_iters, params.seed + layer,
                          params.max_points_per_code, warn_few_points=False)
        model.codebooks[layer] = torch.from_numpy(km.centroids)
        r = r - km.centroids[km.assign]


@torch.no_grad()
def _restart_dead_codes(model: RqVaeModel, opt: torch.optim.Adam, usage: torch.Tensor,
                        residuals: List[torch.Tensor], gen: torch.Generator) -> int:
    """Re-seeds every code of ``usage [L, K] == 0`` from random residuals of its layer; returns how many."""
    total = 0
    state = opt.state.get(model.codebooks, {})
    for layer, r in enumerate(residuals):
        dead = torch.nonzero(usage[layer] == 0).flatten()
        if dead.numel() == 0:
            continue
        m, b = dead.numel(), r.shape[0]
        pick = torch.randperm(b, generator=gen)[:m] if m <= b else torch.randint(0, b, (m,), generator=gen)
        model.codebooks[layer, dead] = r[pick]
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][layer, dead] = 0.0
        total += m
    return total


@torch.no_grad()
def _held_out_loss(model: RqVaeModel, x: torch.Tensor, beta: float) -> float:
    """Mean per-item squared reconstruction error of ``x`` through the quantized latent."""
    total = 0.0
    for s in range(0, x.shape[0], _CHUNK):
        total += float(model.losses(x[s:s + _CHUNK], beta)["recon"]) * x[s:s + _CHUNK].shape[0]
    return total / x.shape[0]


def train_rqvae(x: np.ndarray, params: RqVaeParams, progress: bool = True) -> RqVaeResult:
    """Trains an RQ-VAE on ``x [N, D]`` and codes every item (see the module docstring)."""
    n_train, _ = check_rqvae_inputs(x, params)
    xt = torch.from_numpy(np.array(x, dtype=np.float32, order="C", copy=True))
    n, dim = xt.shape
    gen = torch.Generator().manual_seed(params.seed)
    split = torch.randperm(n, generator=gen)
    train_idx, val_idx = split[:n_train], split[n_train:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        model = RqVaeModel(dim, params.rqvae_hidden, params.rqvae_latent, params.layers, params.codebook_size)
    bs = min(params.rqvae_batch_size, n_train)
    order = torch.randperm(n_train, generator=gen)
    _init_codebooks(model, xt[train_idx[order[:max(bs, params.codebook_size)]]], params)
    opt = torch.optim.Adam(model.parameters(), lr=params.rqvae_lr)
    x_val = xt[val_idx]
    best, best_epoch, best_state, since_best = float("inf"), 0, copy.deepcopy(model.state_dict()), 0
    history: Dict[str, List[float]] = {"train_loss": [], "val_recon": [], "restarts": []}
    bar = tqdm(range(1, params.rqvae_epochs + 1), desc="rq-vae", unit="epoch", disable=not progress,
               file=sys.stderr)
    for epoch in bar:
        if epoch > 1:
            order = torch.randperm(n_train, generator=gen)
        usage = torch.zeros(params.layers, params.codebook_size, dtype=torch.int64)
        model.train()
        total, last_full = 0.0, None
        for start in range(0, n_train, bs):
            batch = xt[train_idx[order[start:start + bs]]]
            out = model.losses(batch, params.rqvae_beta)
            loss = out["recon"] + out["vq"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * batch.shape[0]
            for layer in range(params.layers):
                usage[layer] += torch.bincount(out["codes"][:, layer], minlength=params.codebook_size)
            if batch.shape[0] == bs:
                last_full = [r.detach() for r in out["residuals"]]
        restarts = _restart_dead_codes(model, opt, usage, last_full, gen) if params.rqvae_restarts else 0
        model.eval()
        val = _held_out_loss(model, x_val, params.rqvae_beta)
        history["train_loss"].append(total / n_train)
        history["val_recon"].append(val)
        history["restarts"].append(restarts)
        bar.set_postfix(val_recon=f"{val:.5f}", dead=restarts)
        if val < best:
            best, best_epoch, since_best = val, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
            if since_best >= params.rqvae_patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    codes = model.encode_codes(xt.numpy())
    stats = {"epochs_run": len(history["val_recon"]), "best_epoch": best_epoch, "best_val_recon": best,
             "train_items": n_train, "held_out_items": int(n - n_train),
             "restarts_total": int(sum(history["restarts"])), "history": history}
    return RqVaeResult(model=model, codebooks=model.codebooks.detach().numpy().copy(), codes=codes, stats=stats)


def model_from_weights(weights: Dict[str, np.ndarray], codebooks: np.ndarray) -> RqVaeModel:
    """Rebuilds the model of a stored build (``weights`` of :data:`WEIGHTS_FILE`, codebooks ``[L, K, latent]``)."""
    try:
        hidden, dim = weights["encoder.0.weight"].shape
        latent = weights["encoder.2.weight"].shape[0]
        model = RqVaeModel(dim, hidden, latent, codebooks.shape[0], codebooks.shape[1])
        state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
        state["codebooks"] = torch.from_numpy(np.array(codebooks, dtype=np.float32))
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{WEIGHTS_FILE}: not the weights of an RQ-VAE of these codebooks "
                            f"({str(e).splitlines()[0][:200]})")
    model.eval()
    return model


def load_rqvae_model(directory: str, art: SidArtifacts) -> RqVaeModel:
    """The RQ-VAE of an ``rqvae`` build ``directory`` (its loaded artifacts ``art``), sha256-checked."""
    if art.method != "rqvae":
        raise ArtifactError(f"{directory} is a {art.method} build, not an RQ-VAE")
    return model_from_weights(read_checked(directory, WEIGHTS_FILE, art.manifest), art.codebooks)
