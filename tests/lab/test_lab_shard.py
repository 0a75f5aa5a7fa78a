"""Sharding with accelerate: 2 CPU processes (gloo) split synthesis and scoring of a run and
the merged folder equals a single-process run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import soundfile as sf

from cbx.lab.runner import Runner
from lab_fakes import FakeBackend

HERE = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import json, sys
    from cbx.lab.runner import Runner
    from cbx.lab.schema import load_experiments
    from cbx.lab.shard import from_environment
    from lab_fakes import FakeBackend

    shard = from_environment()
    be = FakeBackend(n_items=5)
    (exp,) = load_experiments(sys.argv[1])
    out = Runner(sys.argv[2], backend=be, shard=shard, progress=False).run(exp)
    report = {"rank": shard.rank, "world": shard.world, "ids": be.synthesized, "run": out.run_id}
    with open(f"{sys.argv[2]}.rank{shard.rank}.json", "w") as f:  # not stdout: ranks interleave
        json.dump(report, f)
    shard.close()
""")

EXP = """
name: sharded
steps: [{transform: lab_test_gain, params: {gain: 0.5}}]
synth: {batch_size: 2}
eval: {set: fake, warmup: 0}
"""


def _files(run_dir: Path) -> dict[str, object]:
    out = {}
    for p in sorted(run_dir.rglob("*")):
        rel = str(p.relative_to(run_dir))
        if p.suffix == ".wav":
            out[rel] = sf.read(p, dtype="float32")[0].tobytes()
        elif rel == "score/utterances.jsonl":
            out[rel] = [json.loads(x) for x in p.read_text().splitlines()]
        elif rel == "manifest.jsonl" or rel.startswith("synth/"):
            out[rel] = p.read_text()
    return out


def test_two_process_shards_merge_to_the_single_process_result(tmp_path):
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(EXP)
    script = tmp_path / "shard_main.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(exp_file), str(tmp_path / "multi")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"multi.rank{r}.json").read_text()) for r in range(2)]
    assert sorted(r["rank"] for r in reports) == [0, 1] and all(r["world"] == 2 for r in reports)
    # each process synthesized its own share (baseline + compressed), no utterance twice
    ids = [sorted(r["ids"]) for r in reports]
    assert set(ids[0]).isdisjoint(ids[1]) and len(ids[0]) + len(ids[1]) == 10

    from cbx.lab.schema import load_experiments

    (exp,) = load_experiments(exp_file)
    single = Runner(tmp_path / "single", backend=FakeBackend(n_items=5), progress=False).run(exp)
    multi_dir = tmp_path / "multi" / single.run_id
    assert reports[0]["run"] == single.run_id  # same experiment, same hardware: same run id
    a, b = _files(single.run_dir), _files(multi_dir)
    # peak memory and per-batch sizes differ by sharding; the audio, tokens and scores must not
    strip = lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k not in ("batch_size", "peak_mem_bytes")}, sort_keys=True)
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith("synth/"):
            assert strip(a[k]) == strip(b[k]), k
        else:
            assert a[k] == b[k], k
    agg_a = json.loads((single.run_dir / "score" / "aggregate.json").read_text())
    agg_b = json.loads((multi_dir / "score" / "aggregate.json").read_text())
    assert agg_b["metrics"] and agg_b["n_scored"] == 5
    assert agg_a["metrics"] and all(agg_b["metrics"][k]["value"] == v["value"] for k, v in agg_a["metrics"].items())
    rows_a = [json.loads(x) for x in (single.run_dir / "score" / "utterances.jsonl").read_text().splitlines()]
    vals = np.array([r["metrics"]["wer"] for r in rows_a])
    assert np.isclose(agg_b["metrics"]["wer"]["value"], vals.mean())
    rec = json.loads((multi_dir / "run.json").read_text())
    assert rec["status"] == "done"
