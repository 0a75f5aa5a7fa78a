"""What running HiFT and the flow encoder in bf16 costs in faithfulness, and what it buys in time.

    PYTHONPATH=. python scripts/s3gen_bf16_error.py [--model tiny|full|both] [--tokens 50] [--ref-seconds 10]
        [--steps 2] [--student]

Same speech tokens, same voice, same CFM noise and HiFT seed for every path; each path's output
is compared with the all-fp32 path (mel L1 in nats of the 80-bin log-mel, waveform SNR in dB).
For scale, the row "estimator bf16" is the CFM estimator alone in bf16 (what ``dtype: bf16``
already does). The bounds the tests and docs/CONTRACTS.md state come from this table. Each stage
is timed (flow encoder, CFM solve, HiFT; medians): on a CPU without native bf16 the times say
which dtype each stage should run in (``cfm_dtype``, ``s3gen_bf16``). ``--student`` swaps in an
untrained CFM student (what ``cbx bench stack`` runs; costs what a trained one does).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time

import numpy as np
import torch


def measure(model, voice, n_tokens: int, steps: int, seed: int = 0, repeats: int = 2) -> dict[str, dict[str, float]]:
    from cbx.engine import s3gen_batch as sb
    from cbx.engine.conditioning import prepare_voice
    from cbx.engine.t3_decode import autocast
    from cbx.eval.fidelity import mel_l1, waveform_distance

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 6561, (n_tokens,), generator=g)
    conds = prepare_voice(model, voice, use_cache=False)
    s3 = model.s3gen
    meanflow = bool(getattr(s3, "meanflow", False))
    enc16 = sb.low_precision_encoder(s3.flow.encoder)
    hift16 = sb.low_precision_hift(s3.mel2wav)
    est = s3.flow.decoder.estimator
    import copy

    est16 = copy.deepcopy(est).to(torch.bfloat16)

    def path(enc, hift, estimator):
        t0 = time.perf_counter()
        inputs = sb.cfm_inputs(model, [tokens], [conds], encoder=enc)
        t_enc = time.perf_counter() - t0
        noise = sb.cfm_noise(inputs, [seed], meanflow)
        t0 = time.perf_counter()
        with autocast(inputs.mu.device, next(estimator.parameters()).dtype):
            mels = sb.solve_cfm(estimator, inputs, noise, steps, s3.flow.decoder.inference_cfg_rate, meanflow)
        t_cfm = time.perf_counter() - t0
        mel = sb.crop_mels(mels, inputs)[0].float()
        t0 = time.perf_counter()
        wav = sb.vocode(model, [mel], seeds=[seed], hift=hift)[0]
        t_voc = time.perf_counter() - t0
        return mel, wav, t_enc, t_cfm, t_voc

    rows = {"fp32": (None, None, est), "encoder bf16": (enc16, None, est), "hift bf16": (None, hift16, est),
            "encoder+hift bf16": (enc16, hift16, est), "estimator bf16 (scale)": (None, None, est16)}
    out: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        path(*rows["fp32"])  # warm-up
        path(*rows["encoder+hift bf16"])
        results = {}
        times = {k: ([], [], []) for k in rows}
        for _ in range(repeats):
            for name, args in rows.items():
                mel, wav, *ts = path(*args)
                results[name] = (mel, wav)
                for lst, v in zip(times[name], ts):
                    lst.append(v)
    ref_mel, ref_wav = results["fp32"]
    for name, (mel, wav) in results.items():
        out[name] = {
            "cfm_mel_l1": float((mel - ref_mel).abs().mean()),
            "wav_mel_l1": mel_l1(ref_wav, wav) if name != "fp32" else 0.0,
            "snr_db": waveform_distance(ref_wav, wav)["snr_db"],
            "encoder_s": float(np.median(times[name][0])),
            "cfm_s": float(np.median(times[name][1])),
            "hift_s": float(np.median(times[name][2])),
        }
    return out


def main() -> int:
    from cbx.engine.bench import REF_SR, synthetic_voice
    from cbx.engine.tiny import build_random, build_tiny

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "full", "both"], default="both")
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--ref-seconds", type=float, default=10.0)
    ap.add_argument("--student", action="store_true", help="an untrained CFM student in place of the teacher")
    args = ap.parse_args()
    for kind in (["tiny", "full"] if args.model == "both" else [args.model]):
        with contextlib.redirect_stderr(io.StringIO()):
            model = build_random("original", full_size=True, seed=0) if kind == "full" else build_tiny("original", 0)
        model.eval()
        if args.student:
            from cbx.lab.bench_stack import _swap_student

            _swap_student(model)
        voice = (synthetic_voice(args.ref_seconds), REF_SR)
        res = measure(model, voice, args.tokens, args.steps)
        print(f"{kind} original (random weights), {args.tokens} tokens, {args.ref_seconds:g} s reference, "
              f"{args.steps} CFM steps{' (untrained student)' if args.student else ''}; vs all-fp32:")
        print(f"{'path':<24}{'cfm mel L1':>12}{'wav mel L1':>12}{'SNR dB':>9}{'encoder s':>11}{'cfm s':>8}{'hift s':>9}")
        for name, r in res.items():
            print(f"{name:<24}{r['cfm_mel_l1']:>12.5f}{r['wav_mel_l1']:>12.5f}{r['snr_db']:>9.1f}"
                  f"{r['encoder_s']:>11.3f}{r['cfm_s']:>8.3f}{r['hift_s']:>9.3f}")
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
