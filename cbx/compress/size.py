"""How many bytes of weights a model holds in memory.

Counts each distinct storage behind the module's persistent parameters and buffers once
(tied or aliased tensors share a storage; a packed low-bit tensor counts at its packed size),
which is what a compression changes. A field library's layer (``LibraryLinear``) holds tensor
subclasses whose storage cannot be read directly: it counts the plain tensors of the library's
own serialization (what the checkpoint stores) plus its bias. Used by ``cbx bench quant`` and
the runner's size column.
"""

from __future__ import annotations

import torch


def _tensors(module: torch.nn.Module):
    from cbx.compress.modules import LibraryLinear

    libs = {n: m for n, m in module.named_modules() if isinstance(m, LibraryLinear)}
    for key, t in module.state_dict(keep_vars=True).items():
        parts = key.split(".")
        if not any(".".join(parts[:i]) in libs for i in range(len(parts))):
            yield t
    for m in libs.values():
        yield from m.library_state().values()
        if m.bias is not None:
            yield m.bias


def weight_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    # held in a list: a library's serialization may build fresh tensors, and a freed one's
    # address reused by the next would be taken for a shared storage
    for t in list(_tensors(module)):
        if not torch.is_tensor(t) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total
