"""``cbx synth``, ``cbx --version``, ``cbx list`` and ``cbx bench engine`` through ``cbx.cli.main``: outputs, exit
codes and one-line reasons, and that a failed call writes nothing."""

from __future__ import annotations

import re

import numpy as np
import pytest
import soundfile as sf

from cbx.cli import main
from cbx.engine.bench import synthetic_voice

FAST = ["--max-speech-tokens", "20", "--cfm-steps", "2", "--no-watermark", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny-model ops gain nothing from intra-op threads (see test_engine_synth.py)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "ref.wav"
    sf.write(p, synthetic_voice(2.5, sr=22_050, seed=4), 22_050)
    return str(p)


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, f"expected a one-line reason, got {err}"
    return err[0]


def test_synth_writes_a_24k_wav_and_prints_timings(voice, tmp_path, capsys):
    out = tmp_path / "o.wav"
    rc = main(["synth", "--text", "Hello from the command line. Two sentences.", "--voice", voice,
               "--out", str(out), "--model", "tiny", "--seed", "3", *FAST])
    assert rc == 0
    wav, sr = sf.read(out)
    assert sr == 24_000 and wav.ndim == 1 and len(wav) > 0 and np.all(np.isfinite(wav))
    printed = capsys.readouterr().out
    for word in ("conditioning", "t3", "cfm", "vocoder", "watermark", "total", "real-time factor"):
        assert word in printed
    assert not [p for p in tmp_path.iterdir() if p.name != "o.wav"], "temporary files left behind"


def test_synth_stream_writes_the_file_and_prints_the_time_to_first_audio(voice, tmp_path, capsys):
    out = tmp_path / "s.wav"
    rc = main(["synth", "--text", "Hello from the command line. Two sentences.", "--voice", voice, "--out", str(out),
               "--model", "tiny", "--seed", "3", "--stream", "--first-chunk-tokens", "4", "--chunk-tokens", "6",
               *FAST])
    assert rc == 0
    printed = capsys.readouterr().out
    first = float(re.search(r"first audio after ([0-9.]+) s", printed).group(1))
    total = float(re.search(r"total ([0-9.]+) s", printed).group(1))
    assert 0 < first < total
    assert int(re.search(r"(\d+) piece\(s\)", printed).group(1)) >= 3  # pieces written as they came
    wav, sr = sf.read(out)
    # two sentences of 20 tokens each (FAST; 2 mel frames of 480 samples per token, less the
    # frame the prompt's mel may hold beyond its tokens), played one after the other
    assert sr == 24_000 and 2 * 19 * 960 <= len(wav) <= 2 * 20 * 960 and np.all(np.isfinite(wav))
    assert [p.name for p in tmp_path.iterdir()] == ["s.wav"]  # the partial file was renamed


@pytest.mark.parametrize("args, reason", [
    (["--first-chunk-tokens", "5"], r"only with --stream"),
    (["--voice", "{tmp}/nope.wav"], r"--voice .*nope\.wav.*no such file"),
    (["--out", "{tmp}/missing_dir/o.wav"], r"--out .*does not exist"),
    (["--out", "{tmp}/o.mp4"], r"--out .*\.wav or \.flac"),
    (["--top-p", "5"], r"'top_p'=5\.0"),
    (["--dtype", "fp8"], r"'dtype'"),
    (["--temperature", "warm"], r"--temperature.*invalid float"),
    (["--seed", "-1"], r"'seed'=-1"),
    (["--model", "no-such-model"], r"no-such-model"),
    (["--device", "tpu"], r"--device 'tpu'"),
])
def test_synth_bad_arguments_exit_2_with_one_line_and_write_nothing(voice, tmp_path, capsys, args, reason):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = {"--text": "Hi.", "--voice": voice, "--out": str(tmp_path / "o.wav")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["synth", *FAST, *[x for kv in base.items() for x in kv]]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse type errors exit from the parser itself
        rc = e.code
    assert rc == 2
    assert re.search(reason, _err_line(capsys)), reason
    assert list(tmp_path.iterdir()) == []


def test_version_and_lists_come_from_the_registries(capsys):
    import cbx
    from cbx.compress.registry import registered
    from cbx.eval.registry import metric_specs

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"cbx {cbx.__version__}"
    assert main(["list", "transforms"]) == 0
    out = capsys.readouterr().out
    for name in registered():
        assert re.search(rf"^{name}: .+\n    params: ", out, re.M), name
    assert "group_size=128" in out and "checkpoint (required)" in out
    assert main(["list", "metrics"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == len(metric_specs()) and "wer: lower is better" in out
    assert main(["list", "sets"]) == 0 and "offline: real recorded voices" in capsys.readouterr().out
    assert main(["list", "models"]) == 0 and "ResembleAI/chatterbox-turbo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["demo"])  # gone: `make demo` runs the demo experiment
    assert e.value.code == 2

def test_bench_engine_smoke_prints_both_paths_and_the_speedup_last(capsys):
    rc = main(["bench", "engine", "--model", "tiny", "--tokens", "3", "--ref-seconds", "1", "--cfm-steps", "1",
               "--no-warmup", "--device", "cpu", "--dtype", "fp32"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"engine speed-up vs upstream: \d+\.\d\dx", lines[-1])
    table = {ln.split()[0]: ln.split()[1:] for ln in lines if ln.split()}
    for stage in ("conditioning", "t3", "cfm", "vocoder", "watermark", "total"):
        upstream_s, engine_s = float(table[stage][0]), float(table[stage][1])
        assert upstream_s > 0 and engine_s > 0
    assert lines[0].startswith("machine:") and "torch" in lines[0]


def test_bench_engine_compile_adds_the_compiled_column_last(capsys):
    rc = main(["bench", "engine", "--model", "tiny", "--tokens", "3", "--ref-seconds", "1", "--cfm-steps", "1",
               "--no-warmup", "--device", "cpu", "--dtype", "fp32", "--compile", "eager"])
    assert rc == 0
    out = capsys.readouterr().out
    assert re.search(r"compiling T3's decode step \(eager\) \+ one run: \d+\.\d s", out)
    header = next(ln for ln in out.splitlines() if ln.startswith("stage"))
    assert header.split()[-3:] == ["fp32+eager", "s", "speed-up"]


def test_bench_engine_rejects_bad_numbers(capsys):
    assert main(["bench", "engine", "--tokens", "0"]) == 2
    assert "--tokens" in _err_line(capsys)
    assert main(["bench", "engine", "--compile", "nope"]) == 2
    assert "'compile'" in _err_line(capsys)


def test_save_model_writes_the_upstream_layout_that_loads_back(tmp_path, capsys):
    import torch

    from cbx.engine.model import load_model

    out = tmp_path / "m"
    assert main(["save-model", "tiny-turbo", "--out", str(out)]) == 0
    assert "saved tiny-turbo (turbo)" in capsys.readouterr().out
    assert {"t3_turbo_v1.safetensors", "s3gen_meanflow.safetensors", "ve.safetensors"} <= {p.name for p in out.iterdir()}
    back, ref = load_model(out), load_model("tiny-turbo")
    assert back.variant == "turbo"
    assert torch.equal(back.t3.speech_head.weight, ref.t3.speech_head.weight)
    # a second save into the now non-empty folder is refused before any model is built
    assert main(["save-model", "tiny", "--out", str(out)]) == 2
    assert "exists and is not an empty folder" in _err_line(capsys)
    assert main(["save-model", "random:nope", "--out", str(tmp_path / "n")]) == 2
    assert "random:original" in _err_line(capsys) and not (tmp_path / "n").exists()
