"""Heal a pruned T3 by distillation from the unpruned teacher (``cbx heal CONFIG.yaml``).

Why distillation and not plain fine-tuning: a pruned model's job is to behave like the model it
came from, and the teacher is there to say how (Minitron, SPADE heal with KD on a few percent
of the data). The data is the teacher's own: T3 samples speech tokens for real sentences in
real voices (:func:`cbx.compress.calibration.generate_sequences`, the same batched decode as
GPTQ's calibration), and both models are run teacher-forced over ``[conditioning | text |
speech]`` with the CFG pair (cond row, uncond row with text zeroed), as inference runs them.
The loss is

* ``kl_weight`` x KL(teacher || student) of the next-speech-token distributions (temperature
  ``temperature``) at every speech position of both rows, plus
* ``hidden_weight`` x the relative squared error between each student layer's output and the
  output of the last teacher layer of the span it stands for (:func:`matched_layers`: after
  depth pruning, a kept layer takes over the work of the dropped layers that followed it).

What trains is ``trainable`` (:func:`trainable_parameters`): by default the transformer and both
output heads (``layers_heads``); the token and position embeddings and the conditioning encoder
stay the teacher's. An embedding row learns only from sequences holding its token, so on a few
hundred sequences training it memorises them. Measured on the tiny model (depth 2 -> 1, 64
teacher sequences, 100 steps, held-out KL): all -44%, layers_heads -46%, layers only -39%.

The pruned student is the teacher with the config's ``prune`` steps applied (the registered
transforms, same parameters as in an experiment's ``steps``). Training uses the distill
trainer's machinery (:mod:`cbx.distill.train`): accelerate (device, mixed precision, state),
batches a pure function of (step, micro-batch, seed), checkpoints with the optimizer and
scheduler plus a settings fingerprint, resume from the newest. One process (one CPU or one GPU):
the student is driven through T3's submodules, not one wrapped forward call. The held-out metric is the
teacher-forced KL of T3's next-token distributions (both CFG rows) on sequences not trained on,
before and after healing: ``held-out KL to teacher: unhealed X -> healed Y (-Z%)``; the KL of
the CFG-combined logits (what the decoder samples from; CFG amplifies every difference) is
reported beside it.

The result, ``<out_dir>/healed``, is a compressed checkpoint (:mod:`cbx.compress.checkpoint`:
the pruned shapes in its manifest) that the ``healed_checkpoint`` transform loads in an
experiment's ``steps``.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from cbx.config import TrackingConfig, to_plain
from cbx.distill.config import (PruneStep, TeacherConfig, TrainConfig, load_training_config, settings_hash,
                                training_from_mapping, without_cadence)
from cbx.errors import CbxError

HEALED = "healed"
DATA_FILE = "heal_data.pt"
GEN_BATCH = 64  # rows per batched teacher decode when sampling the data


@dataclass(frozen=True)
class HealDataConfig:
    texts: int = 12  # training sentences (cbx.compress.calibration.CALIBRATION_TEXTS, from the start)
    heldout_texts: int = 4  # held-out sentences (from the end of the same list; never trained on)
    # What is held out: "sentences" (heldout_texts other sentences) or "samples" (new sequences the
    # teacher samples, other seeds, for the training sentences and voices: for models too small
    # to generalise across sentences from a few dozen, like the built-in tiny one)
    heldout: Literal["sentences", "samples"] = "sentences"
    voices: tuple[str, ...] = ("allison", "diane")  # builtin, offline voice names or audio files
    samples_per_text: int = 2  # training sequences sampled per (sentence, voice), each its own seed
    heldout_samples_per_text: int = 1  # held-out sequences per (held-out sentence, voice)
    max_speech_tokens: int = 150
    seed: int = 0

    def __post_init__(self):
        from cbx.compress.calibration import CALIBRATION_TEXTS

        n = len(CALIBRATION_TEXTS)
        if self.texts < 1 or self.heldout_texts < 1 or self.texts + self.heldout_texts > n:
            raise ValueError(f"data.texts + data.heldout_texts must be <= {n} with both >= 1, "
                             f"got {self.texts} + {self.heldout_texts}")
        if not self.voices:
            raise ValueError("data.voices must name at least one voice")
        if min(self.samples_per_text, self.heldout_samples_per_text, self.max_speech_tokens) < 1:
            raise ValueError("data.samples_per_text, data.heldout_samples_per_text and data.max_speech_tokens must be >= 1")


@dataclass(frozen=True)
class HealObjectiveConfig:
    kl_weight: float = 1.0
    hidden_weight: float = 1.0
    temperature: float = 1.0

    def __post_init__(self):
        if self.kl_weight < 0 or self.hidden_weight < 0 or self.kl_weight + self.hidden_weight == 0:
            raise ValueError("objective.kl_weight and objective.hidden_weight must be >= 0, not both 0")
        if not self.temperature > 0:
            raise ValueError(f"objective.temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class HealConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    prune: tuple[PruneStep, ...] = ()
    data: HealDataConfig = field(default_factory=HealDataConfig)
    objective: HealObjectiveConfig = field(default_factory=HealObjectiveConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/heal", batch_size=4, lr=1e-4))
    # what trains (trainable_parameters): all | layers_heads | layers
    trainable: Literal["all", "layers_heads", "layers"] = "layers_heads"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def resolved(self) -> dict[str, Any]:
        return to_plain(self)

    def training_fingerprint(self) -> str:
        d = without_cadence(self.resolved())
        d["train"].pop("max_steps")
        return settings_hash(d)


def from_dict(data: dict[str, Any], where: str = "") -> HealConfig:
    cfg = training_from_mapping(HealConfig, data, where)
    if not cfg.prune:
        raise CbxError(f"{where + ': ' if where else ''}prune: list at least one pruning step (e.g. prune_depth)")
    from cbx.compress.registry import build_config

    for i, st in enumerate(cfg.prune):
        build_config(st.transform, st.params, f"prune[{i}].params")
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> HealConfig:
    return load_training_config(path, "teacher, prune, data, objective, train, tracking", from_dict, overrides)


def estimate_seconds(cfg: HealConfig, device: str) -> float | None:
    """Rough wall time of a healing run: measured for the built-in tiny model on this project's
    2-core CPU (experiments/distill-heal-demo.yaml; sampling ~0.05 s per speech token and
    row-batch, training ~0.6 ms per speech token of a teacher+student step); None for the
    full-size models (no measurement to stand on)."""
    if not str(cfg.teacher.model).startswith("tiny"):
        return None
    d, t = cfg.data, cfg.train
    rows = len(d.voices) * (d.texts * d.samples_per_text + d.heldout_texts * d.heldout_samples_per_text)
    sample = -(-rows // GEN_BATCH) * d.max_speech_tokens * 0.05 + rows * d.max_speech_tokens * 0.01
    train = t.max_steps * t.batch_size * t.grad_accum * d.max_speech_tokens * 6e-4
    s = 5.0 + sample + train
    return s / 10 if str(device).startswith("cuda") else s


# ----------------------------------------------------------------------------- data


def _texts(cfg: HealConfig) -> tuple[list[str], list[str]]:
    from cbx.compress.calibration import CALIBRATION_TEXTS

    return list(CALIBRATION_TEXTS[: cfg.data.texts]), list(CALIBRATION_TEXTS[-cfg.data.heldout_texts:])


def make_data(teacher, cfg: HealConfig) -> dict[str, list[dict]]:
    """Teacher-sampled sequences: ``{"train": [...], "heldout": [...]}``, each item
    ``{"text": LongTensor, "speech": LongTensor (start token first), "voice": index}``.

    Every (sentence, voice, sample) is one row of the engine's batched decoder (``GEN_BATCH``
    rows per call), each with its own seed: held-out rows never share a seed with training rows."""
    from cbx.compress.calibration import calibration_voices, generate_sequences

    voices = calibration_voices(teacher, cfg.data.voices)
    out: dict[str, list[dict]] = {}
    train_texts, held_texts = _texts(cfg)
    if cfg.data.heldout == "samples":
        held_texts = train_texts
    d = cfg.data
    for split, texts, base, per in (("train", train_texts, 0, d.samples_per_text),
                                    ("heldout", held_texts, 1_000_000, d.heldout_samples_per_text)):
        # row r: text (r // V) % T, voice r % V (generate_sequences cycles the voices over its
        # texts, so each chunk starts at a multiple of V); seed d.seed + base + r
        rows = [t for _ in range(per) for t in texts for _ in voices]
        step = max(1, GEN_BATCH // len(voices)) * len(voices)
        items = []
        for a in range(0, len(rows), step):
            seqs = generate_sequences(teacher, rows[a:a + step], d.max_speech_tokens, d.seed + base + a, voices)
            for j, s in enumerate(seqs):
                items.append({"text": s.text_tokens[0], "speech": s.speech_tokens[0], "voice": j % len(voices)})
        out[split] = items
    return out


# ----------------------------------------------------------------------------- forward and loss


def _cond(model, conds, device):
    from cbx.compress.calibration import _t3_cond

    return _t3_cond(model, device, conds)


def forward(model, item: dict, conds, capture: list[int] | None, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Teacher-forced pass of T3 over one sequence (CFG pair): speech logits (2, T, V) and the
    outputs of the layers listed in ``capture``."""
    t3 = model.t3
    layers = t3.tfmr.layers
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for i in capture or []:
        handles.append(layers[i].register_forward_hook(
            lambda mod, args, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, (tuple, list)) else out)))
    try:
        tt = item["text"].to(device).view(1, -1).expand(2, -1)
        st = item["speech"].to(device).view(1, -1).expand(2, -1)
        embeds, len_cond = t3.prepare_input_embeds(t3_cond=_cond(model, conds, device), text_tokens=tt,
                                                   speech_tokens=st, cfg_weight=0.5)
        hidden = t3.tfmr(inputs_embeds=embeds, use_cache=False).last_hidden_state
        logits = t3.speech_head(hidden[:, len_cond + tt.shape[1]:])
    finally:
        for h in handles:
            h.remove()
    return logits.float(), [captured[i] for i in capture or []]


def kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(softmax(t/T) || softmax(s/T)) (T^2-scaled, Hinton's convention)."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


def hidden_loss(teacher_h: list[torch.Tensor], student_h: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ||s - t||^2 / ||t||^2."""
    terms = [(s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)
             for t, s in zip(teacher_h, student_h)]
    return torch.stack(terms).mean()


def cfg_logits(logits: torch.Tensor, w: float = 0.5) -> torch.Tensor:
    return logits[0] + w * (logits[0] - logits[1])


@torch.no_grad()
def heldout_kl(teacher, student, items: list[dict], voices: list, device, cfg_weight: float | None = None) -> float:
    """Mean teacher-forced KL(teacher || student) of T3's next-token distributions at every
    speech position of both CFG rows (``cfg_weight`` None); with ``cfg_weight``, of the
    CFG-combined logits the decoder samples from (which amplifies any difference)."""
    tot, n = 0.0, 0
    for it in items:
        t_log, _ = forward(teacher, it, voices[it["voice"]], None, device)
        s_log, _ = forward(student, it, voices[it["voice"]], None, device)
        if cfg_weight is None:
            tot += float(kl(t_log, s_log))
        else:
            tot += float(kl(cfg_logits(t_log, cfg_weight), cfg_logits(s_log, cfg_weight)))
        n += 1
    return tot / max(n, 1)


def matched_layers(kept: list[int], n_teacher: int) -> list[int]:
    """The teacher layer whose output student layer ``i`` is matched to: the last teacher layer
    of the span it now stands for (``kept[i+1] - 1``; the teacher's last layer for the student's
    last). Matching kept layer ``i`` to its own teacher output instead would pin it to what it
    already computes and forbid it to take over the dropped layers' work."""
    return [kept[i + 1] - 1 if i + 1 < len(kept) else n_teacher - 1 for i in range(len(kept))]


def _kept_layers(student) -> list[int]:
    rec = (student.meta.get("pruned") or {}).get("t3") or {}
    return list(rec.get("layers") or range(len(student.t3.tfmr.layers)))


def trainable_parameters(t3, which: str) -> list[torch.nn.Parameter]:
    """``all``: every T3 parameter. ``layers_heads``: the transformer (layers and final norm) and
    both output heads; the token and position embeddings and the conditioning encoder stay the
    teacher's (an embedding row only learns from sequences that hold its token, so training it
    on a few hundred sequences memorises them). ``layers``: the transformer only."""
    t3.requires_grad_(which == "all")
    if which != "all":
        t3.tfmr.requires_grad_(True)
    if which == "layers_heads":
        t3.speech_head.requires_grad_(True)
        t3.text_head.requires_grad_(True)
    return [p for p in t3.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- training


def heal(cfg: HealConfig, *, stop_after: int | None = None, progress: bool = True, teacher=None) -> dict[str, Any]:
    """Prune a copy of the teacher, heal it (resuming from the newest checkpoint), evaluate,
    write ``<out_dir>/healed``. Returns a summary dict."""
    from cbx.compress.calibration import calibration_voices
    from cbx.compress.checkpoint import save_compressed
    from cbx.compress.registry import apply_transforms, build_config
    from cbx.distill.train import (METRICS, _append_jsonl, _lr_lambda, resumable_checkpoint, resume, run_steps,
                                   start_accelerator)

    t_cfg = cfg.train
    out_dir = Path(t_cfg.out_dir)
    fingerprint = cfg.training_fingerprint()
    checkpoint = resumable_checkpoint(t_cfg, out_dir, fingerprint, "healing")
    # One start for every trainer (W&B: one project per results folder, as cbx distill and runs)
    accelerator = start_accelerator(cfg, t_cfg, out_dir)
    main = accelerator.is_main_process
    device = accelerator.device

    if teacher is None:
        from cbx.engine.model import load_model

        teacher = load_model(cfg.teacher.model)
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    if teacher.t3.is_gpt:
        raise CbxError(f"teacher.model {cfg.teacher.model}: healing supports the Llama T3 (original, multilingual)")

    # Teacher data: made once, kept in the output folder (a resumed run reads it back).
    data_path = out_dir / DATA_FILE
    if data_path.is_file():
        data = torch.load(data_path)
        if data.get("fingerprint") != fingerprint:
            raise CbxError(f"{data_path}: made with other settings; use another train.out_dir")
    else:
        data = {"fingerprint": fingerprint, **make_data(teacher, cfg)}
        if main:
            tmp = data_path.with_suffix(".tmp")
            torch.save(data, tmp)
            tmp.replace(data_path)
    voices = calibration_voices(teacher, cfg.data.voices)
    train_items, held_items = data["train"], data["heldout"]

    torch.manual_seed(t_cfg.seed)
    student = copy.deepcopy(teacher)
    student = apply_transforms(student, [(s.transform, build_config(s.transform, s.params, f"prune[{i}].params"))
                                         for i, s in enumerate(cfg.prune)])
    if student.t3.is_gpt or not (student.meta.get("pruned") or {}).get("t3"):
        raise CbxError("prune: the steps must prune T3 (prune_depth part t3 and/or prune_width) to heal it")
    s_layers = list(range(len(student.t3.tfmr.layers)))
    t_layers = matched_layers(_kept_layers(student), len(teacher.t3.tfmr.layers))
    student.requires_grad_(False)
    params = trainable_parameters(student.t3, cfg.trainable)
    optimizer = torch.optim.AdamW(params, lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    # The student's T3 is driven through its submodules (prepare_input_embeds, tfmr, heads), not
    # one forward call, so it is not wrapped for data parallelism: healing runs as one process
    # (one CPU or GPU); accelerate places it and saves/restores it with the optimizer state.
    student.to(device)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    accelerator.register_for_checkpointing(student.t3)
    if accelerator.num_processes > 1:
        raise CbxError("cbx heal runs as one process (one CPU or GPU); launch it without accelerate's multi-process mode")

    start = resume(accelerator, checkpoint, "cbx heal")

    metrics_path = out_dir / METRICS
    unhealed = unhealed_cfg = None
    state_file = out_dir / "unhealed.json"
    if main:
        if state_file.is_file():
            rec = json.loads(state_file.read_text())
        else:
            probe = student
            if start > 0:  # resumed without the record (interrupted before it was written): prune again
                probe = apply_transforms(copy.deepcopy(teacher), [(s.transform, build_config(s.transform, s.params))
                                                                  for s in cfg.prune])
            rec = {"heldout_kl": heldout_kl(teacher, probe, held_items, voices, device),
                   "heldout_kl_cfg": heldout_kl(teacher, probe, held_items, voices, device, cfg_weight=0.5)}
            del probe
            state_file.write_text(json.dumps(rec) + "\n")
        unhealed, unhealed_cfg = rec["heldout_kl"], rec["heldout_kl_cfg"]

    ocfg = cfg.objective

    def micro_step(step: int, micro: int, rows: list[int]) -> float:
        loss_sum = 0.0
        for j in rows:
            it = train_items[j]
            with torch.no_grad():
                t_log, t_h = forward(teacher, it, voices[it["voice"]], t_layers, device)
            with accelerator.autocast():
                s_log, s_h = forward(student, it, voices[it["voice"]], s_layers, device)
                loss = ocfg.kl_weight * kl(t_log, s_log, ocfg.temperature)
                if ocfg.hidden_weight:
                    loss = loss + ocfg.hidden_weight * hidden_loss(t_h, s_h)
            accelerator.backward(loss / (len(rows) * t_cfg.grad_accum))
            loss_sum += float(loss.detach())
        return loss_sum / len(rows)

    def eval_line(step: int) -> str:
        student.t3.eval()
        ev = heldout_kl(teacher, student, held_items, voices, device)
        student.t3.train()
        _append_jsonl(metrics_path, {"step": step, "eval/heldout_kl": ev})
        return f"step {step}: held-out KL {ev:.4f} (unhealed {unhealed:.4f})"

    student.t3.train()
    end = run_steps(accelerator, optimizer, scheduler, params, t_cfg, out_dir, fingerprint, start=start,
                    stop_after=stop_after, n_rows=len(train_items), micro_step=micro_step, evaluate_line=eval_line,
                    desc="heal", progress=progress)
    summary: dict[str, Any] = {"step": end, "out_dir": str(out_dir), "finished": end == t_cfg.max_steps}
    if end < t_cfg.max_steps:
        accelerator.end_training()
        return summary
    if main:
        student.t3.eval()
        student.requires_grad_(False)
        healed = heldout_kl(teacher, student, held_items, voices, device)
        healed_cfg = heldout_kl(teacher, student, held_items, voices, device, cfg_weight=0.5)
        drop = 100.0 * (1.0 - healed / unhealed) if unhealed > 0 else 0.0
        line = f"held-out KL to teacher: unhealed {unhealed:.4f} -> healed {healed:.4f} ({-drop:+.0f}%)"
        student.meta["healed"] = {"teacher": cfg.teacher.model, "steps": end, "heldout_kl": healed,
                                  "heldout_kl_unhealed": unhealed, "heldout_kl_cfg": healed_cfg,
                                  "heldout_kl_cfg_unhealed": unhealed_cfg, "fingerprint": fingerprint}
        student.to("cpu")
        final = out_dir / HEALED
        if final.exists():
            shutil.rmtree(final)
        save_compressed(student, final)
        cfg_line = f"held-out KL of CFG-combined logits: unhealed {unhealed_cfg:.4f} -> healed {healed_cfg:.4f}"
        (out_dir / "eval.json").write_text(json.dumps({"step": end, **{k: v for k, v in student.meta["healed"].items()
                                                                        if k.startswith("heldout")},
                                                       "line": line, "cfg_line": cfg_line}, indent=2) + "\n")
        print(cfg_line)
        print(line, flush=True)
        summary.update(heldout_kl=healed, heldout_kl_unhealed=unhealed, heldout_kl_cfg=healed_cfg,
                       heldout_kl_cfg_unhealed=unhealed_cfg, line=line, healed_dir=str(final))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
