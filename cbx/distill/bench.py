"""``cbx bench student``: S3Gen time of the 10-step CFG teacher vs a few-step student.

What it measures: upstream's full-size S3Gen architecture (conformer encoder, CFM U-Net
estimator, HiFT vocoder) with random weights (no download; real sizes and costs, meaningless
audio), on one utterance of ``--tokens`` speech tokens with a ``--ref-seconds`` voice prompt
(prompt tokens and mels as upstream's ``embed_ref`` would give them, random values). Three
ways to make its mel and waveform:

* teacher: the original model's decoder, ``--teacher-steps`` (10) Euler steps, each a CFG pair;
* student at 2 and at 1 steps: the same estimator turned into a MeanFlow student
  (:func:`cbx.distill.student.make_student`), one forward per step, no CFG.

Speed only: the student's weights are untrained, which does not change its cost. All three run
in one process on the same weights and inputs (the engine's batched path,
:mod:`cbx.engine.s3gen_batch`), each warmed up once; figures are medians over ``--repeats`` runs, interleaved.
S3Gen time = encoder + CFM + vocoder; the CFM column is what distillation shortens. The last
line is exactly ``student S3Gen speed-up vs teacher: 2 steps N.NNx, 1 step N.NNx``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cbx.errors import CbxError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=50, help="speech tokens to synthesize (25 = 1 s; default 50)")
    parser.add_argument("--ref-seconds", type=float, default=10.0, help="voice prompt length (default 10 s)")
    parser.add_argument("--teacher-steps", type=int, default=10, help="teacher CFM steps (upstream: 10)")
    parser.add_argument("--student-steps", type=int, nargs="+", default=[2, 1], help="student step counts (default 2 1)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (median)")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--model", default="full",
                        help="full: full-size random S3Gen (default) | tiny (smoke test) | any model source "
                             "(its S3Gen: random:original, a folder, a Hub id)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is steadier on a busy shared CPU)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(s3, n_tokens: int, ref_seconds: float, seed: int, device, dtype):
    g = torch.Generator().manual_seed(seed)
    n_prompt = max(1, int(round(ref_seconds * 25)))
    gen = {
        "prompt_token": torch.randint(0, 6561, (1, n_prompt), generator=g),
        "prompt_token_len": torch.tensor([n_prompt]),
        "prompt_feat": torch.randn(1, 2 * n_prompt, 80, generator=g).to(device, dtype),
        "prompt_feat_len": None,
        "embedding": torch.randn(1, 192, generator=g).to(device, dtype),
    }
    tokens = torch.randint(0, 6561, (n_tokens,), generator=g)
    return tokens, gen


@torch.inference_mode()
def _once(s3, estimator, tokens, gen, n_steps: int, cfg_rate: float, meanflow: bool, device) -> dict[str, float]:
    from cbx.engine import s3gen_batch as sb

    out = {}
    _sync(device)
    t0 = time.perf_counter()
    inp = sb.cfm_inputs(s3, [tokens.to(device)], [gen])
    _sync(device)
    t1 = time.perf_counter()
    noise = sb.cfm_noise(inp, [0], meanflow, dtype=inp.mu.dtype)
    mels = sb.solve_cfm(estimator, inp, noise, n_steps, cfg_rate, meanflow)
    _sync(device)
    t2 = time.perf_counter()
    sb.vocode(s3, [m.float() for m in sb.crop_mels(mels, inp)], seeds=[0])
    _sync(device)
    t3 = time.perf_counter()
    out.update(encoder=t1 - t0, cfm=t2 - t1, vocoder=t3 - t2, total=t3 - t0)
    return out


def run(args: argparse.Namespace) -> int:
    from cbx.distill.student import make_student
    from cbx.engine.model import build_s3gen

    if args.tokens < 1 or args.ref_seconds <= 0 or args.teacher_steps < 1 or args.repeats < 1:
        raise CbxError("--tokens, --teacher-steps and --repeats must be >= 1 and --ref-seconds > 0")
    if any(k < 1 for k in args.student_steps):
        raise CbxError(f"--student-steps: step counts must be >= 1, got {args.student_steps}")
    if args.threads is not None:
        if args.threads < 1:
            raise CbxError(f"--threads: expected a positive number, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        if args.model == "full":
            s3 = build_s3gen("original")
        elif args.model == "tiny":
            from cbx.engine.tiny_s3gen import build_tiny_s3gen

            s3 = build_tiny_s3gen(meanflow=False, seed=args.seed)
        else:
            from cbx.engine.model import load_model

            s3 = load_model(args.model).s3gen
            if getattr(s3, "meanflow", False):
                raise CbxError(f"--model {args.model}: its S3Gen is already a MeanFlow decoder (no CFG teacher to compare)")
    s3 = s3.to(device=device, dtype=dtype).eval()
    teacher = s3.flow.decoder.estimator
    student = make_student(teacher).eval()
    cfg_rate = float(s3.flow.decoder.inference_cfg_rate)
    tokens, gen = _inputs(s3, args.tokens, args.ref_seconds, args.seed, device, dtype)
    configs = [("teacher", args.teacher_steps, teacher, cfg_rate, False)] + [
        ("student", k, student, 0.0, True) for k in args.student_steps]

    n_params = sum(p.numel() for p in teacher.parameters())
    print(f"S3Gen {'full-size random' if args.model == 'full' else args.model}, estimator {n_params / 1e6:.1f}M params, "
          f"{device.type} {args.dtype}, threads {torch.get_num_threads()}; {args.tokens} tokens "
          f"({args.tokens / 25:.1f} s audio), {args.ref_seconds:g} s prompt; repeats {args.repeats}")
    for name, k, est, cfg, mf in configs:
        _once(s3, est, tokens, gen, 1, cfg, mf, device)  # warm-up
    # Repeats interleave the configurations, so a change of machine load hits all of them alike.
    runs: dict[tuple[str, int], list[dict[str, float]]] = {(c[0], c[1]): [] for c in configs}
    for _ in range(args.repeats):
        for name, k, est, cfg, mf in configs:
            runs[(name, k)].append(_once(s3, est, tokens, gen, k, cfg, mf, device))
    results = {key: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for key, rs in runs.items()}
    base = results[("teacher", args.teacher_steps)]
    print(f"{'decoder':<10}{'steps':>6}{'NFE':>5}{'encoder s':>11}{'CFM s':>9}{'vocoder s':>11}{'S3Gen s':>9}"
          f"{'CFM x':>8}{'S3Gen x':>9}")
    for (name, k), r in results.items():
        nfe = k * (2 if name == "teacher" and cfg_rate else 1)
        print(f"{name:<10}{k:>6}{nfe:>5}{r['encoder']:>11.3f}{r['cfm']:>9.3f}{r['vocoder']:>11.3f}{r['total']:>9.3f}"
              f"{base['cfm'] / r['cfm']:>8.2f}{base['total'] / r['total']:>9.2f}")
    parts = [f"{k} step{'s' if k != 1 else ''} {base['total'] / results[('student', k)]['total']:.2f}x"
             for k in args.student_steps]
    print("student S3Gen speed-up vs teacher: " + ", ".join(parts))
    return 0
