"""The notebook API (`import cbx`): nothing heavy at import, and the calls run the same code as
the CLI on the built-in tiny model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import cbx
from cbx.errors import CbxError


def test_import_cbx_imports_no_torch():
    code = "import sys, cbx; cbx.__dir__(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_load_compress_synthesize_and_write(tmp_path):
    model = cbx.load_model("tiny")
    model = cbx.transform(model, "int8_weight_only")
    assert model.meta["compress"][-1]["transform"] == "int8_weight_only"
    out = cbx.synthesize(model, "Hello there.", temperature=0.0, seed=1)
    r = out.results[0]
    assert r.sample_rate == 24000 and r.wav.size > 0 and np.all(np.isfinite(r.wav))
    again = cbx.synthesize(model, ["Hello there."], temperature=0.0, seed=1)
    assert np.array_equal(again.results[0].speech_tokens, r.speech_tokens)
    path = cbx.write_wav(tmp_path / "a.wav", r.wav, r.sample_rate)
    assert path.stat().st_size > 44


def test_bad_transform_parameters_are_refused_with_the_valid_keys():
    with pytest.raises(CbxError, match="valid keys"):
        cbx.transform(cbx.load_model("tiny"), "int4_weight_only", group=32)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError):
        cbx.not_a_call  # noqa: B018
    assert {"load_model", "run", "score"} <= set(dir(cbx))
