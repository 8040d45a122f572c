"""The demo's time outside its training loop, against the imports it cannot avoid.

Runs `lora-pipeline demo` (a fresh run directory and registry each time; the demo's model and data are built
once, before the first run) and splits each run's wall time into:
- the training loop: the Trainer's `train()`, in-training evals included (metrics.json `train_seconds`);
- CLI: interpreter start and exit, argument parsing, pre-flight, the dataset stage, the run report;
- the train stage outside the loop: torch / transformers / peft imports, model load, tokenizing, saving;
- the eval stage (lm-eval, base and tuned model);
- the rest: the register stage.
The baseline, run interleaved with the demo: a bare interpreter importing what any training run here needs
(torch, transformers, peft and the Trainer), the floor of "outside the loop" for a run in one process.

It ends with `outside the training loop: X.X%` (medians) for tools to read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# os._exit, as the CLI ends: a normal interpreter exit after these imports takes another ~1.3 s
IMPORTS = "import torch, transformers, peft, transformers.trainer, os; os._exit(0)"
PARTS = ("wall", "loop", "outside", "CLI", "train setup + save", "eval", "rest", "imports alone")


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def demo_run(cli: Path, work: Path, env: dict[str, str]) -> dict[str, float]:
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    wall = timed([str(cli), "demo", "-o", str(run_dir)], {**env, "LORA_PIPELINE_REGISTRY": str(work / "r.db")})
    stages = {name: s["seconds"] for name, s in json.loads((run_dir / "run.json").read_text())["stages"].items()}
    loop = json.loads((run_dir / "train" / "metrics.json").read_text())["train_seconds"]
    (work / "r.db").unlink(missing_ok=True)
    # the stages' clocks leave out the interpreter, the CLI's pre-flight and the run report
    outside_stages = wall - sum(stages.values())
    return {
        "wall": wall,
        "loop": loop,
        "outside": wall - loop,
        "CLI": outside_stages + stages["dataset"],
        "train setup + save": stages["train"] - loop,
        "eval": stages["eval"],
        "rest": stages["register"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="demo runs, each followed by the baseline (3)")
    args = parser.parse_args()
    cli = Path(sys.executable).parent / "lora-pipeline"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(
            [str(cli), "demo", "-o", str(work / "warm")],
            env={**env, "LORA_PIPELINE_REGISTRY": str(work / "w.db")},
            capture_output=True,
            check=True,
        )  # builds the demo's assets, warms the page cache
        runs = []
        for _ in range(args.repeats):
            run = demo_run(cli, work, env)
            run["imports alone"] = timed([sys.executable, "-c", IMPORTS], env)
            runs.append(run)
            print("  ".join(f"{k} {run[k]:.2f}s" for k in PARTS), flush=True)
    median = {k: statistics.median(r[k] for r in runs) for k in PARTS}
    print(f"\nmedians of {args.repeats} runs (seconds):")
    for k in PARTS:
        share = f"{100 * median[k] / median['wall']:5.1f}% of wall" if k not in ("wall", "imports alone") else ""
        print(f"  {k:<20}{median[k]:7.2f}  {share}")
    print(f"outside the training loop: {100 * median['outside'] / median['wall']:.1f}%")
    print(f"imports alone: {100 * median['imports alone'] / median['wall']:.1f}% of the demo's wall")
    print(
        f"a 10% share needs a training loop of {9 * median['outside']:.0f} s with today's time outside it, "
        f"{9 * median['imports alone']:.0f} s with nothing outside it but the imports"
    )


if __name__ == "__main__":
    main()
