"""The tiny S3Gen: upstream classes, seeded, rebuildable from its JSON architecture."""

import json

import torch

from cbx.engine.tiny_s3gen import TINY_S3GEN_ARCH, build_tiny_s3gen, count_parameters, tiny_s3gen_arch


def test_engine_s3gen_tiny_is_upstream_small_seeded_and_rebuildable():
    from cbx.engine import upstream as up

    rng_before = torch.random.get_rng_state()
    a = build_tiny_s3gen(meanflow=True, seed=5)
    assert torch.equal(rng_before, torch.random.get_rng_state())  # global RNG untouched
    assert type(a) is up.S3Token2Wav and not a.training and a.meanflow
    assert isinstance(a.flow.decoder.estimator, up.ConditionalDecoder)
    assert a.flow.decoder.estimator.time_embed_mixer is not None  # MeanFlow estimator
    assert isinstance(a.mel2wav, up.HiFTGenerator) and isinstance(a.tokenizer, up.S3Tokenizer)
    # the sizes upstream fixes are kept
    assert a.flow.encoder.output_size() == 512
    assert a.flow.decoder.estimator.in_channels == 320
    assert a.tokenizer.config.n_audio_state // a.tokenizer.config.n_audio_head == 64
    assert a.flow.spk_embed_affine_layer.in_features == 192
    # and it is small (full size: ~260M)
    assert count_parameters(a) < 20_000_000

    arch = json.loads(json.dumps(tiny_s3gen_arch()))  # what a saved tiny folder stores
    assert arch == TINY_S3GEN_ARCH and arch is not TINY_S3GEN_ARCH
    b = build_tiny_s3gen(meanflow=True, seed=6, arch=arch)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)  # another seed, other weights
    b.load_state_dict(sa, strict=True)  # the same architecture: a strict load fits exactly
    c = build_tiny_s3gen(meanflow=True, seed=5, arch=arch)
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in sa.items())  # same seed, same weights


def test_engine_s3gen_tiny_original_has_no_meanflow_mixer():
    import pytest

    from cbx.errors import CbxError

    with pytest.raises(CbxError, match="unknown key 'decoder'"):
        build_tiny_s3gen(arch={"decoder": {}})
    s3 = build_tiny_s3gen(meanflow=False, seed=0, arch={"seed": 0, "encoder": {"attention_heads": 4, "linear_units": 128, "num_blocks": 1}})
    assert s3.flow.encoder.encoders[0].feed_forward.w_1.out_features == 128
    assert s3.flow.decoder.estimator.time_embed_mixer is None and not s3.meanflow
    assert s3.flow.decoder.inference_cfg_rate == 0.7
