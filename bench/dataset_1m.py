"""Dataset stage on N short chat rows (default 1,000,000): rows/s and peak RSS.

    .venv/bin/python bench/dataset_1m.py [N] [--format jsonl|json|parquet]

Peak RSS is the process's high-water mark (ru_maxrss); the data file is written by a child process, and the
baseline is taken after imports, so the difference is what the stage itself held at most.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

from lora_pipeline.config import DatasetConfig
from lora_pipeline.stages.dataset import prepare_dataset


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_rows(path: Path, n: int, fmt: str) -> None:
    if fmt in ("jsonl", "json"):  # json: one array of the same rows, one a line
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("[\n" if fmt == "json" else "")
            for i in range(n):
                fh.write(
                    f'{{"messages": [{{"role": "user", "content": "What is {i} plus {i}?"}}, '
                    f'{{"role": "assistant", "content": "{2 * i}"}}]}}'
                )
                fh.write(",\n" if fmt == "json" and i < n - 1 else "\n")
            fh.write("]\n" if fmt == "json" else "")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([("instruction", pa.string()), ("output", pa.string())])) as writer:
        for start in range(0, n, 100_000):
            ids = range(start, min(n, start + 100_000))
            writer.write_table(
                pa.table({"instruction": [f"What is {i} plus {i}?" for i in ids], "output": [str(2 * i) for i in ids]})
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", type=int, nargs="?", default=1_000_000)
    parser.add_argument("--format", choices=("jsonl", "json", "parquet"), default="jsonl")
    args = parser.parse_args()
    baseline = rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"rows.{args.format}"
        # In a child process, so that the peak RSS below is the stage's alone.
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(write_rows, data, args.n, args.format).result()
        size = data.stat().st_size
        start = time.perf_counter()
        prepare_dataset(DatasetConfig(data_uri=str(data)), Path(tmp) / "ds")
        seconds = time.perf_counter() - start
    print(
        f"{args.n} rows ({args.format}, {size / 2**20:.0f} MiB): {seconds:.1f} s, {args.n / seconds:,.0f} rows/s; "
        f"peak RSS {rss_mib():.0f} MiB (baseline after imports {baseline:.0f} MiB)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
