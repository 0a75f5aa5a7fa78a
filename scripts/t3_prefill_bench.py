"""T3 prefill time of the default bench stack (full-size random original, T3 int4 RTN g128, bf16
cast copy, as ``cbx bench stack`` builds it), per prefill path, in one process.

    PYTHONPATH=. python scripts/t3_prefill_bench.py [--repeats 3]

The prefill is timed as a one-token decode of the bench sentence with a 10 s synthetic voice
(what ``cbx bench stack`` calls its prefill). Paths: the plain left-padded prefill
(``share_prefix`` off: the path before voice-prefix reuse), the voice prefix computed in the call
(cold voice; still shared by the CFG pair) and found in the cache (warm voice), each with the
prefill in the T3 dtype (bf16) and in fp32 (``prefill_dtype``). Medians of ``--repeats``; run it
under the machine's benchmark lock.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import soundfile as sf

    from cbx.engine import t3_decode as td
    from cbx.engine.bench import BENCH_TEXT, REF_SR, synthetic_voice
    from cbx.engine.synth import SynthRequest, SynthSettings, Synthesizer
    from cbx.engine.t3_prefill import PrefixCache
    from cbx.engine.tiny import build_random
    from cbx.lab.bench_stack import default_stack

    torch.set_flush_denormal(True)
    with contextlib.redirect_stderr(io.StringIO()):
        model = build_random("original", full_size=True, seed=0).eval()
        default_stack(model)
    syn = Synthesizer(model, disk_cache=False)
    s = SynthSettings(dtype="bf16", force_tokens=1, max_speech_tokens=1, batch_size=1).resolved(model)
    syn.prepare(s)
    with tempfile.TemporaryDirectory() as tmp:
        voice = f"{tmp}/ref.wav"
        sf.write(voice, synthetic_voice(10.0), REF_SR)
        rows = syn._rows([SynthRequest(BENCH_TEXT, voice)], s)
        conds = syn._conditioning(voice, rows[0].voice_key, float(s.exaggeration))
    t3 = syn._low_precision(model.t3, s)
    row = [td.T3Row(rows[0].text_tokens, conds.t3, 0)]
    base = syn._decode_settings(s)
    cache = PrefixCache()

    def once(share: bool, dtype: torch.dtype | None, warm: bool) -> float:
        ds = td.DecodeSettings(**{**base.__dict__, "share_prefix": share, "prefill_dtype": dtype})
        if not warm:
            cache.clear()
        with torch.inference_mode(), td.autocast(syn.device, torch.bfloat16):
            t0 = time.perf_counter()
            td.generate(t3, row, ds, prefix_cache=cache)
            return time.perf_counter() - t0

    print(f"prompt: {len(row[0].text_tokens)} text tokens; SynthSettings.prefill_dtype auto -> {s.prefill_dtype}")
    for share, warm, name in ((False, False, "plain prefill"), (True, False, "voice prefix cold"),
                              (True, True, "voice prefix warm")):
        for dtype, dname in ((None, "bf16"), (torch.float32, "fp32")):
            once(share, dtype, True)  # warm-up (fills the cache for the warm path)
            times = [once(share, dtype, warm) for _ in range(args.repeats)]
            print(f"{name:<20} {dname}: median {statistics.median(times):.3f} s  "
                  f"({', '.join(f'{t:.3f}' for t in times)})", flush=True)


if __name__ == "__main__":
    main()
