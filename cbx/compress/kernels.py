"""Which kernel each quantized module really ran, and loud fallbacks.

Why: a row labelled "int4" that silently timed a dequantize-then-matmul fallback is a wrong
number on the leaderboard. So every quantized module (ours in :mod:`cbx.compress.modules`, and
any library wrapper a transform installs) says which path its last forward took, a kernel that
fails or is missing logs ONE warning naming the module and the reason, and the runner copies
:func:`kernel_summary` into ``run.json``.

The protocol is two attributes on a module, set through the two functions below:

* ``cbx_kernel``: the path its last forward took (``None``: never ran). Names in use:
  ``int8pack-cpu`` (``aten._weight_int8pack_mm``), ``int-mm`` (``torch._int_mm``, int8 x int8),
  ``int8-dequant`` (dequantize the int8 weight, then a float matmul: CUDA without ``_int_mm``
  shapes), ``int4pack-cpu`` (``aten._weight_int4pack_mm_for_cpu``), ``int4-dense-bf16`` (the CPU int4
  weight unpacked to bf16 for one dense GEMM: a prefill's many rows, when the caller allows
  compiling), ``tinygemm``
  (``aten._weight_int4pack_mm``, CUDA), ``fp8-scaled-mm`` (``torch._scaled_mm``),
  ``fp8-emulated``, ``gather-int8``/``gather-int4`` (embeddings), ``dequant-fallback`` (the
  pure-torch reference after a kernel failed). Library transforms add their own names
  (``torchao:...``, ``bnb:...``).
* ``cbx_kernel_fallback``: ``{"wanted", "used", "reason"}`` once a fallback happened.

``cbx_name`` (the module's qualified name) is set by :func:`name_modules`, which
``apply_transforms`` and ``load_compressed`` call, so a warning can name the module without the
module knowing its parent. Setting an attribute only when it changes keeps this cheap and
stable under ``torch.compile`` (the guard sees one value after the first call).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

log = logging.getLogger("cbx.kernels")

NOT_RUN = "not-run"


def used(module: Any, path: str) -> None:
    """Record that ``module``'s forward just took ``path`` (call it from the forward)."""
    if getattr(module, "cbx_kernel", None) != path:
        module.cbx_kernel = path


def fell_back(module: Any, wanted: str, path: str, reason: str) -> None:
    """Record a fallback from ``wanted`` to ``path`` and warn once per module and reason."""
    used(module, path)
    prev = getattr(module, "cbx_kernel_fallback", None)
    if prev is None or prev.get("reason") != reason or prev.get("used") != path:
        module.cbx_kernel_fallback = {"wanted": wanted, "used": path, "reason": reason}
        name = getattr(module, "cbx_name", None) or type(module).__name__
        log.warning("%s: kernel %s unavailable (%s); running %s instead", name, wanted, reason, path)


def is_recording(module: Any) -> bool:
    return hasattr(type(module), "cbx_kernel") or hasattr(module, "cbx_kernel")


def name_modules(model: Any) -> None:
    """Give every kernel-recording module of ``model`` its qualified name (``cbx_name``)."""
    if not hasattr(model, "named_modules"):
        return
    for name, mod in model.named_modules():
        if name and is_recording(mod):
            mod.cbx_name = name


def reset(model: Any) -> None:
    """Forget the recorded paths (a new run on the same model object)."""
    for _, mod in getattr(model, "named_modules", lambda: [])():
        if is_recording(mod):
            mod.cbx_kernel = None
            mod.cbx_kernel_fallback = None


def kernel_summary(model: Any, copies: Any = ()) -> dict[str, Any]:
    """``{"paths": {path: n_modules}, "fallbacks": [{"module", "wanted", "used", "reason"}]}``
    over every kernel-recording module (``not-run`` counts those whose forward never ran, e.g.
    T3's text head during synthesis). Empty dicts/lists for a model without quantized modules.

    ``copies``: modules that ran in the model's place (the engine's bf16 cast copies of T3 and
    the estimator); their modules carry the original's ``cbx_name`` and a path they recorded
    replaces the original's."""
    found: dict[str, Any] = {}
    for root in (model, *copies):
        for name, mod in getattr(root, "named_modules", lambda: [])():
            if not name or not is_recording(mod):
                continue
            key = getattr(mod, "cbx_name", None) or name
            if root is model or key not in found or getattr(mod, "cbx_kernel", None) is not None:
                found[key] = mod
    paths: Counter[str] = Counter()
    fallbacks = []
    for name, mod in found.items():
        paths[getattr(mod, "cbx_kernel", None) or NOT_RUN] += 1
        fb = getattr(mod, "cbx_kernel_fallback", None)
        if fb:
            fallbacks.append({"module": name, **fb})
    return {"paths": dict(sorted(paths.items())), "fallbacks": fallbacks}
