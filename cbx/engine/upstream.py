"""The single gateway to upstream Chatterbox (chatterbox-tts 0.1.7) code.

Every other module imports upstream classes from here, never from ``chatterbox`` directly, so
that :func:`cbx.engine.compat.install` has run first (upstream imports torchaudio and onnx at
module load) and so that the set of upstream names the workbench depends on is written down in
one place. Importing this module imports upstream (torch, transformers, diffusers): it is not
imported by ``cbx`` or ``cbx.engine`` at package import time.
"""

from __future__ import annotations

import logging
import warnings

import torch

from cbx.engine import compat

compat.install()

# Flush subnormal floats to zero on CPU. Random-weight, bf16 and quantized models produce
# activations in the subnormal range (< 1.2e-38), where x86 arithmetic runs 10-100x slower;
# measured here, the int4 T3 decode step took 829 ms with subnormals and 42 ms without, and the
# vocoder after a bf16 CFM 6.7 s instead of 0.2 s. Such values carry nothing audible. Both the
# upstream path and the engine run under this setting, so comparisons between them stay fair.
torch.set_flush_denormal(True)


class _DropUpstreamNotice(logging.Filter):
    """Drops upstream's per-call notice that the reference mel was trimmed to twice the token
    count (``S3Gen.embed_ref``): the trim is expected (prompts are not padded to 40 ms) and the
    engine relies on it; printed on every conditioning it buried real warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Reference mel length is not equal to 2 * reference token length")


# Upstream logs that notice through the root logger (``logging.warning``): a filter on that
# logger drops exactly it; every other record, warning or not, passes.
if not any(isinstance(f, _DropUpstreamNotice) for f in logging.getLogger().filters):
    logging.getLogger().addFilter(_DropUpstreamNotice())
# The perceiver enters torch.backends.cuda.sdp_kernel() on every call; torch deprecated that
# context manager in favour of sdpa_kernel. Only that message is ignored.
warnings.filterwarnings("ignore", message=r".*sdp_kernel\(\) is deprecated", category=FutureWarning)

with warnings.catch_warnings():
    # perth imports pkg_resources (deprecated), diffusers warns about LoRACompatibleLinear.
    warnings.simplefilter("ignore")
    import chatterbox  # noqa: F401  (checks that every upstream entry point imports)
    from chatterbox import mtl_tts, tts, tts_turbo, vc
    from chatterbox.models.s3gen import S3GEN_SR, S3Gen
    from chatterbox.models.s3gen import s3gen as s3gen_module
    from chatterbox.models.s3gen.configs import CFM_PARAMS
    from chatterbox.models.s3gen.const import S3GEN_SIL
    from chatterbox.models.s3gen.decoder import ConditionalDecoder
    from chatterbox.models.s3gen.f0_predictor import ConvRNNF0Predictor
    from chatterbox.models.s3gen.flow import CausalMaskedDiffWithXvec
    from chatterbox.models.s3gen.flow_matching import CausalConditionalCFM
    from chatterbox.models.s3gen.hifigan import HiFTGenerator
    from chatterbox.models.s3gen.s3gen import S3Token2Mel, S3Token2Wav
    from chatterbox.models.s3gen.transformer.upsample_encoder import UpsampleConformerEncoder
    from chatterbox.models.s3gen.utils.mask import make_pad_mask
    from chatterbox.models.s3gen.xvector import CAMPPlus
    from chatterbox.models.s3tokenizer import S3_SR, SPEECH_VOCAB_SIZE, S3Tokenizer, drop_invalid_tokens
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.models.t3.modules.t3_config import T3Config
    from chatterbox.models.tokenizers import EnTokenizer, MTLTokenizer
    from chatterbox.models.voice_encoder import VoiceEncoder
    from chatterbox.mtl_tts import SUPPORTED_LANGUAGES, ChatterboxMultilingualTTS
    from chatterbox.tts import ChatterboxTTS, Conditionals
    from chatterbox.tts_turbo import ChatterboxTurboTTS
    from chatterbox.vc import ChatterboxVC

# The three variants' Conditionals dataclasses are identical copies (t3: T3Cond, gen: dict);
# the engine uses the original one for every variant.
TurboConditionals = tts_turbo.Conditionals
MTLConditionals = mtl_tts.Conditionals

__all__ = [
    "CAMPPlus",
    "CFM_PARAMS",
    "CausalConditionalCFM",
    "CausalMaskedDiffWithXvec",
    "ChatterboxMultilingualTTS",
    "ChatterboxTTS",
    "ChatterboxTurboTTS",
    "ChatterboxVC",
    "ConditionalDecoder",
    "Conditionals",
    "ConvRNNF0Predictor",
    "EnTokenizer",
    "HiFTGenerator",
    "LLAMA_CONFIGS",
    "MTLConditionals",
    "MTLTokenizer",
    "S3GEN_SIL",
    "S3GEN_SR",
    "S3Gen",
    "S3Token2Mel",
    "S3Token2Wav",
    "S3Tokenizer",
    "S3_SR",
    "SPEECH_VOCAB_SIZE",
    "SUPPORTED_LANGUAGES",
    "T3",
    "T3Cond",
    "T3Config",
    "TurboConditionals",
    "UpsampleConformerEncoder",
    "VoiceEncoder",
    "drop_invalid_tokens",
    "make_pad_mask",
    "mtl_tts",
    "s3gen_module",
    "tts",
    "tts_turbo",
    "vc",
]
