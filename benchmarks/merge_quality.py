"""One quality table from the committed runs of several quality results of one setting: seed batches
run in different sessions (seeds 0-4 in one, 5-9 in a later one) summarised and tested as one.

Only committed results are read, so the merged file traces to them; their budgets must match
(:data:`benchmarks.quality.SAME_BUDGET`), a (variant, seed) run in two of them is refused rather
than picked, and so are runs distilled from different teacher files (a retrained teacher can reach
the same test NDCG to the last digit with other weights, and its students then differ). Each run
keeps the code that made it, and the note says which file it came from and names the teacher file.

Usage: python -m benchmarks.merge_quality --name citeulike_mf400_mf20_tuned_10seeds \
           --sources citeulike_mf400_mf20_tuned citeulike_mf400_mf20_tuned_s5-9 \
           --variants rcekd:weight=125 cd:weight=1 --target rcekd:weight=125
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from benchmarks import common, quality


def merged_runs(sources: list[str], variants: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(runs of ``variants`` from the committed ``quality_<source>.json`` files, the shared settings);
    SystemExit on a missing file, a different budget, a run found twice or two teacher files."""
    runs: list[dict[str, Any]] = []
    settings: dict[str, Any] | None = None
    seen: dict[tuple[str, int], str] = {}
    for source in sources:
        path = common.RESULTS / f"quality_{source}.json"
        if not path.is_file():
            raise SystemExit(f"no committed results {path.name}")
        saved = json.loads(path.read_text())
        budget = {key: saved["settings"].get(key) for key in quality.SAME_BUDGET}
        if settings is None:
            settings = budget
        elif budget != settings:
            differ = {k: (settings[k], budget[k]) for k in settings if settings[k] != budget[k]}
            raise SystemExit(f"{path.name} was run with another budget (first source, this one): {differ}")
        code = saved.get("machine", {}).get("code", "unknown")
        for run in saved["runs"]:
            if run["variant"] not in variants:
                continue
            key = (run["variant"], run["seed"])
            if key in seen:
                raise SystemExit(f"{key} is in both {seen[key]} and {source}: pick one by --variants or drop a source")
            seen[key] = source
            runs.append({"code": code, **run, "source": source})
    teacher_files(runs)
    return runs, settings or {}


def teacher_files(runs: list[dict[str, Any]]) -> tuple[str | None, int]:
    """(the teacher weights' sha256 the distilled runs share, how many runs did not record one);
    SystemExit when they name two. The student alone's runs have no teacher and are not counted."""
    distilled = [run for run in runs if run["variant"].split(":")[0] != "none"]
    known: dict[str, set[str]] = {}
    for run in distilled:
        if run.get("teacher_weights_sha256"):
            known.setdefault(run["teacher_weights_sha256"], set()).add(run["source"])
    if len(known) > 1:
        listed = "; ".join(f"{sha[:8]}… in {', '.join(sorted(sources))}" for sha, sources in known.items())
        raise SystemExit(f"the runs were distilled from different teacher files ({listed}): merge one teacher's runs")
    return next(iter(known), None), sum(not run.get("teacher_weights_sha256") for run in distilled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="results name: benchmarks/results/quality_<name>.*")
    parser.add_argument("--sources", nargs="+", required=True, help="names of committed quality results")
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--target", default="rcekd", help="the variant tested against every other method's best")
    parser.add_argument("--note", default="", help="a line for the markdown")
    args = parser.parse_args()

    runs, settings = merged_runs(args.sources, args.variants)
    if not runs:
        raise SystemExit("none of the variants is in the sources")
    table = quality.summarise(runs, args.variants)
    test = quality.significance(table, args.target)
    seeds_by_source = {source: sorted({r["seed"] for r in runs if r["source"] == source}) for source in args.sources}
    origin = "Merged from " + "; ".join(f"quality_{s}.json (seeds {seeds})" for s, seeds in seeds_by_source.items())
    sha, unrecorded = teacher_files(runs)
    teacher = f"Teacher weights sha256 {sha[:8]}…" if sha else "No run recorded its teacher's weights hash"
    if sha and unrecorded:
        teacher += f" ({unrecorded} runs made before runs recorded it)"
    note = f"{origin}. {teacher}. {args.note}".strip()
    command = (
        f"python -m benchmarks.merge_quality --name {args.name} --sources {' '.join(args.sources)} "
        f"--variants {' '.join(args.variants)} --target {args.target}"
    )
    quality.plot(runs, args.variants, common.RESULTS / f"quality_{args.name}.png")
    text = quality.markdown(args.name, table, test, command, None, note, runs)
    common.write_results(
        f"quality_{args.name}",
        {
            "settings": {**settings, **vars(args)},
            "table": table,
            "significance": test,
            "variants": quality.against_full(table, args.target),
            "runs": runs,
        },
        text,
    )
    print(text)


if __name__ == "__main__":
    main()
