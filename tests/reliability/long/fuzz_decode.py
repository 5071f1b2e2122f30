"""S2 long tier (not collected by pytest):
``python -m tests.reliability.long.fuzz_decode [--seconds S | --runs N]``.

Coverage-guided fuzzing (atheris/libFuzzer; ``pip install -e .[soak]``) of the image decode wrapper
``service.engine.images.Preprocessor``, seeded with the S1 corpus (tests/reliability/corpus.py). The target
(tests/reliability/long/decode_target.py) runs in a child process; this runner writes the seed corpus,
bounds the run (``-max_total_time`` / ``-runs``, plus a wall-clock kill), parses libFuzzer's statistics and
prints one JSON summary line: executions, coverage (``cov``: instrumented Python edges of Pillow and the
wrapper) and features (``ft``), corpus size, slowest input (fastest of up to 3 timings), ``retimed`` (first
timings over 2 s that were retried), crashes and slow inputs (saved under the work directory's artifacts/).
Exit status non-zero when a crash or a slow input (> 2 s) was found, or the fuzzer did not finish.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.reliability import corpus

ROOT = Path(__file__).resolve().parents[3]
PULSE = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)")
DONE = re.compile(r"Done (\d+) runs in (\d+) second")
SLOWEST = re.compile(r"^SLOWEST (\S+)s len=(\d+)")
RETIMED = re.compile(r"^RETIMED ")


def write_seeds(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    for case in corpus.image_cases(flips_per_format=5, cuts_per_format=5):
        (directory / hashlib.sha256(case.data).hexdigest()[:16]).write_bytes(case.data)
        n += 1
    return n


def parse(log: str) -> dict[str, object]:
    out: dict[str, object] = {}
    retimed = 0
    for line in log.splitlines():
        if m := PULSE.match(line):
            out.update(execs=int(m[1]), cov=int(m[2]), ft=int(m[3]), corpus=int(m[4]), corpus_size=m[5])
        elif m := DONE.search(line):
            out.update(execs=int(m[1]), seconds=int(m[2]), done=True)
        elif m := SLOWEST.match(line):
            out.update(slowest_s=float(m[1]), slowest_len=int(m[2]))
        elif RETIMED.match(line):
            retimed += 1
        elif line.startswith("stat::"):
            key, _, value = line[len("stat::") :].partition(":")
            out[f"stat_{key.strip()}"] = value.strip()
    out["retimed"] = retimed  # first timings over the limit, retried (the property uses the fastest)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--seconds", type=int, default=300, help="libFuzzer -max_total_time (default 300)")
    group.add_argument("--runs", type=int, help="libFuzzer -runs instead of a time limit")
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--workdir", type=Path, help="corpus, artifacts and log (default: a new temp dir)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ssf-fuzz-decode-"))
    seeds, found, artifacts = work / "seeds", work / "corpus", work / "artifacts"
    n_seeds = write_seeds(seeds)
    found.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    limit = [f"-runs={args.runs}"] if args.runs else [f"-max_total_time={args.seconds}"]
    cmd = [sys.executable, "-m", "tests.reliability.long.decode_target", str(found), str(seeds), *limit]
    cmd += [f"-max_len={args.max_len}", "-timeout=20", "-rss_limit_mb=4096", "-print_final_stats=1"]
    cmd += [f"-artifact_prefix={artifacts}/", "-print_pcs=0"]
    wall_limit = (args.seconds if not args.runs else 3600) + 300
    log_path = work / "fuzz.log"
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        env = {**os.environ, "SSF_FUZZ_ARTIFACTS": str(artifacts)}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            rc = proc.wait(timeout=wall_limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(timeout=30)
    stats = parse(log_path.read_text(errors="replace"))
    crashes = sorted(p.name for p in artifacts.iterdir())
    summary = {
        "seeds": n_seeds,
        "rc": rc,
        "wall_s": round(time.monotonic() - t0, 1),
        **stats,
        "corpus_files": len(list(found.iterdir())),
        "crashes": crashes,
        "workdir": str(work),
    }
    print(json.dumps(summary))
    ok = rc == 0 and not crashes and bool(stats.get("done"))
    if not ok:
        print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
