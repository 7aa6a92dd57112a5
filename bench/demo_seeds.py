"""The demo's verdict over several demo seeds: `autointerp run` on examples/demo.toml with
each set's own training seeds, data order, queued latents and scoring seed, one after
another, each in a fresh folder and SQLite store.

    python -m bench.demo_seeds [--sets 5] [--first 0] [--out runs/demo-seeds]

Set i trains seeds 3i, 3i+1 and 3i+2 on data order i, and queues and scores with seed i
(set 0 is `make demo` itself). Printed per set: wall time, shared fraction, and for every
explainer/scorer pair of the study's campaign and of its survey: the shuffled control (own
- shuffled explanation score, CI), whether the pair passes it, and for a pair that does,
shared - seed-specific over match groups (CI, Holm-adjusted p). A set reaches a verdict
when at least one pair passes its control and has that comparison. The statistics are the
report's own, untouched.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from service.config import get_settings
from service.report import ReportResult, make_report
from service.report.report import ScorerSection
from service.store.engine import open_store
from service.store.models import Campaign
from service.study import load_study

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.toml"
SEEDS_PER_SET = 3


def set_study(index: int, folder: Path) -> Path:
    """Write demo.toml for set `index` into `folder`; its path."""
    text = DEMO.read_text()
    seeds = ", ".join(str(SEEDS_PER_SET * index + n) for n in range(SEEDS_PER_SET))
    replacements = [
        (r'^name = "demo"$', f'name = "demo-{index}"'),
        (r'^out = "\.\./runs/demo"$', 'out = "out"'),
        (r"^seeds = \[0, 1, 2\]$", f"seeds = [{seeds}]\ndata_seed = {index}"),
        (r"^\[queue\]$", f"[queue]\nseed = {index}"),
        (r"^\[score\.job\]$", f"[score.job]\nseed = {index}"),
        (r'^html = "\.\./runs/demo/report\.html"$', 'html = "out/report.html"'),
    ]
    for pattern, replacement in replacements:
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        if count != 1:
            raise SystemExit(f"{DEMO} no longer has one line matching {pattern!r}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "demo.toml"
    path.write_text(text)
    return path


def pair_line(section: ScorerSection) -> str:
    name = f"{section.explainer} / {section.scorer}"
    control = section.control
    if control is None or control.gap.mean is None:
        return f"    {name}: no shuffled control"
    gap = control.gap
    line = (
        f"    {name} (n {section.scored.n}): control gap {gap.mean:+.3f} "
        f"[{gap.ci_low or 0:+.3f}, {gap.ci_high or 0:+.3f}] -> "
        f"{'passes' if section.informative else 'fails'}"
    )
    test = section.by_match_group
    if section.informative and test is not None and test.difference is not None:
        line += (
            f"; shared - specific {test.difference:+.3f} [{test.ci_low or 0:+.3f}, "
            f"{test.ci_high or 0:+.3f}] over {test.n_units} match groups, p "
            f"{_number(test.p_value)}, Holm {_number(test.p_holm)}"
        )
    return line


def _number(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3g}"


def verdict_pairs(results: list[ReportResult]) -> list[str]:
    """The pairs that pass their control and have the shared vs seed-specific test."""
    return [
        f"{section.explainer}/{section.scorer}"
        for result in results
        for group in result.report.hookpoints
        for section in group.scorers
        if section.informative and section.by_match_group is not None
    ]


def run_set(index: int, out: Path) -> tuple[float, bool]:
    folder = out / f"set-{index}"
    study_path = set_study(index, folder)
    url = f"sqlite:///{folder / 'store.db'}"
    autointerp = str(Path(sys.executable).with_name("autointerp"))
    started = time.monotonic()
    done = subprocess.run(
        [autointerp, "run", str(study_path)],
        env={**os.environ, "AUTOINTERP_DB": url},
        capture_output=True,
        text=True,
    )
    seconds = time.monotonic() - started
    (folder / "run.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        print(f"set {index}: failed after {seconds:.0f} s:\n{done.stderr[-2000:]}", flush=True)
        return seconds, False
    study = load_study(study_path)
    store = open_store(url)
    try:
        with store.read_session() as session:
            campaigns = session.scalars(select(Campaign.id).order_by(Campaign.id)).all()
        results = [
            make_report(store, study.name, study.report, campaign=campaign)
            for campaign in campaigns
        ]
    finally:
        store.dispose()
    pairs = results[0].report.hookpoints[0].pairs
    shared = [pair.shared_fraction for pair in pairs]
    print(
        f"set {index} (seeds {study.train.seeds}, data order {index}): {seconds / 60:.1f} min, "
        f"shared {min(shared):.1%}..{max(shared):.1%}",
        flush=True,
    )
    for result in results:
        print(f"  {result.report.campaign}", flush=True)
        for group in result.report.hookpoints:
            for section in group.scorers:
                print(pair_line(section), flush=True)
    reached = verdict_pairs(results)
    print(f"  verdict: {', '.join(reached) if reached else 'none'}", flush=True)
    return seconds, bool(reached)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=5)
    parser.add_argument("--first", type=int, default=0, help="index of the first set")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo-seeds")
    args = parser.parse_args()
    print(f"home {get_settings().home}; {os.cpu_count()} CPUs", flush=True)
    outcomes = [run_set(index, args.out) for index in range(args.first, args.first + args.sets)]
    reached = sum(ok for _, ok in outcomes)
    minutes = ", ".join(f"{seconds / 60:.1f}" for seconds, _ in outcomes)
    print(f"{reached} of {len(outcomes)} sets reached a verdict; minutes per set: {minutes}")


if __name__ == "__main__":
    main()
