"""The report at scale: build time and file size for a synthetic run of 10,000 proposals.

    python bench/report.py [--problems 2500] [--attempts 4] [--continuations 4] [--step-chars 160]

The run directory is written by the project's own writers (tests/synthetic_run.py): `--problems` ×
`--attempts` failed attempts of 12 steps, one proposal each (a quarter rejected), an intervention and an
original-step prefix with `--continuations` continuations of ~1,200 characters each. Printed: the time
`intgen report` takes to build the page (this process's wall and CPU time) and the page's size.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from intgen.report import write_report  # noqa: E402

from synthetic_run import write_synthetic_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=2500)
    parser.add_argument("--attempts", type=int, default=4)
    parser.add_argument("--continuations", type=int, default=4)
    parser.add_argument("--step-chars", type=int, default=160)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="intgen-report-")) / "run"
    started = time.monotonic()
    run = write_synthetic_run(folder, args.problems, args.attempts, args.continuations, step_chars=args.step_chars)
    proposals = run.table("proposals").height
    print(f"synthetic run: {proposals} proposals, {run.table('continuations').height} continuations, "
          f"{sum(p.stat().st_size for p in folder.rglob('*.parquet')) / 1e6:.1f} MB of parquet "
          f"(written in {time.monotonic() - started:.1f} s)", flush=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    started = time.monotonic()
    page = write_report([folder])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"intgen report: {time.monotonic() - started:.1f} s wall, {usage.ru_utime + usage.ru_stime - cpu:.1f} s CPU; "
          f"{page.stat().st_size / 1e6:.1f} MB ({page})")


if __name__ == "__main__":
    main()
