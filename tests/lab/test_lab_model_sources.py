"""Students and exports are models: a compressed model with a distilled CFM student saves and
reloads bit-exactly (its MeanFlow skeleton rebuilt from the manifest), and a compressed folder
(a run's checkpoint or an export) is a model source everywhere: ``load_source``, the runner's
``model:``, ``cbx synth --model`` and ``cbx save-model``; an edited export is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import soundfile as sf
import torch

from cbx.cli import main
from cbx.compress.checkpoint import load_compressed, save_compressed
from cbx.compress.registry import apply_transforms, build_config
from cbx.compress.source import load_source, source_kind
from cbx.errors import CbxError


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory):
    """A compressed tiny model: int4 T3 + a (perturbed) 2-step CFM student, saved."""
    from cbx.distill.student import make_student, save_student
    from cbx.engine.tiny import build_tiny

    root = tmp_path_factory.mktemp("student")
    model = build_tiny("original")
    student = make_student(model.s3gen.flow.decoder.estimator)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    sdir = save_student(student.eval(), root / "student", n_steps=2, trained_steps=[1, 2])
    steps = [("int4_weight_only", {"group_size": 32}), ("cfm_student", {"checkpoint": str(sdir), "steps": 2})]
    model = apply_transforms(model, [(n, build_config(n, p)) for n, p in steps])
    return model, save_compressed(model, root / "ck")


def _estimator_out(model):
    g = torch.Generator().manual_seed(0)
    T = 16
    with torch.inference_mode():
        return model.s3gen.flow.decoder.estimator(
            x=torch.randn(1, 80, T, generator=g), mask=torch.ones(1, 1, T), mu=torch.randn(1, 80, T, generator=g),
            t=torch.tensor([0.3]), spks=torch.randn(1, 80, generator=g), cond=torch.randn(1, 80, T, generator=g),
            r=torch.tensor([0.8]))


def test_student_model_reloads_bit_exactly(student_ckpt):
    model, ck = student_ckpt
    manifest = json.loads((ck / "manifest.json").read_text())
    assert manifest["s3gen_meanflow"] is True
    back = load_compressed(ck)  # was: unexpected key ...time_embed_mixer.weight
    assert back.s3gen.meanflow and back.meta["cfm_steps"] == 2
    assert torch.equal(_estimator_out(back), _estimator_out(model))
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compressed_folders_are_model_sources(student_ckpt, tmp_path, capsys):
    from cbx.lab.runner import Backend

    model, ck = student_ckpt
    assert source_kind(str(ck)) == "compressed" and Backend().model_source_kind(str(ck)) == "compressed"
    assert source_kind("tiny") == "builtin"
    loaded = Backend().load_model(str(ck), "cpu")
    assert torch.equal(_estimator_out(loaded), _estimator_out(model))
    out = tmp_path / "o.wav"
    assert main(["synth", "--text", "From a compressed folder.", "--model", str(ck), "--out", str(out),
                 "--max-speech-tokens", "12", "--no-watermark", "--device", "cpu"]) == 0
    wav, sr = sf.read(out)
    assert sr == 24_000 and len(wav) > 0
    # a compressed non-student source saves dequantized in the upstream layout; a student cannot
    assert main(["save-model", str(ck), "--out", str(tmp_path / "up")]) == 2
    assert "MeanFlow student" in capsys.readouterr().err


def test_an_export_is_verified_before_it_loads(student_ckpt, tmp_path):
    from cbx.lab.export import EXPORT_FILE, _file_hashes

    _, ck = student_ckpt
    exp = tmp_path / "export"
    shutil.copytree(ck, exp)
    (exp / EXPORT_FILE).write_text(json.dumps({"format": "cbx-export", "version": 1, "kind": "compressed",
                                               "files": _file_hashes(exp)}))
    assert load_source(str(exp)).s3gen.meanflow
    (exp / "notes.txt").write_text("added later")
    with pytest.raises(CbxError, match=r"notes\.txt: not listed in export\.json"):
        load_source(str(exp))
    (exp / "notes.txt").unlink()
    with open(exp / "manifest.json", "a") as f:
        f.write(" ")
    with pytest.raises(CbxError, match=r"manifest\.json: content does not match its hash in export\.json"):
        load_source(str(exp))


def test_a_compressed_nano_reloads_as_nano(tmp_path):
    from cbx.engine.model import load_model

    model = apply_transforms(load_model("tiny-nano"), [("int8_weight_only", build_config("int8_weight_only", {}))])
    back = load_source(str(save_compressed(model, tmp_path / "ck")))
    assert back.meta["checkpoint"] == "nano" and len(back.t3.tfmr.h) == 3
    x = torch.randn(2, back.t3.speech_head.in_features)
    assert torch.equal(back.t3.speech_head(x), model.t3.speech_head(x))


def test_shipped_nano_and_v3_baselines_load():
    from pathlib import Path

    from cbx.lab.schema import load_experiments

    root = Path(__file__).resolve().parents[2] / "experiments"
    models = {e.model for f in ("baseline-nano.yaml", "baseline-multilingual-v3.yaml")
              for e in load_experiments(root / f)}
    assert models == {"ResembleAI/chatterbox-nano", "ResembleAI/chatterbox:multilingual-v3"}
