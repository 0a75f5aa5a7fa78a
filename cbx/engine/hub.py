"""The Hub checkpoints the workbench knows, and how to fetch exactly the files upstream uses.

Why a fixed list: a typo in an experiment file must fail at once with the valid choices, not
after a network round trip (or, worse, by downloading some other repository). Each entry
mirrors the files upstream's ``from_pretrained`` downloads (tts.py, tts_turbo.py, mtl_tts.py of
chatterbox-tts 0.1.7). The multilingual model lives in the same Hub repository as the original
one, so it gets its own id here (``ResembleAI/chatterbox:multilingual``) and loading passes its
variant explicitly: one snapshot folder may hold both models' files.

Nothing here touches the network until :func:`download` is called with a known id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cbx.errors import CbxError


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    variant: str  # a variant or a checkpoint name (cbx.engine.model.CHECKPOINTS)
    allow_patterns: tuple[str, ...]


HUB_MODELS: dict[str, HubModel] = {
    "ResembleAI/chatterbox": HubModel(
        "ResembleAI/chatterbox", "original",
        ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt")),
    "ResembleAI/chatterbox-turbo": HubModel(
        "ResembleAI/chatterbox-turbo", "turbo",
        ("*.safetensors", "*.json", "*.txt", "*.pt", "*.model")),
    # Nano: Turbo's code and file set with t3_nano_v1.safetensors (upstream main, tts_turbo.py nano=True).
    "ResembleAI/chatterbox-nano": HubModel(
        "ResembleAI/chatterbox-nano", "nano",
        ("*.safetensors", "*.json", "*.txt", "*.pt", "*.model")),
    # Multilingual V3: the multilingual files with t3_mtl23ls_v3.safetensors (upstream main, mtl_tts.py).
    "ResembleAI/chatterbox:multilingual-v3": HubModel(
        "ResembleAI/chatterbox", "multilingual-v3",
        ("ve.pt", "t3_mtl23ls_v3.safetensors", "s3gen.pt", "grapheme_mtl_merged_expanded_v1.json",
         "conds.pt", "Cangjie5_TC.json")),
    "ResembleAI/chatterbox:multilingual": HubModel(
        "ResembleAI/chatterbox", "multilingual",
        ("ve.pt", "t3_mtl23ls_v2.safetensors", "s3gen.pt", "grapheme_mtl_merged_expanded_v1.json",
         "conds.pt", "Cangjie5_TC.json")),
}


def looks_like_hub_id(source: str) -> bool:
    """``owner/name`` (optionally ``:suffix``) that is not an existing local path."""
    parts = source.split(":")[0].split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~")) and not Path(source).exists()


def resolve(source: str) -> HubModel:
    """The known Hub model named ``source``, or :class:`CbxError` listing the valid ids."""
    model = HUB_MODELS.get(source)
    if model is None:
        raise CbxError(f"unknown Hub model id '{source}' (known ids: {', '.join(HUB_MODELS)}; "
                       "or give a local folder in the upstream file layout, or tiny / tiny-turbo / "
                       "tiny-multilingual)")
    return model


def download(source: str) -> tuple[Path, str]:
    """Fetch the files of the known Hub model ``source``; returns (snapshot folder, variant)."""
    model = resolve(source)
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id=model.repo_id, allow_patterns=list(model.allow_patterns),
                                   token=os.getenv("HF_TOKEN") or None)
    except Exception as exc:  # network, auth, offline mode: all are "cannot get the files"
        raise CbxError(f"cannot download '{source}' from the Hugging Face Hub: {type(exc).__name__}: {exc}") from None
    return Path(folder), model.variant
