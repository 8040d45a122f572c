"""Several training processes on one machine: `train.num_procs N` launches them with torchrun.

The train stage, asked for N > 1 processes outside torchrun, starts `python -m torch.distributed.run
--standalone --nproc-per-node N` (rendezvous on loopback) with the stage's module as each process's entry (its
`__main__` calls `worker_main`); each process trains its share of every optimizer step (see
`batching.StepSampler`), gradients are all-reduced (gloo on CPU, NCCL on GPU) and rank 0 writes the output. On
CPU the cores are divided among the processes.
Under torchrun already (`lora-pipeline train --input dataset=DIR --out DIR` as a TrainJob runs it), the stage
trains in place and launches nothing.

The config reaches the processes as a file of its own (0600, removed afterwards): `train.env_vars` may hold
secrets, and command lines are visible to every user of the machine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from lora_pipeline.config import TrainConfig
from lora_pipeline.errors import StageError
from lora_pipeline.training.distributed import under_torchrun

log = logging.getLogger(__name__)
CONFIG_ENV = "LORA_PIPELINE_TRAIN_CONFIG"  # the train config, as JSON, handed to the torchrun workers


def resolve_num_procs(value: str) -> int:
    """`auto` = one per CUDA device (1 without CUDA), else the number given."""
    if value.strip() == "auto":
        import torch

        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    return int(value)


def maybe_launch(cfg: TrainConfig, dataset_dir: Path, out: Path, worker_module: str) -> Path | None:
    """Train in `num_procs` processes, each running `python -m worker_module` (whose `__main__` calls
    `worker_main`), and return `out`; None when this process should train itself."""
    procs = resolve_num_procs(cfg.num_procs)
    if procs <= 1 or under_torchrun():
        return None
    env = dict(os.environ)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "OMP_NUM_THREADS" not in env and not cfg.threads:
        # torchrun would set 1 thread per process; share the cores this process may use among them instead
        from lora_pipeline.training.cpu import cpu_threads

        env["OMP_NUM_THREADS"] = str(max(1, cpu_threads(0)[0] // procs))
    backend = "NCCL" if _cuda() else "gloo"
    log.info("train: launching %d processes (torchrun, %s)", procs, backend)
    # The config travels in the workers' environment, not in a file: it holds the env_vars' secrets, and a file
    # would outlive a killed run in the run directory.
    env[CONFIG_ENV] = json.dumps(dataclasses.asdict(cfg))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={procs}",
        "--module",
        worker_module,
        str(dataset_dir),
        str(out),
    ]
    proc = subprocess.Popen(command, env=env, preexec_fn=_stop_with_parent if sys.platform == "linux" else None)
    try:
        code = proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM: stop the processes too (torchrun passes it on)
        proc.terminate()
        proc.wait()
        raise
    if code != 0:
        raise StageError(f"{procs} training processes failed (exit {code}); their error is above", field="train")
    return out


def _stop_with_parent() -> None:
    """In the child, before torchrun starts: SIGTERM it when this process dies, even by kill -9, so that no
    orphaned training processes keep writing checkpoints that a rerun would resume from."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6").prctl(pr_set_pdeathsig, signal.SIGTERM)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def worker_main(train_adapter: Callable[[TrainConfig, Path, Path], Path], argv: list[str]) -> int:
    """One training process under torchrun (the train stage's `__main__`, so that nothing here imports the
    stage): the dataset directory and the output directory; the config is in the environment (CONFIG_ENV)."""
    from lora_pipeline.errors import LoraPipelineError
    from lora_pipeline.logs import apply_verbosity, setup_logging
    from lora_pipeline.redaction import remember_config, scrub

    dataset_dir, out = argv
    setup_logging()
    # one process speaks for all: the others say only what goes wrong
    apply_verbosity("INFO" if os.environ.get("RANK", "0") == "0" else "WARNING")
    config = os.environ.pop(CONFIG_ENV, None)  # popped: the worker's own subprocesses need not hold it
    if config is None:
        print(f"lora-pipeline: error: {CONFIG_ENV} is not set: a training worker is started by the train stage",
              file=sys.stderr)  # fmt: skip
        return 2
    cfg = TrainConfig(**json.loads(config))
    remember_config({"train": dataclasses.asdict(cfg)})  # this process's own lines are scrubbed as the CLI's are
    os.umask(0o077)  # as the CLI: checkpoints and the adapter are private
    try:
        train_adapter(cfg, Path(dataset_dir), Path(out))
    except LoraPipelineError as exc:
        print(f"lora-pipeline: error: {scrub(str(exc))}", file=sys.stderr)
        return 2
    return 0
