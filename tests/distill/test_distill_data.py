"""Teacher data: shards that `datasets` reads, deterministic rows, resume, and refusal to mix teachers."""

from __future__ import annotations

import shutil

import pytest
import torch

from cbx.distill.config import from_dict
from cbx.distill.data import TeacherExamples, record_teacher_data
from cbx.distill.flow import masked_l1, teacher_solve
from cbx.errors import CbxError


def _cfg(tmp_path, **data):
    d = {"voices": ["synthetic"], "n_train": 5, "n_heldout": 2, "shard_size": 3, "batch_size": 4,
         "min_tokens": 4, "max_tokens": 7, "prompt_seconds": 0.4, "dir": str(tmp_path / "data"), **data}
    return from_dict({"teacher": {"model": "tiny"}, "data": d, "train": {"out_dir": str(tmp_path)}})


def test_record_read_resume_and_teacher_check(tiny_model, tmp_path):
    import datasets

    cfg = _cfg(tmp_path)
    root = record_teacher_data(cfg, tiny_model, progress=False)
    shards = sorted((root / "train").glob("shard-*"))
    assert [p.name for p in shards] == ["shard-00000", "shard-00001"]
    first = datasets.load_from_disk(str(shards[0]))  # plain `datasets` reads a shard
    assert len(first) == 3 and {"mu", "noise", "target", "states", "spks"} <= set(first.column_names)

    ex = TeacherExamples(root, "train")
    assert len(ex) == 5 and [int(i) for i in ex.ds["index"]] == [0, 1, 2, 3, 4]
    b = ex.batch([0, 3, 4])
    assert b.states.shape[:2] == (11, 3) and torch.equal(b.states[0], b.noise) and torch.equal(b.states[-1], b.target)
    assert torch.all(b.inputs.prompt_lens == 20)  # 0.4 s prompt = 20 mel frames
    # the recorded endpoint is what the teacher makes from the recorded inputs and noise
    x = teacher_solve(tiny_model.s3gen.flow.decoder.estimator, b.inputs, b.noise, 10, 0.7)
    assert masked_l1(x, b.target, b.inputs.mask).max() < 1e-4
    assert masked_l1(b.noise, b.target, b.inputs.out_mask).min() > 1e-3

    # resume: a lost shard is rewritten identically, the others are left alone
    def rows(path):
        return [{k: torch.as_tensor(v) for k, v in r.items()} for r in datasets.load_from_disk(str(path)).with_format("torch")]

    before = rows(shards[1])
    mtime0 = (shards[0] / "state.json").stat().st_mtime_ns
    shutil.rmtree(shards[1])
    record_teacher_data(cfg, tiny_model, progress=False)
    after = rows(shards[1])
    assert len(after) == len(before) == 2
    for ra, rb in zip(after, before):
        for k in rb:
            assert torch.equal(ra[k], rb[k]), k
    assert (shards[0] / "state.json").stat().st_mtime_ns == mtime0

    # another teacher or other settings never write into this folder
    with pytest.raises(CbxError, match="other settings or another teacher"):
        record_teacher_data(_cfg(tmp_path, max_tokens=8), tiny_model, progress=False)


def test_unknown_voice_is_a_clear_error(tiny_model, tmp_path):
    cfg = _cfg(tmp_path, voices=["no-such-voice"])
    with pytest.raises(CbxError, match="no-such-voice"):
        record_teacher_data(cfg, tiny_model, progress=False)


def test_tokens_from_real_speech_and_real_voice_prompts(tiny_model, tmp_path):
    """`tokens: audio` cuts token windows from real recorded clips tokenized by the model itself."""
    from cbx.distill.data import _audio_token_source, example_plan
    from cbx.eval import assets

    try:
        assets.voice_prompt("allison")
        clips = _audio_token_source(tiny_model, 2)
    except CbxError as e:  # the offline speech packages are not installed here
        pytest.skip(str(e))
    cfg = _cfg(tmp_path, voices=["allison"], tokens="audio", audio_clips=2, n_train=2, n_heldout=1, min_tokens=5,
               max_tokens=5, trajectory=False)
    tokens, voice = example_plan(cfg, 1, clips)
    src = clips[1]
    assert voice == 0 and tokens.numel() == 5
    assert any(torch.equal(src[i : i + 5], tokens) for i in range(src.numel() - 4))  # a window of the clip
    root = record_teacher_data(cfg, tiny_model, progress=False)
    ex = TeacherExamples(root, "train")
    assert len(ex) == 2 and not ex.has_states
    assert list(ex.ds[1]["tokens"]) == tokens.tolist()
