"""A campaign of 1000 EM volumes, 300 tomograms and 200 slides planned for Slurm: the submission plan,
the CPU time of the dry run, and what the input check costs (first plan) and saves (later plans).

Each table row names files of its own (symlinks to the demo data: real headers, real readers), and a
few rows per table are bad in the ways users' rows are (a missing file, a truth of another shape, centres
outside the tomogram, a channel the slide does not have).  Then, with the Slurm profile as shipped
(`--sdm env-modules`: no conda here):

* plan 1: `snakemake -n` with an empty input-check cache (every row's headers read),
* plan 2: the same again (verdicts from the cache),
* baseline: `input_check.enabled: false` on the tables without their bad rows (the plan alone: without
  the check, one bad row's missing file stops the whole plan),

and prints CPU seconds (the snakemake process and its children), wall seconds, the jobs per rule, the
submissions (a group's jobs of one input go in one submission: em_mask, cryoet_patches, codex_post) and the
bad rows reported before submission.

    python bench/bench_campaign.py [--volumes 1000 --tomograms 300 --slides 200]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
MASKWORKS = str(Path(sys.executable).parent / "maskworks")
# rules whose jobs of one input are submitted together (their `group:`), and the group
GROUPS = {"texture_mask": "em_mask", "postprocess_mask": "em_mask", "extract_patches": "cryoet_patches",
          "merge_corrections": "cryoet_patches", "repair_masks": "codex_post", "stitch": "codex_post"}


def _link(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())
    return str(dst)


def _setup(d: Path, n_em: int, n_tomo: int, n_slides: int) -> dict:
    for item in ["Snakefile", "rules", "scripts", "config", "envs", "profiles"]:
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, d / item)
    demo = d / "demo"
    subprocess.run([MASKWORKS, "demo-data", str(demo), "--arms", "em,cryoet,codex"], check=True,
                   capture_output=True)
    data = d / "data"
    em = ["name\tpath\tvoxel_size\tunit\ttruth\tlevel"]
    for i in range(n_em):
        vol = _link(demo / "em" / "sample2.mrc", data / "em" / f"v{i:05d}.mrc")
        em.append(f"v{i:05d}\t{vol}\t\t\t\t")
    bad = {"v-missing": "no such file", "v-truth": "truth shape"}
    em.append(f"v-missing\t{data}/em/nope.mrc\t\t\t\t")
    em.append(f"v-truth\t{demo}/em/sample2.mrc\t\t\t{demo}/em/sample1_truth.zarr\t")
    tomo = ["name\ttomogram\tsegmentation\tcentres\tcorrections"]
    for i in range(n_tomo):
        t = _link(demo / "cryoet" / "tomo1.mrc", data / "cryoet" / f"t{i:04d}.mrc")
        s = _link(demo / "cryoet" / "tomo1_seg.mrc", data / "cryoet" / f"t{i:04d}_seg.mrc")
        c = _link(demo / "cryoet" / "tomo1_centres.csv", data / "cryoet" / f"t{i:04d}_centres.csv")
        tomo.append(f"t{i:04d}\t{t}\t{s}\t{c}\t")
    (data / "outside.csv").write_text("x,y,z\n5000,5,5\n")
    tomo.append(f"t-outside\t{demo}/cryoet/tomo1.mrc\t{demo}/cryoet/tomo1_seg.mrc\t{data}/outside.csv\t")
    bad["t-outside"] = "outside the tomogram"
    slides = ["name\timage\tchannels\tnuclear_channel\twholecell_channels\timage_mpp"]
    for i in range(n_slides):
        img = _link(demo / "codex" / "slide1.ome.tif", data / "codex" / f"s{i:04d}.ome.tif")
        slides.append(f"s{i:04d}\t{img}\t{demo}/codex/slide1_channels.txt\tDAPI\tCD45,PanCK\t0.5")
    slides.append(f"s-channel\t{demo}/codex/slide1.ome.tif\t{demo}/codex/slide1_channels.txt\tDAPI\tCD99\t0.5")
    bad["s-channel"] = "not found"
    for name, rows in (("em", em), ("tomo", tomo), ("slides", slides)):
        (d / f"{name}.tsv").write_text("\n".join(rows) + "\n")
        good = [r for r in rows if r.split("\t")[0] not in bad]  # without a check, one bad row stops the plan
        (d / f"{name}_good.tsv").write_text("\n".join(good) + "\n")
    common = ("em: {{enabled: true, volumes: em{0}.tsv}}\ncryoet: {{enabled: true, tomograms: tomo{0}.tsv, refine_membranes: {{copick_config: null}}}}\n"
              "codex: {{enabled: true, images: slides{0}.tsv, segment_cells: {{backend: watershed}}}}\n")
    (d / "campaign.yaml").write_text(common.format(""))
    (d / "unchecked.yaml").write_text(common.format("_good") + "input_check: {enabled: false}\n")
    return bad


def _plan(d: Path, cfg: str) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([SNAKEMAKE, "--profile", "profiles/slurm", "--sdm", "env-modules", "-n",
                           "--configfile", cfg], cwd=d, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"dry run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, proc.stdout + proc.stderr


def _counts(out: str) -> dict[str, int]:
    table = out.split("Job stats:", 1)[-1].split("\n\n", 1)[0]
    counts = {}
    for line in table.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def _submissions(counts: dict[str, int], components: dict[str, int] | None = None) -> int:
    """Jobs submitted one by one, plus one submission per group of one input (the largest member count),
    ``components`` inputs of a group together (--group-components)."""
    components = components or {}
    alone = sum(n for r, n in counts.items() if r not in GROUPS and r not in ("all", "total"))
    groups: dict[str, int] = {}
    for r, n in counts.items():
        if r in GROUPS:
            groups[GROUPS[r]] = max(groups.get(GROUPS[r], 0), n)
    return alone + sum(-(-n // components.get(g, 1)) for g, n in groups.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=1000)
    ap.add_argument("--tomograms", type=int, default=300)
    ap.add_argument("--slides", type=int, default=200)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mw-campaign-") as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        bad = _setup(d, a.volumes, a.tomograms, a.slides)
        print(f"campaign: {a.volumes} EM volumes, {a.tomograms} tomograms, {a.slides} slides (+{len(bad)} bad rows); "
              f"set up in {time.perf_counter() - t0:.1f} s")
        runs = {}
        for label, cfg in (("plan 1 (check, empty cache)", "campaign.yaml"), ("plan 2 (check, cached)", "campaign.yaml"),
                           ("baseline (no check)", "unchecked.yaml")):
            runs[label] = _plan(d, cfg)
        out = runs["plan 1 (check, empty cache)"][2]
        counts = _counts(out)
        reported = re.search(r"(\d+) input row\(s\) cannot run", out)
        missing = [n for n, why in bad.items() if not re.search(rf"{n} \(.*{re.escape(why)}", out)]
        print(f"\n{'dry run':<30} {'CPU s':>7} {'wall s':>7} {'CPU / baseline':>15}")
        base = runs["baseline (no check)"][0]
        for label, (cpu, wall, _) in runs.items():
            print(f"{label:<30} {cpu:>7.1f} {wall:>7.1f} {cpu / base:>14.2f}x")
        total = sum(n for r, n in counts.items() if r not in ("all", "total"))
        print(f"\njobs: {total} ({', '.join(f'{r} {n}' for r, n in counts.items() if r not in ('all', 'total'))})")
        profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
        components = dict(c.split("=") for c in profile.get("group-components", []))
        components = {g: int(n) for g, n in components.items()}
        print(f"submissions: {_submissions(counts)} with a group's jobs of one input together, "
              f"{_submissions(counts, components)} with the profile's group-components {components}; "
              f"profiles/slurm keeps at most {profile['jobs']} in flight")
        print(f"bad rows reported before submission: {reported.group(1) if reported else 0} of {len(bad)}"
              + (f"; NOT reported: {missing}" if missing else ""))
        worst = max(cpu for cpu, _, _ in runs.values())
        print(f"goal: the campaign's plan in < 30 s of CPU: {'met' if worst < 30 else 'NOT met'} "
              f"(slowest {worst:.1f} s)")
        if missing or worst >= 30:
            return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
