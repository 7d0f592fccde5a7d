"""``impl="auto"`` on CUDA: the Triton kernels, guarded, with a once-per-device fallback.

If a Triton kernel cannot compile or launch on the user's device — an architecture this
Triton cannot target, a Triton too old for the kernels, too little shared memory for
every config — a training run must not crash mid-step.  :func:`forward` and
:func:`backward` here call the Triton path (:mod:`attnfuse.kernels.triton_flash`) and,
on such a failure, warn once (naming the cause) and run the PyTorch path
(:mod:`attnfuse.kernels.torch_impl`) instead; from then on that device uses the PyTorch
path for the rest of the process, forward and backward alike.

On CUDA tensors the PyTorch path is the blocked online-softmax loop (every other CPU
path needs CPU tensors: see ``torch_impl.forward_plan``): exact for every argument the
op takes, with the lse the backward needs.  (PyTorch's own fused CUDA attention does not
return the lse through a public API and could not be tested here without a GPU.)

What counts as "cannot compile or launch" (:func:`kernel_unavailable`): an exception of
Triton's own (``triton.*`` classes: compilation errors, ptxas errors, out of resources,
autotuner errors), an ImportError / AttributeError while importing the kernel modules
(a Triton too old for them), and a RuntimeError that names the toolchain (ptxas, PTX,
"no kernel image").  Everything else propagates: argument errors, CUDA out of memory.

One case cannot fall back exactly: a forward that ran the Triton kernels WITH dropout
whose backward then fails.  The PyTorch path draws a different keep-mask (see
``torch_dropout``), so its gradient would belong to another forward; that backward
raises instead of returning wrong gradients.
"""
from __future__ import annotations

import re
import warnings
from typing import Optional

import torch

__all__ = ["forward", "backward", "kernel_unavailable", "fallen_back", "reset"]

# str(device) -> the cause that made that device fall back
_FALLEN_BACK: dict[str, str] = {}
_TOOLCHAIN = re.compile(r"ptxas|\bPTX\b|no kernel image|out of resource|shared memory|"
                        r"unsupported (?:gpu|arch)|sm_\d+", re.I)


def kernel_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the Triton kernels cannot compile or launch here (as opposed
    to a bad argument or a CUDA out-of-memory)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(exc, oom):
        return False
    if any(c.__module__.split(".")[0] == "triton" for c in type(exc).__mro__):
        return True
    if isinstance(exc, (ImportError, AttributeError)):
        return True
    return isinstance(exc, RuntimeError) and bool(_TOOLCHAIN.search(str(exc)))


def fallen_back(device: torch.device) -> Optional[str]:
    """The cause, if ``device`` already fell back to the PyTorch path in this process."""
    return _FALLEN_BACK.get(str(device))


def reset() -> None:
    """Forget every fallback (tests)."""
    _FALLEN_BACK.clear()


def _fall_back(device: torch.device, exc: BaseException) -> None:
    cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    _FALLEN_BACK[str(device)] = cause
    warnings.warn(
        f"attnfuse: the Triton attention kernels cannot run on {device} ({cause}); "
        f"impl='auto' uses the PyTorch path on {device} from now on in this process "
        f"(exact, slower). Pass impl='triton' to see the error instead.",
        RuntimeWarning, stacklevel=3)


def _triton():
    from attnfuse.kernels import triton_flash

    return triton_flash


def _torch():
    from attnfuse.kernels import torch_impl

    return torch_impl


def forward(q, k, v, bias, **kw):
    """``triton_flash.forward``, or ``torch_impl.forward`` once the device fell back."""
    if fallen_back(q.device) is None:
        try:
            return _triton().forward(q, k, v, bias, **kw)
        except Exception as exc:
            if not kernel_unavailable(exc):
                raise
            _fall_back(q.device, exc)
    return _torch().forward(q, k, v, bias, **kw)


def backward(dout, q, k, v, bias, out, lse, **kw):
    """``triton_flash.backward``, or ``torch_impl.backward`` once the device fell back
    (before the forward ran, or now: then only without dropout, see the module doc)."""
    if fallen_back(q.device) is None:
        try:
            return _triton().backward(dout, q, k, v, bias, out, lse, **kw)
        except Exception as exc:
            if not kernel_unavailable(exc):
                raise
            _fall_back(q.device, exc)
            if kw.get("dropout_p", 0.0) > 0.0:
                raise RuntimeError(
                    "attnfuse: the Triton backward kernels cannot run on "
                    f"{q.device} ({fallen_back(q.device)}) after the Triton forward ran with "
                    "dropout; the PyTorch path draws another dropout mask, so its gradients "
                    "would be wrong. Later steps use the PyTorch path for both.") from exc
    return _torch().backward(dout, q, k, v, bias, out, lse, **kw)
