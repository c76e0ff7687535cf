"""Checks that torch and fbgemm-gpu load together, before torchrec is imported.

fbgemm-gpu is compiled against one torch release; a mismatch (e.g. fbgemm-gpu-cpu 1.9.0
with torch 2.13.0, or the CUDA ``fbgemm-gpu`` wheel with a CPU torch) fails with undefined
symbols deep inside torchrec. :func:`require_fbgemm` turns that into one clear message.
"""

import functools
from importlib import metadata

FIX = (
    "install a matching pair: on CPU `pip install torch==2.13.0 fbgemm-gpu-cpu==1.8.0` and "
    "`pip install --no-deps torchrec==1.8.0` (or run `make install`); on GPU a CUDA torch with the "
    "fbgemm-gpu of the same release"
)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def require_fbgemm() -> None:
    """Imports fbgemm_gpu and looks up one of its operators; raises ImportError with the fix."""
    try:
        import torch
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

        torch.ops.fbgemm.asynchronous_complete_cumsum  # noqa: B018  (raises if the ops did not load)
    except Exception as e:  # noqa: BLE001  (any load failure means the same thing to the user)
        versions = ", ".join(
            f"{d} {_version(d)}" for d in ("torch", "fbgemm-gpu", "fbgemm-gpu-cpu", "torchrec")
        )
        raise ImportError(
            f"sidvid_rec: fbgemm-gpu operators failed to load ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"installed: {versions}; fix: {FIX}"
        ) from None
