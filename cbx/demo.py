"""``cbx demo``: the README's first command; works offline on a fresh machine.

It synthesizes one sentence with the built-in tiny model (random weights: the audio is not
speech, the point is that the whole pipeline, its timings and the real voice conditioning run)
using a real voice prompt from the offline assets, writes ``out/demo.wav`` and prints the stage
timings. The voice comes from the eval layer's offline set (``cbx.eval.sets``), so the demo and
the eval suite agree on what "the offline voices" are; a later issue turns the demo into an
experiment file run by the lab runner.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cbx.errors import CbxError

DEMO_TEXT = ("Chatterbox, compressed and measured. "
             "This sentence was synthesized offline by the built-in tiny model.")
DEMO_OUT = "out/demo.wav"
INSTALL_HINT = ("install the offline voices: `sudo apt-get install asterisk-core-sounds-en-wav` "
                "(or run scripts/setup_env.sh), or pass --voice FILE")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cbx.engine.cli_synth import add_settings_arguments

    parser.add_argument("--text", default=DEMO_TEXT, help="text to speak")
    parser.add_argument("--voice", default=None, help="reference audio (default: first offline voice)")
    parser.add_argument("--out", default=DEMO_OUT, help=f"output wav (default: {DEMO_OUT})")
    parser.add_argument("--model", default="tiny", help="model source (default: tiny)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    add_settings_arguments(parser)


def offline_voice() -> str:
    """Path of a real speech prompt from the offline eval set, or a CbxError saying how to get one."""
    try:
        from cbx.eval.sets import get_eval_set
    except ImportError:
        raise CbxError(f"no offline voice available (cbx.eval.sets is missing); {INSTALL_HINT}") from None
    try:
        items = get_eval_set("offline").items
    except CbxError as e:
        raise CbxError(f"no offline voice available ({e}); {INSTALL_HINT}") from None
    for item in items:
        if item.prompt_path and Path(item.prompt_path).is_file():
            return str(item.prompt_path)
    raise CbxError(f"the offline eval set has no readable voice prompt; {INSTALL_HINT}")


def run(args: argparse.Namespace) -> int:
    from cbx.engine.audio import write_wav
    from cbx.engine.cli_synth import check_out, check_voice, format_timings, resolve_device, settings_from_args

    settings = settings_from_args(args)
    voice = args.voice or offline_voice()
    check_voice(voice)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out = check_out(str(out))
    device = resolve_device(args.device)

    from cbx.engine.model import load_model
    from cbx.engine.synth import SynthRequest, Synthesizer

    model = load_model(args.model, device=str(device))
    batch = Synthesizer(model, device=device).synthesize([SynthRequest(args.text, voice, id="demo")], settings)
    res = batch.results[0]
    write_wav(out, res.wav, res.sample_rate)
    print(f"model {args.model} ({model.variant}), voice {voice}")
    print(f"wrote {out} ({res.audio_s:.2f} s of audio, {res.sample_rate} Hz, {len(res.chunks)} chunk(s))")
    print(format_timings(batch))
    return 0
