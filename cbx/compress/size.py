"""How many bytes of weights a model holds in memory.

Counts each distinct storage behind the module's persistent parameters and buffers once
(tied or aliased tensors share a storage; a packed low-bit tensor counts at its packed size),
which is what a compression changes. Used by ``cbx bench quant`` and the runner's size column.
"""

from __future__ import annotations

import torch


def weight_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in module.state_dict(keep_vars=True).values():
        if not torch.is_tensor(t) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total
