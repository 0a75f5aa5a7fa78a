"""One Chatterbox model as a plain ``nn.Module``, and strict loading/saving of the upstream layout.

Why it is built this way:

* :class:`ChatterboxModel` only holds upstream modules (``t3``, ``s3gen``, ``ve``) plus a few
  attributes. Module names are rooted here (``t3.tfmr.layers.0.mlp.gate_proj``), so compression
  name patterns and state-dict keys agree, and a transform may swap or reshape any submodule.
* Loading is strict. Upstream loads S3Gen with ``strict=False`` (a silently half-loaded model
  is possible); we check every key and shape ourselves and only tolerate the keys upstream
  documents as harmless (the S3 tokenizer's ``_mel_filters``/``window`` buffers, which are
  computed, not learned). Every failure is a :class:`CbxError` naming the file and the problem.
* The variant comes from the files present (which T3 weights file) or from our metadata JSON
  (:data:`META_FILE`, written for built-in tiny models, which also records their architecture),
  never from the folder name.
* :func:`save_upstream_layout` writes the same file names upstream's ``from_local`` reads, into a
  temporary folder renamed into place at the end, so a failed save leaves nothing half-written.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cbx.errors import CbxError
from cbx.files import atomic_dir

META_FILE = "cbx_model.json"
META_FORMAT = "cbx-chatterbox-model"
META_VERSION = 1

TINY_SOURCES = {"tiny": "original", "tiny-turbo": "turbo", "tiny-multilingual": "multilingual", "tiny-nano": "nano"}
# Upstream's full-size architectures with seeded random weights (``tiny.build_random``): real sizes,
# real key sets and real costs without a download; the audio is meaningless.
RANDOM_SOURCES = {"random:original": "original", "random:turbo": "turbo", "random:multilingual": "multilingual",
                  "random:nano": "nano"}
# Short names the benchmarks accept for ``--model``.
BENCH_ALIASES = {"full": "random:original"}

T3_FILES = {"original": "t3_cfg.safetensors", "turbo": "t3_turbo_v1.safetensors",
            "multilingual": "t3_mtl23ls_v2.safetensors"}
S3GEN_FILES = {"original": "s3gen.safetensors", "turbo": "s3gen_meanflow.safetensors", "multilingual": "s3gen.pt"}
VE_FILES = {"original": "ve.safetensors", "turbo": "ve.safetensors", "multilingual": "ve.pt"}
CONDS_FILE = "conds.pt"


@dataclass(frozen=True)
class Checkpoint:
    """One upstream T3 checkpoint: which variant's code runs it, its weights file, the backbone
    it needs when that is not the variant's default, and sampling defaults that differ from the
    variant's (upstream main after 0.1.7)."""

    variant: str
    t3_file: str
    backbone: str | None = None
    sampling: tuple[tuple[str, float], ...] = ()
    # Multilingual V3 (upstream main, mtl_tts.py): the audio of the last speech token, emitted
    # just before EOS, is cut (upstream: ~40 ms of noise). Not done for v2, as in 0.1.7.
    trim_last_token: bool = False


# Nano: Turbo's code with a GPT-2-small backbone (tts_turbo.py, nano=True); Multilingual V3: the
# multilingual code with another T3 file, no alignment analyzer (the engine has none) and
# repetition penalty 1.2 (mtl_tts.py). v2 stays the multilingual default, as upstream's.
CHECKPOINTS = {
    "original": Checkpoint("original", "t3_cfg.safetensors"),
    "turbo": Checkpoint("turbo", "t3_turbo_v1.safetensors"),
    "nano": Checkpoint("turbo", "t3_nano_v1.safetensors", backbone="GPT2_small"),
    "multilingual": Checkpoint("multilingual", "t3_mtl23ls_v2.safetensors"),
    "multilingual-v3": Checkpoint("multilingual", "t3_mtl23ls_v3.safetensors", sampling=(("repetition_penalty", 1.2),),
                                  trim_last_token=True),
}


def checkpoint_of(model_or_meta: Any, variant: str | None = None) -> str:
    """The checkpoint name of a model (``meta["checkpoint"]``, else its variant)."""
    meta = model_or_meta if isinstance(model_or_meta, dict) else (getattr(model_or_meta, "meta", None) or {})
    return meta.get("checkpoint") or variant or getattr(model_or_meta, "variant", None)


def _ensure_backbone(name: str) -> None:
    """Register a backbone upstream 0.1.7's ``LLAMA_CONFIGS`` lacks. ``GPT2_small`` (Nano, added
    upstream after 0.1.7): GPT-2 medium's settings at GPT-2 small's size (12 layers, 12 heads,
    768 wide), as upstream's main branch defines it."""
    from cbx.engine import upstream

    if name in upstream.LLAMA_CONFIGS:
        return
    if name != "GPT2_small":
        raise CbxError(f"unknown T3 backbone '{name}'")
    cfg = copy.deepcopy(upstream.LLAMA_CONFIGS["GPT2_medium"])
    cfg.update(n_embd=768, hidden_size=768, n_head=12, n_layer=12)
    upstream.LLAMA_CONFIGS[name] = cfg

# Keys upstream itself tolerates as missing (S3Token2Wav.ignore_state_dict_missing): buffers
# the S3 tokenizer computes in its constructor.
S3GEN_OPTIONAL_KEYS = ("tokenizer._mel_filters", "tokenizer.window")
# Turbo's GPT-2 keeps an input embedding it never uses (T3 feeds inputs_embeds); upstream loads it
# and then deletes it, and so do we. It is written back (zeros) so upstream can load our files.
TURBO_UNUSED_WTE = "tfmr.wte.weight"
# Upstream's T3.inference() attaches its HF wrapper as ``t3.patched_model`` (the same backbone
# again); it is not part of any checkpoint.
UPSTREAM_ALIASES = ("patched_model.",)


class ChatterboxModel(nn.Module):
    """Container for one Chatterbox model: ``t3``, ``s3gen``, ``ve`` plus what is needed to use them.

    ``variant`` is ``"original"``, ``"turbo"`` or ``"multilingual"``; ``tokenizer`` a
    :class:`cbx.engine.text.TextTokenizer`; ``source`` where it came from; ``builtin_conds`` the
    upstream ``Conditionals`` of ``conds.pt`` (or None); ``meta`` a JSON-able dict (for built-in
    models: ``{"tiny": <architecture>, "seed": n}``).
    """

    def __init__(self, t3: nn.Module, s3gen: nn.Module, ve: nn.Module, *, variant: str, tokenizer: Any,
                 source: str, builtin_conds: Any = None, meta: dict | None = None):
        super().__init__()
        if variant not in T3_FILES:
            raise CbxError(f"unknown model variant '{variant}' (expected one of {sorted(T3_FILES)})")
        self.t3 = t3
        self.s3gen = s3gen
        self.ve = ve
        self.variant = variant
        self.tokenizer = tokenizer
        self.source = source
        self.builtin_conds = builtin_conds
        self.meta = dict(meta or {})

    @property
    def device(self) -> torch.device:
        return next(self.t3.parameters()).device

    @property
    def is_tiny(self) -> bool:
        return "tiny" in self.meta

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, source={self.source!r}"


# ----------------------------------------------------------------------------- building blocks


def t3_config(variant: str, overrides: dict | None = None) -> Any:
    """Upstream's ``T3Config`` for ``variant`` (as tts.py / tts_turbo.py / mtl_tts.py set it)."""
    from cbx.engine import upstream

    if variant == "multilingual":
        hp = upstream.T3Config.multilingual()
    elif variant == "turbo":
        # tts_turbo.ChatterboxTurboTTS.from_local
        hp = upstream.T3Config(text_tokens_dict_size=50276)
        hp.llama_config_name = "GPT2_medium"
        hp.speech_tokens_dict_size = 6563
        hp.input_pos_emb = None
        hp.speech_cond_prompt_len = 375
        hp.use_perceiver_resampler = False
        hp.emotion_adv = False
    else:
        hp = upstream.T3Config.english_only()
    for key, value in (overrides or {}).items():
        if not hasattr(hp, key):
            raise CbxError(f"T3 config has no field '{key}'")
        setattr(hp, key, value)
    return hp


def build_t3(variant: str, arch: dict | None = None, backbone: str | None = None) -> nn.Module:
    """An upstream ``T3`` for ``variant``; ``arch`` (tiny models) adds a registered small backbone,
    config overrides and a perceiver width; ``backbone`` names another full-size backbone (Nano's
    ``GPT2_small``). Weights are random (upstream initialisation)."""
    from cbx.engine import upstream

    overrides = {}
    if backbone and not arch:
        _ensure_backbone(backbone)
        overrides = {"llama_config_name": backbone}
    if arch:
        name = arch["backbone_name"]
        # Upstream picks the backbone by name from this module-level dict; registering is
        # idempotent (same name, same dict). A deep copy: transformers' LlamaConfig writes into
        # the nested rope_scaling dict, which must not reach the caller's arch.
        upstream.LLAMA_CONFIGS[name] = copy.deepcopy(arch["backbone"])
        overrides = dict(arch.get("t3", {}), llama_config_name=name)
    t3 = upstream.T3(t3_config(variant, overrides))
    perceiver = (arch or {}).get("perceiver")
    if perceiver and t3.cond_enc.perceiver is not None:
        t3.cond_enc.perceiver = _perceiver_cls()(perceiver["query_tokens"], perceiver["width"],
                                                 perceiver["width"], perceiver["heads"])
    return t3


def _perceiver_cls() -> type:
    import importlib

    from cbx.engine import upstream

    cond_enc_mod = importlib.import_module(upstream.T3Cond.__module__)
    return cond_enc_mod.Perceiver


def build_s3gen(variant: str, arch: dict | None = None, meanflow: bool | None = None) -> nn.Module:
    """Upstream's ``S3Gen`` of ``variant`` (tiny when ``arch`` is given). ``meanflow`` (default:
    Turbo's) builds the MeanFlow estimator, as a distilled student needs it."""
    from cbx.engine import upstream

    if meanflow is None:
        meanflow = variant == "turbo"
    if arch is not None:
        from cbx.engine.tiny_s3gen import build_tiny_s3gen

        return build_tiny_s3gen(meanflow=meanflow, seed=int(arch.get("seed", 0)), arch=arch.get("arch"))
    return upstream.S3Gen(meanflow=meanflow)


# ----------------------------------------------------------------------------- strict state loading


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` or ``.pt`` weights file, or :class:`CbxError`."""
    if not path.is_file():
        raise CbxError(f"{path}: missing file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors/pickle raise various types for truncated or corrupt files
        raise CbxError(f"{path}: cannot read weights (truncated or corrupt file?): {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CbxError(f"{path}: not a dict of tensors")
    return state


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path,
                      optional: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module`` after checking keys and shapes; errors name ``path``.

    ``optional`` keys may be missing from the file: the module keeps its own values for them.
    """
    expected = module.state_dict()
    check_state(expected, state, path, optional)
    check_finite(state, path)
    full = {k: state.get(k, expected[k]) for k in expected}
    module.load_state_dict(full, strict=True)


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path,
                optional: tuple[str, ...] = ()) -> None:
    """:class:`CbxError` naming ``path`` unless ``state`` has exactly the keys of ``expected``
    (``optional`` ones may be missing) with the same shapes."""
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
        raise CbxError(f"{path}: does not match the model: " + "; ".join(parts))
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CbxError(f"{path}: tensor '{key}' has shape {list(tensor.shape)}, "
                           f"the model expects {list(expected[key].shape)}")


def check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """:class:`CbxError` naming ``path`` and the tensor when floating-point weights hold NaN or
    inf (a corrupt file or a diverged training): such a model would only make NaN audio."""
    for key, tensor in state.items():
        if not tensor.is_floating_point() or not tensor.numel():
            continue
        if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            tensor = tensor.float()  # fp8: isfinite has no kernel for it
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CbxError(f"{path}: tensor '{key}' holds {bad} non-finite value(s) (NaN/inf); "
                           "the weights are corrupt or from a diverged training")


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def read_meta(folder: Path) -> dict | None:
    path = folder / META_FILE
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CbxError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise CbxError(f"{path}: not a {META_FORMAT} metadata file")
    if meta.get("version") != META_VERSION:
        raise CbxError(f"{path}: metadata version {meta.get('version')!r} is not supported (expected {META_VERSION})")
    if meta.get("variant") not in T3_FILES:
        raise CbxError(f"{path}: unknown variant {meta.get('variant')!r} (expected one of {sorted(T3_FILES)})")
    return meta


def detect_checkpoint(folder: Path, name: str | None = None) -> str:
    """Which checkpoint (:data:`CHECKPOINTS`) a folder holds, from its T3 file (and metadata).
    ``name`` may be a checkpoint name or a variant; a variant with several checkpoints present
    (multilingual v2 and v3) takes the variant's default (v2, as upstream)."""
    meta = read_meta(folder) or {}
    if name is None and meta.get("checkpoint"):
        name = meta["checkpoint"]
    if name in CHECKPOINTS and name != CHECKPOINTS[name].variant:
        path = folder / CHECKPOINTS[name].t3_file
        if not path.is_file():
            raise CbxError(f"{path}: missing file (needed for the {name} model)")
        return name
    variant = detect_variant(folder, name)
    if (folder / T3_FILES[variant]).is_file():
        return variant
    alt = [n for n, c in CHECKPOINTS.items() if c.variant == variant and (folder / c.t3_file).is_file()]
    return alt[0]


def detect_variant(folder: Path, variant: str | None = None) -> str:
    """Which model a checkpoint folder holds, from its files (and metadata), never its name."""
    meta = read_meta(folder)
    present = list(dict.fromkeys(c.variant for c in CHECKPOINTS.values() if (folder / c.t3_file).is_file()))
    if variant in CHECKPOINTS:
        variant = CHECKPOINTS[variant].variant
    if variant is None and meta is not None:
        variant = meta["variant"]
    if variant is not None:
        if variant not in T3_FILES:
            raise CbxError(f"unknown model variant '{variant}' (expected one of {sorted(T3_FILES)})")
        if meta is not None and meta["variant"] != variant:
            raise CbxError(f"{folder / META_FILE}: says variant '{meta['variant']}', but '{variant}' was asked for")
        if variant not in present:
            raise CbxError(f"{folder / T3_FILES[variant]}: missing file (needed for the {variant} model)")
        return variant
    if not present:
        raise CbxError(f"{folder}: no T3 weights found (expected one of "
                       f"{', '.join(c.t3_file for c in CHECKPOINTS.values())})")
    if len(present) > 1:
        files = [c.t3_file for c in CHECKPOINTS.values() if (folder / c.t3_file).is_file()]
        raise CbxError(f"{folder}: holds T3 weights of several models ({', '.join(files)}); "
                       "name the variant to load")
    return present[0]


# ----------------------------------------------------------------------------- load / save


def load_model(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               variant: str | None = None) -> ChatterboxModel:
    """Load a Chatterbox model: a built-in tiny one, a full-size random one (``random:VARIANT``), a
    known Hub id, or a local upstream-layout folder.

    ``dtype`` (e.g. ``torch.bfloat16``) casts T3 only: S3Gen and the voice encoder stay in fp32,
    as their signal-processing buffers expect. ``variant`` is only needed for a folder holding
    several models' files (the Hub snapshot of ``ResembleAI/chatterbox`` can).
    """
    from cbx.engine import hub

    src = str(source)
    if src in TINY_SOURCES:
        from cbx.engine.tiny import build_tiny

        model = build_tiny(TINY_SOURCES[src], seed=0)
    elif src in RANDOM_SOURCES:
        from cbx.engine.tiny import build_random

        model = build_random(RANDOM_SOURCES[src], full_size=True, seed=0)
    elif Path(src).expanduser().is_dir():
        model = load_folder(Path(src).expanduser(), variant=variant)
    elif hub.looks_like_hub_id(src):
        folder, hub_variant = hub.download(src)
        model = load_folder(folder, variant=hub_variant, source=src)
    else:
        raise CbxError(f"model source '{src}': not a folder, not a known Hub id ({', '.join(hub.HUB_MODELS)}) "
                       f"and not a built-in model ({', '.join(builtin_sources())})")
    model.to(device)
    if dtype is not None:
        model.t3.to(dtype)
    return model.eval()


def builtin_sources() -> list[str]:
    """Every model source that needs no file and no download."""
    return [*TINY_SOURCES, *RANDOM_SOURCES]


def load_folder(folder: Path, variant: str | None = None, source: str | None = None) -> ChatterboxModel:
    """Strictly load a checkpoint folder in the upstream layout (see module docstring)."""
    from cbx.engine import upstream
    from cbx.engine.text import load_tokenizer

    from cbx.integrity import verify_export_if_present

    verify_export_if_present(folder)  # a (dequantized) export: every file's hash, before any byte is used
    ck_name = detect_checkpoint(folder, variant)
    ck = CHECKPOINTS[ck_name]
    variant = ck.variant
    meta = read_meta(folder) or {}
    arch = meta.get("tiny")
    for name in (S3GEN_FILES[variant], VE_FILES[variant]):
        if not (folder / name).is_file():
            raise CbxError(f"{folder / name}: missing file (needed for the {variant} model)")

    t3 = build_t3(variant, arch, backbone=ck.backbone)
    t3_path = folder / ck.t3_file
    t3_state = read_state(t3_path)
    load_state_strict(t3, t3_state, t3_path)
    if variant == "turbo":
        del t3.tfmr.wte

    s3gen = build_s3gen(variant, arch)
    s3_path = folder / S3GEN_FILES[variant]
    load_state_strict(s3gen, read_state(s3_path), s3_path, optional=S3GEN_OPTIONAL_KEYS)

    ve = upstream.VoiceEncoder()
    ve_path = folder / VE_FILES[variant]
    load_state_strict(ve, read_state(ve_path), ve_path)

    tokenizer = load_tokenizer(variant, folder)
    conds = None
    if (folder / CONDS_FILE).exists():
        try:
            conds = upstream.Conditionals.load(folder / CONDS_FILE, map_location="cpu")
        except Exception as exc:
            raise CbxError(f"{folder / CONDS_FILE}: cannot read the built-in voice ({exc})") from None
    meta = {k: v for k, v in meta.items() if k not in ("format", "version", "variant")}
    meta.update(checkpoint_meta(ck_name))
    return ChatterboxModel(t3, s3gen, ve, variant=variant, tokenizer=tokenizer, source=source or str(folder),
                           builtin_conds=conds, meta=meta).eval()


def checkpoint_meta(name: str) -> dict:
    """What ``model.meta`` records of a checkpoint that is not its variant's default."""
    ck = CHECKPOINTS[name]
    if name == ck.variant:
        return {}
    out: dict[str, Any] = {"checkpoint": name}
    if ck.sampling:
        out["sampling_defaults"] = dict(ck.sampling)
    if ck.trim_last_token:
        out["trim_last_token"] = True
    return out


def _tensors_for_file(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; clone only those.
    out, seen = {}, set()
    for key, tensor in module.state_dict().items():
        if key.startswith(UPSTREAM_ALIASES):
            continue
        t = tensor.detach().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t.contiguous()
    return out


def save_upstream_layout(model: ChatterboxModel, out_dir: str | Path) -> Path:
    """Write ``model`` in the upstream file layout of its variant (readable by upstream
    ``from_local`` and by :func:`load_model`). Built-in tiny models also get :data:`META_FILE`.
    ``out_dir`` must not exist or be empty; it appears only once everything is written."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    pruned = (model.meta or {}).get("pruned")
    if pruned:
        # Upstream builds T3 from a named LLAMA_CONFIGS entry (every layer the same width) and
        # S3Gen with fixed block counts: it has no way to express kept layers or per-layer widths.
        raise CbxError(f"{out_dir}: this model is pruned ({_describe_pruned(pruned)}); upstream "
                       "ChatterboxTTS.from_local cannot build that architecture; export the compressed "
                       "checkpoint instead (cbx export without --dequantize), which the workbench loads")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CbxError(f"{out_dir}: exists and is not an empty folder")
    variant = model.variant
    with atomic_dir(out_dir) as tmp:
        t3_state = _tensors_for_file(model.t3)
        if variant == "turbo" and TURBO_UNUSED_WTE not in t3_state:
            cfg = model.t3.cfg
            t3_state[TURBO_UNUSED_WTE] = torch.zeros(cfg.vocab_size, cfg.hidden_size,
                                                     dtype=model.t3.speech_emb.weight.dtype)
        _write_state(t3_state, tmp / CHECKPOINTS[checkpoint_of(model, variant)].t3_file, save_file)
        _write_state(_tensors_for_file(model.s3gen), tmp / S3GEN_FILES[variant], save_file)
        _write_state(_tensors_for_file(model.ve), tmp / VE_FILES[variant], save_file)
        model.tokenizer.save(tmp)
        if model.builtin_conds is not None:
            model.builtin_conds.save(tmp / CONDS_FILE)
        if model.is_tiny:
            meta = {"format": META_FORMAT, "version": META_VERSION, "variant": variant, **model.meta}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out_dir


def _describe_pruned(rec: dict) -> str:
    parts = []
    if rec.get("t3"):
        t = rec["t3"]
        parts.append(f"T3 keeps {len(t.get('layers', []))} of {t.get('num_layers_orig', '?')} layers, "
                     f"FFN widths {sorted(set(t.get('ffn', [])))}, heads {sorted(set(t.get('heads', [])))}")
    if rec.get("cfm"):
        parts.append(f"CFM estimator without blocks {', '.join(rec['cfm'].get('dropped', []))}")
    return "; ".join(parts) or "pruned"


def _write_state(state: dict[str, torch.Tensor], path: Path, save_file: Any) -> None:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, str(path))
