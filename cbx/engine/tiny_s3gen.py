"""A tiny S3Gen: upstream ``S3Token2Wav`` built from the same upstream classes at small sizes.

Unit tests need the real code paths (speech tokenizer, CAMPPlus, conformer encoder, CFM U-Net
estimator, HiFT vocoder) but not 300M parameters. Upstream's ``S3Token2Wav.__init__`` hard-codes
every size, so instead of building the full model and shrinking it (slow: it allocates and
initialises all of it), :func:`build_tiny_s3gen` creates the object without running its
``__init__`` and assigns the same attributes upstream's constructors assign, each built by the
upstream class with small arguments. The result is a genuine ``S3Token2Wav``: upstream
``inference()``, ``embed_ref()`` and our batched path run on it unchanged, and its state dict
has upstream's key names.

What cannot shrink (upstream hard-codes it or the checkpoint format depends on it): encoder
width 512 (its pre-lookahead and upsampling layers are built with 512 channels) and its 4
upsampled conformer layers, 80 mel bins, estimator input 320 (= x, mu, speaker, prompt mels,
80 each), S3Tokenizer head dimension 64 (its rotary table), CAMPPlus' 192-d output and dense
block depths (12, 24, 16), HiFT's upsampling rates (8, 5, 3) x iSTFT hop 4 = 480 samples per mel
frame at 24 kHz. Everything else is in :data:`TINY_S3GEN_ARCH`, which a saved tiny model
stores (as JSON) so the loader can rebuild the same architecture.

Random weights: upstream's initialisations are kept; ``estimator_output_scale`` shrinks the
last layer of the CFM estimator so random mels stay finite and near unit scale; the audio then
peaks around 0.1 (finite, bounded, not silent).
"""

from __future__ import annotations

import copy
import warnings

import torch

# Sizes of the tiny S3Gen (original and Turbo/meanflow alike). Keys name the upstream
# constructor argument they set.
TINY_S3GEN_ARCH: dict = {
    "tokenizer": {"n_audio_state": 128, "n_audio_head": 2, "n_audio_layer": 1},
    "speaker_encoder": {"growth_rate": 8, "bn_size": 2, "init_channels": 32},
    "encoder": {"attention_heads": 2, "linear_units": 256, "num_blocks": 1},
    "estimator": {"channels": [64], "attention_head_dim": 64, "n_blocks": 1, "num_mid_blocks": 1, "num_heads": 1},
    "hift": {"base_channels": 32, "f0_cond_channels": 32, "resblock_kernel_sizes": [3]},
    "estimator_output_scale": 0.1,
}


def tiny_s3gen_arch() -> dict:
    """A fresh copy of the default tiny architecture (JSON-able)."""
    return copy.deepcopy(TINY_S3GEN_ARCH)


def _tokenizer(up, cfg: dict):
    import librosa
    from s3tokenizer.model_v2 import ModelConfig, S3TokenizerV2

    tok_cls = up.S3Tokenizer
    tok = tok_cls.__new__(tok_cls)
    config = ModelConfig(**cfg)
    S3TokenizerV2.__init__(tok, "speech_tokenizer_v2_25hz", config)
    # The two buffers upstream's S3Tokenizer.__init__ adds (it would build a full-size encoder).
    tok.n_fft = 400
    mel = librosa.filters.mel(sr=up.S3_SR, n_fft=tok.n_fft, n_mels=config.n_mels)
    tok.register_buffer("_mel_filters", torch.FloatTensor(mel))
    tok.register_buffer("window", torch.hann_window(tok.n_fft))
    return tok


def _build(up, meanflow: bool, arch: dict):
    from chatterbox.models.s3gen.utils.mel import mel_spectrogram

    s3 = up.S3Token2Wav.__new__(up.S3Token2Wav)
    torch.nn.Module.__init__(s3)
    # Attributes of S3Token2Mel.__init__, small.
    s3.tokenizer = _tokenizer(up, arch["tokenizer"])
    s3.mel_extractor = mel_spectrogram
    s3.speaker_encoder = up.CAMPPlus(memory_efficient=False, **arch["speaker_encoder"])
    s3.meanflow = meanflow
    encoder = up.UpsampleConformerEncoder(
        output_size=512,
        dropout_rate=0.1,
        positional_dropout_rate=0.1,
        attention_dropout_rate=0.1,
        normalize_before=True,
        input_layer="linear",
        pos_enc_layer_type="rel_pos_espnet",
        selfattention_layer_type="rel_selfattn",
        input_size=512,
        use_cnn_module=False,
        macaron_style=False,
        **arch["encoder"],
    )
    estimator = up.ConditionalDecoder(
        in_channels=320, out_channels=80, causal=True, dropout=0.0, act_fn="gelu", meanflow=meanflow, **arch["estimator"]
    )
    decoder = up.CausalConditionalCFM(spk_emb_dim=80, cfm_params=up.CFM_PARAMS, estimator=estimator)
    s3.flow = up.CausalMaskedDiffWithXvec(encoder=encoder, decoder=decoder)
    s3.resamplers = {}
    # Attributes of S3Token2Wav.__init__, small.
    hift = dict(arch["hift"])
    f0 = up.ConvRNNF0Predictor(cond_channels=hift.pop("f0_cond_channels"))
    kernels = hift.pop("resblock_kernel_sizes")
    s3.mel2wav = up.HiFTGenerator(
        sampling_rate=up.S3GEN_SR,
        upsample_rates=[8, 5, 3],
        upsample_kernel_sizes=[16, 11, 7],
        resblock_kernel_sizes=kernels,
        resblock_dilation_sizes=[[1, 3, 5]] * len(kernels),
        source_resblock_kernel_sizes=[7, 7, 11],
        source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        f0_predictor=f0,
        **hift,
    )
    n_trim = up.S3GEN_SR // 50
    trim_fade = torch.zeros(2 * n_trim)
    trim_fade[n_trim:] = (torch.cos(torch.linspace(torch.pi, 0, n_trim)) + 1) / 2
    s3.register_buffer("trim_fade", trim_fade, persistent=False)
    s3.estimator_dtype = "fp32"
    return s3


def _scale_estimator_output(s3, scale: float) -> None:
    """Shrink the estimator's last layer: with random weights the 10-step CFG solve then stays
    near the noise scale instead of growing at every step. (HiFT's own init already gives
    audio around 0.1 peak, and it clamps at 0.99.)"""
    with torch.no_grad():
        s3.flow.decoder.estimator.final_proj.weight.mul_(scale)


def _resolve_arch(arch: dict | None) -> dict:
    """Defaults completed by ``arch`` (a saved folder's dict may omit keys; "seed" is ignored)."""
    from cbx.errors import CbxError

    full = tiny_s3gen_arch()
    for key, value in (arch or {}).items():
        if key == "seed":
            continue
        if key not in full:
            raise CbxError(f"tiny S3Gen architecture: unknown key '{key}' (known: {', '.join(sorted(full))})")
        full[key] = copy.deepcopy(value)
    return full


def build_tiny_s3gen(meanflow: bool = False, seed: int = 0, arch: dict | None = None):
    """An upstream ``S3Token2Wav`` with the tiny sizes of ``arch`` and weights seeded by ``seed``.

    ``meanflow=True`` gives the Turbo variant (MeanFlow estimator with its time mixer). ``arch``
    overrides top-level entries of :data:`TINY_S3GEN_ARCH`; an unknown key is a CbxError. The
    global torch RNG is left as it was. The module is returned in eval mode on the CPU.
    """
    from cbx.engine import upstream as up

    arch = _resolve_arch(arch)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # diffusers announces LoRACompatibleLinear's deprecation for every estimator block.
        warnings.filterwarnings("ignore", message=".*LoRACompatibleLinear.*")
        torch.manual_seed(int(seed))
        s3 = _build(up, bool(meanflow), arch)
        _scale_estimator_output(s3, float(arch.get("estimator_output_scale", 1.0)))
    return s3.eval()


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["TINY_S3GEN_ARCH", "build_tiny_s3gen", "count_parameters", "tiny_s3gen_arch"]
