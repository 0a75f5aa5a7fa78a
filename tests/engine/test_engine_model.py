"""Model container, built-in tiny models, strict loading and the upstream file layout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cbx.engine import model as M
from cbx.engine.tiny import build_tiny
from cbx.errors import CbxError


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model, tiny_turbo, tiny_multilingual):
    """Each tiny model written once in the upstream layout (tests copy it before breaking it)."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for m in (tiny_model, tiny_turbo, tiny_multilingual):
        # A misleading folder name: the variant must come from the files, never the name.
        out[m.variant] = M.save_upstream_layout(m, root / f"{m.variant}-named-turbo")
    return out


def sd(model):
    """State dict without ``t3.patched_model.*``: the alias upstream's T3.inference() attaches
    (another area's test may have run upstream inference on a shared session model)."""
    return {k: v for k, v in model.state_dict().items() if ".patched_model." not in f".{k}"}


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_model_names_are_rooted_and_tiny_is_seeded(tiny_model, tiny_turbo):
    names = dict(tiny_model.named_modules())
    assert "t3.tfmr.layers.0.mlp.gate_proj" in names
    assert "s3gen.flow.decoder.estimator" in names and "ve.lstm" in names
    assert "t3.tfmr.h.0.mlp.c_fc" in dict(tiny_turbo.named_modules())
    assert not hasattr(tiny_turbo.t3.tfmr, "wte")  # deleted as upstream's loader does
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = build_tiny("original", seed=0)
    assert torch.equal(torch.rand(1), before)  # building leaves the global RNG alone
    other = build_tiny("original", seed=1)
    a, b, c = sd(tiny_model), sd(again), sd(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["t3.speech_head.weight"], c["t3.speech_head.weight"])
    assert tiny_model.meta["tiny"]["backbone"]["hidden_size"] == 64


@pytest.mark.parametrize("variant", ["original", "turbo", "multilingual"])
def test_model_save_load_round_trip_is_exact(variant, saved, tiny_model, tiny_turbo, tiny_multilingual):
    model = {"original": tiny_model, "turbo": tiny_turbo, "multilingual": tiny_multilingual}[variant]
    loaded = M.load_model(saved[variant])
    assert loaded.variant == variant and loaded.is_tiny
    a, b = sd(model), sd(loaded)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lang = "fr" if variant == "multilingual" else None
    assert loaded.tokenizer.encode("Hello world, again!", lang) == model.tokenizer.encode("Hello world, again!", lang)
    assert torch.equal(loaded.builtin_conds.t3.speaker_emb, model.builtin_conds.t3.speaker_emb)


def test_model_loads_in_upstream_from_local(saved, tiny_model, tiny_turbo, monkeypatch):
    """Upstream's own loaders read our files (their classes built at the tiny sizes)."""
    from cbx.engine import upstream

    for model, mod, cls in ((tiny_model, upstream.tts, upstream.ChatterboxTTS),
                            (tiny_turbo, upstream.tts_turbo, upstream.ChatterboxTurboTTS)):
        arch = model.meta["tiny"]
        monkeypatch.setattr(mod, "T3", lambda hp=None, v=model.variant, a=arch: M.build_t3(v, a))
        monkeypatch.setattr(mod, "S3Gen", lambda meanflow=False, v=model.variant, a=arch: M.build_s3gen(v, a["s3gen"]))
        tts = cls.from_local(saved[model.variant], "cpu")
        ours = sd(model.t3)
        theirs = tts.t3.state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        s_ours, s_theirs = model.s3gen.state_dict(), tts.s3gen.state_dict()
        assert all(torch.equal(s_ours[k], s_theirs[k]) for k in s_ours)
        assert tts.conds is not None
        text = "Hello there."
        if model.variant == "turbo":
            assert tts.tokenizer(text)["input_ids"] == model.tokenizer.encode(text)
        else:
            assert tts.tokenizer.encode(text) == model.tokenizer.encode(text)


def test_model_missing_file(saved, tmp_path):
    ckpt = _copy(saved["original"], tmp_path)
    (ckpt / "ve.safetensors").unlink()
    with pytest.raises(CbxError, match=r"ve\.safetensors: missing file"):
        M.load_model(ckpt)
    ckpt2 = _copy(saved["turbo"], tmp_path / "b")
    (ckpt2 / "t3_turbo_v1.safetensors").unlink()
    (ckpt2 / M.META_FILE).unlink()
    with pytest.raises(CbxError, match="no T3 weights found"):
        M.load_model(ckpt2)


def test_model_truncated_safetensors(saved, tmp_path):
    ckpt = _copy(saved["original"], tmp_path)
    path = ckpt / "t3_cfg.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CbxError, match=r"t3_cfg\.safetensors: cannot read weights \(truncated or corrupt"):
        M.load_model(ckpt)
    pt = _copy(saved["multilingual"], tmp_path / "m") / "s3gen.pt"
    pt.write_bytes(pt.read_bytes()[:1000])
    with pytest.raises(CbxError, match=r"s3gen\.pt: cannot read weights"):
        M.load_model(pt.parent)


def test_model_wrong_shape_missing_and_unexpected_keys(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = _copy(saved["original"], tmp_path)
    path = ckpt / "t3_cfg.safetensors"
    state = load_file(str(path))
    bad = dict(state)
    bad["speech_head.weight"] = bad["speech_head.weight"][:-1]
    save_file(bad, str(path))
    with pytest.raises(CbxError, match=r"t3_cfg\.safetensors: tensor 'speech_head\.weight' has shape \[8193, 64\], "
                                       r"the model expects \[8194, 64\]"):
        M.load_model(ckpt)
    bad = {k: v for k, v in state.items() if k != "text_emb.weight"}
    bad["extra.weight"] = torch.zeros(2)
    save_file(bad, str(path))
    with pytest.raises(CbxError, match=r"1 missing key\(s\) \(text_emb\.weight\); 1 unexpected key\(s\) \(extra\.weight\)"):
        M.load_model(ckpt)


def test_model_s3gen_tolerates_only_upstreams_optional_keys(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = _copy(saved["original"], tmp_path)
    path = ckpt / "s3gen.safetensors"
    state = load_file(str(path))
    save_file({k: v for k, v in state.items() if k not in M.S3GEN_OPTIONAL_KEYS}, str(path))
    loaded = M.load_model(ckpt)  # upstream's harmless missing buffers
    assert torch.equal(loaded.s3gen.tokenizer.window, state["tokenizer.window"])
    victim = next(k for k in state if k.startswith("flow.decoder"))
    save_file({k: v for k, v in state.items() if k != victim}, str(path))
    with pytest.raises(CbxError, match=rf"s3gen\.safetensors: .*missing key\(s\) \({victim}\)"):
        M.load_model(ckpt)


def test_model_variant_from_files_and_metadata(saved, tmp_path):
    ckpt = _copy(saved["original"], tmp_path)
    meta = json.loads((ckpt / M.META_FILE).read_text())
    meta["variant"] = "turbo"
    (ckpt / M.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CbxError, match=r"t3_turbo_v1\.safetensors: missing file"):
        M.load_model(ckpt)
    (ckpt / M.META_FILE).write_text("{not json")
    with pytest.raises(CbxError, match="cbx_model.json: not valid JSON"):
        M.load_model(ckpt)
    (ckpt / M.META_FILE).unlink()
    shutil.copy(saved["multilingual"] / "t3_mtl23ls_v2.safetensors", ckpt)
    with pytest.raises(CbxError, match="holds T3 weights of several models"):
        M.detect_variant(ckpt)
    assert M.detect_variant(ckpt, "original") == "original"


def test_model_unknown_hub_id_fails_before_network(monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("network used")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(CbxError, match=r"unknown Hub model id 'ResembleAI/chatterbox-tubro'.*ResembleAI/chatterbox-turbo"):
        M.load_model("ResembleAI/chatterbox-tubro")
    with pytest.raises(CbxError, match="not a folder"):
        M.load_model("no-such-folder")


def test_model_save_refuses_non_empty_folder_and_leaves_nothing(tiny_model, tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CbxError, match="exists and is not an empty folder"):
        M.save_upstream_layout(tiny_model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    class Boom(Exception):
        pass

    class BadTok:
        def save(self, d):
            raise Boom()

    broken = M.ChatterboxModel(tiny_model.t3, tiny_model.s3gen, tiny_model.ve, variant="original",
                               tokenizer=BadTok(), source="x", meta=tiny_model.meta)
    with pytest.raises(Boom):
        M.save_upstream_layout(broken, tmp_path / "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no half-written folder left


def test_model_dtype_casts_t3_only():
    m = M.load_model("tiny-turbo", dtype=torch.bfloat16)
    assert m.t3.speech_head.weight.dtype == torch.bfloat16
    assert next(m.s3gen.parameters()).dtype == torch.float32


def test_model_hub_ids_fetch_only_upstreams_files(saved, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, sorted(allow_patterns)))
        return str(saved["multilingual" if "ve.pt" in allow_patterns else "original"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    m = M.load_model("ResembleAI/chatterbox")
    assert m.variant == "original" and m.source == "ResembleAI/chatterbox"
    assert calls[-1] == ("ResembleAI/chatterbox", sorted(["ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors",
                                                          "tokenizer.json", "conds.pt"]))
    m = M.load_model("ResembleAI/chatterbox:multilingual")
    assert m.variant == "multilingual" and calls[-1][0] == "ResembleAI/chatterbox"
    assert "t3_mtl23ls_v2.safetensors" in calls[-1][1]

    def offline(*a, **k):
        raise OSError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CbxError, match="cannot download 'ResembleAI/chatterbox-turbo'.*offline mode"):
        M.load_model("ResembleAI/chatterbox-turbo")


def test_model_tiny_copy_fixture_is_independent(tiny_copy, tiny_model):
    mine = tiny_copy("original")
    with torch.no_grad():
        mine.t3.speech_head.weight.zero_()
    assert tiny_model.t3.speech_head.weight.abs().sum() > 0
    assert mine.tokenizer.encode("Hi there") == tiny_model.tokenizer.encode("Hi there")


def test_model_random_sources_route_to_the_full_size_builder(monkeypatch):
    """``random:VARIANT`` builds upstream's full-size architecture with seeded random weights;
    the build itself (3.8 GB, 20 s for the original) is stood in for by the tiny one here."""
    from cbx.engine import tiny

    calls = []

    def fake_build_random(variant, full_size=True, seed=0):
        calls.append((variant, full_size, seed))
        return build_tiny(variant, seed)

    monkeypatch.setattr(tiny, "build_random", fake_build_random)
    for source, variant in (("random:original", "original"), ("random:turbo", "turbo"),
                            ("random:multilingual", "multilingual")):
        assert M.load_model(source).variant == variant
    assert calls == [("original", True, 0), ("turbo", True, 0), ("multilingual", True, 0)]
    with pytest.raises(CbxError, match=r"not a built-in model \(.*random:original, random:turbo"):
        M.load_model("random:orginal")


@pytest.mark.parametrize("variant, t3_params, speech_rows, text_rows", [
    ("original", 532_405_248, 8194, 704), ("turbo", 478_862_755, 6563, 50276),
    ("multilingual", 535_989_248, 8194, 2454)])
def test_model_full_size_architecture_has_upstreams_sizes(variant, t3_params, speech_rows, text_rows):
    # On the meta device: the full-size skeleton's shapes without allocating 2 GB.
    with torch.device("meta"):
        t3 = M.build_t3(variant)
    assert sum(p.numel() for p in t3.parameters()) == t3_params
    assert t3.speech_head.weight.shape[0] == speech_rows and t3.text_head.weight.shape[0] == text_rows


def test_nano_is_turbo_code_with_its_own_file_and_loads_back(tmp_path):
    m = M.load_model("tiny-nano")
    assert m.variant == "turbo" and m.meta["checkpoint"] == "nano" and len(m.t3.tfmr.h) == 3
    out = M.save_upstream_layout(m, tmp_path / "n")
    assert (out / "t3_nano_v1.safetensors").is_file() and not (out / "t3_turbo_v1.safetensors").exists()
    back = M.load_model(out)
    assert back.meta["checkpoint"] == "nano" and torch.equal(back.t3.speech_head.weight, m.t3.speech_head.weight)
    assert M.detect_checkpoint(out) == "nano" and M.detect_variant(out) == "turbo"


def test_multilingual_v3_file_is_found_and_brings_its_sampling_default(saved, tmp_path):
    from cbx.engine.synth import SynthSettings

    ckpt = _copy(saved["multilingual"], tmp_path)
    (ckpt / "t3_mtl23ls_v2.safetensors").rename(ckpt / "t3_mtl23ls_v3.safetensors")
    v3 = M.load_model(ckpt)
    assert v3.variant == "multilingual" and v3.meta["checkpoint"] == "multilingual-v3"
    assert SynthSettings().resolved(v3).repetition_penalty == 1.2  # upstream's V3 default (v2: 2.0)
    shutil.copy(ckpt / "t3_mtl23ls_v3.safetensors", ckpt / "t3_mtl23ls_v2.safetensors")
    assert "checkpoint" not in M.load_model(ckpt).meta  # both present: v2, upstream's default
    assert M.load_model(ckpt, variant="multilingual-v3").meta["checkpoint"] == "multilingual-v3"
    assert SynthSettings().resolved(M.load_model(ckpt)).repetition_penalty == 2.0


def test_nano_and_v3_hub_ids_fetch_their_files(saved, monkeypatch, tmp_path):
    import huggingface_hub

    nano_dir = M.save_upstream_layout(M.load_model("tiny-nano"), tmp_path / "nano")
    calls = []

    def fake_snapshot(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, sorted(allow_patterns)))
        return str(nano_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    m = M.load_model("ResembleAI/chatterbox-nano")
    assert m.meta["checkpoint"] == "nano" and calls[-1][0] == "ResembleAI/chatterbox-nano"
    from cbx.engine.hub import HUB_MODELS

    assert "t3_mtl23ls_v3.safetensors" in HUB_MODELS["ResembleAI/chatterbox:multilingual-v3"].allow_patterns


def test_full_size_nano_architecture():
    with torch.device("meta"):
        t3 = M.build_t3("turbo", backbone="GPT2_small")
    assert len(t3.tfmr.h) == 12 and t3.cfg.hidden_size == 768
    assert t3.speech_head.weight.shape == (6563, 768) and t3.text_emb.weight.shape == (50276, 768)
