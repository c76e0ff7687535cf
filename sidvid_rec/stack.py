"""Checks that torch and fbgemm-gpu load together, before torchrec is imported.

fbgemm-gpu is compiled against one torch release; a mismatch (e.g. fbgemm-gpu-cpu 1.9.0
with torch 2.13.0, or the CUDA ``fbgemm-gpu`` wheel with a CPU torch) fails with undefined
symbols deep inside torchrec. :func:`require_fbgemm` turns that into one clear message.
"""

import functools
from importlib import metadata
from typing import Dict, Optional

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


CPU_ONLY_FBGEMM = "fbgemm-gpu-cpu"
"""The CPU-only fbgemm wheel: it loads under a CUDA torch, but its operators have no CUDA kernels."""
CUDA_FIX = (
    "on a GPU machine install the CUDA build of fbgemm: `pip uninstall -y fbgemm-gpu-cpu && "
    "pip install fbgemm-gpu==1.8.0` (or run `make install-gpu`); or keep the CPU stack and hide the GPUs "
    "(`CUDA_VISIBLE_DEVICES= ... train.device=cpu`)"
)


def _versions() -> str:
    return ", ".join(f"{d} {_version(d)}" for d in ("torch", "fbgemm-gpu", "fbgemm-gpu-cpu", "torchrec"))


def cuda_support_problem(cuda_available: bool, probe_error: Optional[BaseException],
                         installed: Dict[str, str]) -> Optional[str]:
    """Why the installed fbgemm cannot run on the visible GPU, or ``None`` when it can.

    Args:
        cuda_available: torch sees a CUDA device (a CPU-only fbgemm is fine without one).
        probe_error: what running an fbgemm operator on a CUDA tensor raised (``None``: it ran).
        installed: distribution name -> version (or ``"not installed"``).
    """
    if not cuda_available:
        return None
    if probe_error is None:
        return None
    build = ("the CPU-only fbgemm-gpu-cpu wheel is installed" if installed.get(CPU_ONLY_FBGEMM, "not installed")
             != "not installed" else "fbgemm's operators have no CUDA kernels")
    first = str(probe_error).splitlines()[0][:160] if str(probe_error) else type(probe_error).__name__
    return (f"sidvid_rec: torch sees a CUDA device but {build} (an fbgemm operator on a CUDA tensor failed: "
            f"{first}); installed: {_versions()}; fix: {CUDA_FIX}")


def _probe_cuda() -> Optional[BaseException]:
    """Runs one fbgemm operator on a CUDA tensor; returns what it raised (``None``: it ran)."""
    import torch

    try:
        torch.ops.fbgemm.asynchronous_complete_cumsum(torch.ones(2, dtype=torch.int64, device="cuda"))
    except Exception as e:  # noqa: BLE001  (NotImplementedError: no CUDA kernel registered, or a load error)
        return e
    return None


@functools.lru_cache(maxsize=1)
def require_fbgemm() -> None:
    """Imports fbgemm_gpu and looks up one of its operators; raises ImportError with the fix.

    With a visible CUDA device it also runs that operator on a CUDA tensor, so the CPU-only
    ``fbgemm-gpu-cpu`` build under a CUDA torch is refused here, in one message, rather than
    with "Could not run 'fbgemm::...' with arguments from the 'CUDA' backend" inside torchrec.
    """
    try:
        import torch
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

        torch.ops.fbgemm.asynchronous_complete_cumsum  # noqa: B018  (raises if the ops did not load)
    except Exception as e:  # noqa: BLE001  (any load failure means the same thing to the user)
        raise ImportError(
            f"sidvid_rec: fbgemm-gpu operators failed to load ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"installed: {_versions()}; fix: {FIX}"
        ) from None
    cuda = torch.cuda.is_available()
    problem = cuda_support_problem(cuda, _probe_cuda() if cuda else None,
                                   {d: _version(d) for d in ("fbgemm-gpu", CPU_ONLY_FBGEMM)})
    if problem:
        raise ImportError(problem)
