"""Resumable driver of the methods comparison: one Snakemake call per unit, its small JSONs kept in runs/.

    .venv/bin/python benchmarks/methods_comparison/run.py --max-minutes 150
    .venv/bin/python benchmarks/methods_comparison/run.py --dry-run            # the pending units
    .venv/bin/python benchmarks/methods_comparison/run.py --phase 1 --methods dense shortgpt

A unit is what the workflow writes about one evaluated model for one measurement set:

    ppl  perplexity on every corpus of the config, plus the sample generations (cheap), with the
         plan.json, compression.json, calibration.json, model.json and the calibration's cosine.csv
         (for the plan figures) beside them;
    zs   the zero-shot tasks of the config.

Units run in priority order: (1) the first calibration (seed 0), every target and method, ppl
(the dense model first); (2) every other calibration (here seed 1), ppl; (3) the first, zs, dense first.
Within a phase the targets go in config order, the methods in config order with the lower-priority
ones (LOW_PRIORITY) last.

For each pending unit the workflow runs with the unit's files as explicit targets
(`snakemake --cores 2 --configfile ... TARGETS`, log in results/methods_comparison/logs/), then
the small JSONs it needs are copied into runs/<the same path as under results/>, with the
Snakemake benchmark TSVs of its jobs (runs/benchmarks/...) and one line in runs/units.jsonl (wall
time, jobs run). A unit whose files are all in runs/ is skipped, so the driver resumes after a
kill, or in a new session whose results/ is empty: the workflow then rebuilds what the unit needs
(model, calibration tokens, activations, checkpoint). A plan already collected in runs/ is put
back into results/ before that (after the cheap stages it depends on), so a model-based search
(SLEB, LaCo, SLM) is not run twice and every unit of a model sees the same plan.

Each Snakemake call gets a copy of the config that keeps only the unit's method (and its
calibration): every job's params, hence every result, are those of the full config (run the full
config with snakemake and the same files come out), but a method whose module does not import yet
only fails its own units, and the DAG stays small.

Once every unit that needs a compressed checkpoint is collected the checkpoint directory in
results/ is deleted (each is ~0.5 GB; --keep-checkpoints keeps them).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIG = HERE / "config.yaml"
RUNS = HERE / "runs"
WORK = Path("results/methods_comparison")  # logs and derived configs, relative to ROOT


def use_config(path: Path) -> None:
    """Drive another benchmark's config (e.g. benchmarks/flattengpt_levers/...): its units are collected in
    runs/ beside that config, its logs and derived configs go to results/<that folder's name>/."""
    global RUNS, WORK
    path = Path(path).resolve()
    if path != CONFIG.resolve():
        RUNS, WORK = path.parent / "runs", Path("results") / path.parent.name
LOW_PRIORITY = ("laco-code", "slm-code")  # run last within every phase
PHASES = {1: "first calibration perplexity", 2: "other calibrations perplexity", 3: "first calibration zero-shot",
          4: "recovered models (first calibration): perplexity, then zero-shot"}
# "first calibration": every calibration that is not a seed replica of an earlier one (seed_replicas);
# "other calibrations": the seed replicas. The methods comparison has one of each (seed 0, seed 1).


# ----------------------------------------------------------------------------- the units


@dataclass
class Unit:
    phase: int
    kind: str                  # "ppl" or "zs"
    model: str
    method: str                # "dense", a methods: name, or {method}+{recovery} for a recovered model
    calib: str | None = None
    target: str | None = None
    targets: list[str] = field(default_factory=list)    # what Snakemake is asked for (paths under ROOT)
    required: list[str] = field(default_factory=list)   # results/ paths that must be in runs/ for "done"
    extra: list[str] = field(default_factory=list)      # results/ paths copied if present

    @property
    def variant(self) -> str:
        return "dense" if self.method == "dense" else f"{self.calib}/{self.target}/{self.method}"

    @property
    def name(self) -> str:
        return f"{self.kind} {self.variant}"

    @property
    def slug(self) -> str:
        return f"{self.kind}.{self.variant.replace('/', '.')}"

    @property
    def source(self) -> str:
        """The compression method whose plan (and checkpoint) the model comes from: flattengpt for flattengpt+heal."""
        return self.method.partition("+")[0]

    @property
    def recovery(self) -> str | None:
        return self.method.partition("+")[2] or None

    @property
    def source_variant(self) -> str:
        return "dense" if self.method == "dense" else f"{self.calib}/{self.target}/{self.source}"

    @property
    def plan(self) -> str | None:
        """The plan.json the model was built from (a recovered model's is its source's)."""
        return None if self.method == "dense" else f"results/{self.model}/{self.source_variant}/plan.json"

    @property
    def checkpoint(self) -> str | None:
        return None if self.method == "dense" else f"results/{self.model}/{self.variant}/model"

    @property
    def needs(self) -> list[str]:
        """The checkpoints in results/ this unit reads: its own, and a recovered model's source (the recover job's input)."""
        if self.method == "dense":
            return []
        source = [f"results/{self.model}/{self.source_variant}/model"] if self.recovery else []
        return [self.checkpoint] + source


def load_config(path: Path = CONFIG) -> dict:
    return yaml.safe_load(Path(path).read_text())


def method_order(config: dict, methods: list[str] | None = None) -> list[str]:
    names = list(config["methods"])
    ordered = [m for m in names if m not in LOW_PRIORITY] + [m for m in names if m in LOW_PRIORITY]
    return [m for m in ordered if methods is None or m in methods]


def recovered_methods(config: dict) -> list[tuple[str, str, str]]:
    """(target, source method, recovered method name) of every recovery: setting, in config order.

    A setting's `methods`/`targets` (null: all) as the workflow reads them; `dense: true` is not a unit here.
    """
    out = []
    for name, setting in (config.get("recovery") or {}).items():
        methods = setting.get("methods")
        targets = setting.get("targets")
        for target in (list(config["targets"]) if targets is None else targets):
            for method in (method_order(config) if methods is None else methods):
                out.append((target, method, f"{method}+{name}"))
    return out


def seed_primaries(config: dict) -> dict[str, str]:
    """calibration -> the first calibration that differs from it only by `seed` (itself if none does)."""
    primaries: dict[str, str] = {}
    for name, spec in config["calibration"].items():
        rest = {k: v for k, v in spec.items() if k != "seed"}
        primaries[name] = next((p for p in primaries if primaries[p] == p and
                                {k: v for k, v in config["calibration"][p].items() if k != "seed"} == rest), name)
    return primaries


def seed_replicas(config: dict) -> set[str]:
    """The calibrations that differ from an earlier one only by `seed`: measured for the spread (phase 2), not zero-shot."""
    return {name for name, primary in seed_primaries(config).items() if name != primary}


def runs_path(result_path: str) -> Path:
    """results/<x> -> runs/<x>."""
    return RUNS / Path(result_path).relative_to("results")


def all_units(config: dict, methods: list[str] | None = None) -> list[Unit]:
    """Every unit of the benchmark, in priority order (a methods subset keeps only those, "dense" included)."""
    (model,) = list(config["models"])  # one model: the report's model column
    calibs, targets = list(config["calibration"]), list(config["targets"])
    evaluation = config.get("evaluation", {})
    corpora = list(evaluation.get("perplexity", {}).get("corpora", {}))
    tasks = list(evaluation.get("zero_shot", {}).get("tasks", []))
    names = method_order(config)
    want = lambda m: methods is None or m in methods  # noqa: E731
    base_model = f"results/{model}"

    def ppl(phase: int, calib: str | None, target: str | None, method: str) -> Unit:
        unit = Unit(phase, "ppl", model, method, calib, target)
        run = f"{base_model}/{unit.variant}"
        evals = [f"{run}/eval/perplexity/{c}.json" for c in corpora] + [f"{run}/eval/generations.json"]
        unit.targets = list(evals)
        unit.required = list(evals) + [f"{base_model}/model.json"]
        if method != "dense":
            cosine = f"{base_model}/{calib}/similarity/cosine.csv"
            unit.targets.append(cosine)
            unit.required += [unit.plan, f"{run}/model/compression.json"]
            unit.extra = [f"{base_model}/{calib}/calibration.json", cosine]
        if unit.recovery:  # the tuning's record and training curve
            unit.required += [f"{run}/model/recovery.json", f"{run}/model/curve.csv"]
            unit.extra += [f"{run}/model/curve.png"]
        return unit

    def zs(phase: int, calib: str | None, target: str | None, method: str) -> Unit:
        unit = Unit(phase, "zs", model, method, calib, target)
        run = f"{base_model}/{unit.variant}"
        unit.targets = [f"{run}/eval/zero_shot/{t}.json" for t in tasks]
        unit.required = list(unit.targets)
        unit.extra = [f"{base_model}/model.json"]
        if method != "dense":
            unit.extra += [unit.plan, f"{run}/model/compression.json",
                           f"{base_model}/{calib}/calibration.json"]
        if unit.recovery:
            unit.extra += [f"{run}/model/recovery.json", f"{run}/model/curve.csv", f"{run}/model/curve.png"]
        return unit

    from flattengpt.config import runs  # the workflow's own reading of runs: (each entry's methods)

    replicas = seed_replicas(config)
    cells = [(run["calibration"], run["target"], m) for run in runs(config) for m in names
             if m in run["methods"] and want(m)]
    units: list[Unit] = []
    if corpora:
        if want("dense"):
            units.append(ppl(1, None, None, "dense"))
        units += [ppl(2 if c in replicas else 1, c, t, m) for c, t, m in cells]
    if tasks and calibs:
        if want("dense"):
            units.append(zs(3, None, None, "dense"))
        units += [zs(3, c, t, m) for c, t, m in cells if c not in replicas]
    if calibs:  # phase 4: each recovered model's perplexity, then its zero-shot, one model after another
        for target, source, method in recovered_methods(config):
            if want(method):
                units += ([ppl(4, calibs[0], target, method)] if corpora else []) + \
                         ([zs(4, calibs[0], target, method)] if tasks else [])

    # priority: phase; dense first; the lower-priority methods last; then target, then method (config order);
    # in phase 4 the recovered models in recovery: order, each model's perplexity before its zero-shot
    recovered = [m for _, _, m in recovered_methods(config)]

    def key(u: Unit) -> tuple:
        if u.phase == 4:
            return (4, recovered.index(u.method), targets.index(u.target), u.kind != "ppl")
        return (u.phase, u.method != "dense", u.method in LOW_PRIORITY, calibs.index(u.calib) if u.calib in calibs else -1,
                targets.index(u.target) if u.target in targets else -1, names.index(u.method) if u.method in names else -1)
    return sorted(units, key=key)


def is_done(unit: Unit) -> bool:
    return all(runs_path(p).is_file() for p in unit.required)


# ----------------------------------------------------------------------------- running one unit


def derived_config(config: dict, unit: Unit) -> Path:
    """The config with only the unit's method and calibration (same params for every job of the unit)."""
    derived = json.loads(json.dumps(config))
    derived["recovery"] = {}
    if unit.recovery:  # the source method and the one recovery setting, narrowed to this model
        setting = config["recovery"][unit.recovery]
        derived["recovery"] = {unit.recovery: {**setting, "methods": [unit.source], "targets": [unit.target]}}
    if unit.method != "dense":
        derived["methods"] = {unit.source: config["methods"][unit.source]}
        derived["calibration"] = {unit.calib: config["calibration"][unit.calib]}
        derived["runs"] = None   # every (calibration, target) left, with the one method
    else:  # no method is needed: keep one whose module imports, so that validation passes
        name = next((m for m in method_order(config) if importable(config, m) is None), None)
        if name is None:
            raise RuntimeError("no method of the config imports")
        derived["methods"] = {name: config["methods"][name]}
        first = next(iter(config["calibration"]))
        derived["calibration"] = {first: config["calibration"][first]}
        derived["runs"] = None
    text = yaml.safe_dump(derived, sort_keys=False)
    path = ROOT / WORK / "configs" / f"{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        path.write_text(f"# derived by {Path(__file__).name} for {unit.name}\n" + text)
    return path


_importable: dict[str, str | None] = {}


def importable(config: dict, method: str) -> str | None:
    """None if the method's module imports, else the error (all checked in one subprocess, once)."""
    if method == "dense":
        return None
    if not _importable:
        kinds = sorted({spec["method"] for spec in config["methods"].values()})
        code = ("import json, sys\nfrom flattengpt.methods import method_class\nout = {}\n"
                f"for kind in {kinds!r}:\n"
                "    try:\n        method_class(kind); out[kind] = None\n"
                "    except Exception as err:\n        out[kind] = f'{type(err).__name__}: {err}'\n"
                "print(json.dumps(out))\n")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"cannot import flattengpt.methods: {proc.stderr.strip()}")
        _importable.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return _importable[config["methods"][method]["method"]]


def snakemake_command(config_path: Path, targets: list[str], cores: int) -> list[str]:
    exe = Path(sys.executable).with_name("snakemake")
    head = [str(exe)] if exe.is_file() else [sys.executable, "-m", "snakemake"]
    return head + ["--cores", str(cores), "--configfile", str(config_path), "--rerun-incomplete", "--keep-going",
                   *targets]


_child: subprocess.Popen | None = None


def run_snakemake(config_path: Path, targets: list[str], cores: int, log, tick=None) -> int:
    """Snakemake on `targets`, output appended to `log`; SIGTERM/SIGINT of the driver reach it.

    `tick()` is called every 30 s while it runs (and once at the end).
    """
    global _child
    command = snakemake_command(config_path, targets, cores)
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    # its own session: a Ctrl-C reaches the driver only, which passes it on once (_forward)
    _child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            try:
                return _child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                if tick:
                    tick()
    finally:
        _child = None
        if tick:
            tick()


def _forward(signum, frame):
    """The driver was asked to stop: stop Snakemake the way Ctrl-C does, then give up on it.

    SIGINT makes Snakemake kill its running jobs and mark their outputs incomplete (SIGTERM would
    wait for them to finish); after 60 s its whole process group (it and its jobs) is killed.
    """
    if _child is not None and _child.poll() is None:
        _child.send_signal(signal.SIGINT)
        try:
            _child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of its group: Snakemake itself after the timeout, or a job it left behind
            os.killpg(_child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise KeyboardInterrupt


def stale_locks(model: str, live_targets: set[str] = frozenset()) -> list[Path]:
    """Snakemake lock files in .snakemake/locks/ that name files of this benchmark (results/<model>/) and
    none of `live_targets` (the files live Snakemake runs were asked for).

    Only the drivers (one at a time per benchmark: see main) run Snakemake on these paths, always with
    the unit's files as explicit targets, and a run locks the files it is about to write: a lock whose
    outputs include no live run's target was left by a killed run.
    """
    locks = ROOT / ".snakemake" / "locks"
    if not locks.is_dir():
        return []
    prefix = f"results/{model}/"
    found = set()
    for path in locks.glob("*.output.lock"):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        if any(line.startswith(prefix) for line in lines) and not live_targets.intersection(lines):
            found.add(path.name.split(".")[0])
    # both files (input, output) of each lock number
    return sorted(p for n in found for p in locks.glob(f"{n}.*.lock"))


def _snakemake_processes() -> dict[int, list[str]]:
    """pid -> argv of every live Snakemake process working in this repository (the benchmarks share
    results/<model>/, so another benchmark's driver's runs count)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        text = " ".join(argv)
        if "snakemake" not in text or "run.py" in text:
            continue
        try:
            if Path(os.readlink(proc / "cwd")).resolve() == ROOT.resolve():
                found[int(proc.name)] = argv
        except OSError:
            continue
    return found


def live_benchmark_snakemakes() -> list[int]:
    """pids of live Snakemake processes working in this repository."""
    return sorted(_snakemake_processes())


def live_snakemake_targets() -> set[str]:
    """The results/ files that live Snakemake runs in this repository were asked for (their command lines)."""
    return {a for argv in _snakemake_processes().values() for a in argv if a.startswith("results/")}


def clear_stale_locks(model: str) -> None:
    stale = stale_locks(model, live_snakemake_targets())
    if not stale:
        return
    for path in stale:
        path.unlink(missing_ok=True)
    print(f"  removed stale Snakemake locks of a killed run: {', '.join(p.name for p in stale)}", flush=True)


def copy_into_runs(path: str, overwrite: bool) -> bool:
    source, dest = ROOT / path, runs_path(path)
    if not source.is_file() or (dest.exists() and not overwrite):
        return dest.is_file()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, dest)
    return True


def benchmark_tsvs(unit: Unit) -> list[str]:
    """The Snakemake benchmark files of the jobs a unit may run (those that exist get copied)."""
    bench = f"results/benchmarks/{unit.model}"
    files = []
    if unit.method != "dense":
        files += [f"{bench}/{unit.calib}/activations.tsv", f"{bench}/{unit.calib}/similarity.tsv",
                  f"{bench}/{unit.calib}/{unit.target}/compress.{unit.source}.tsv",
                  f"{bench}/{unit.calib}/{unit.target}/search.{unit.source}.tsv"]
        if unit.recovery:
            files.append(f"{bench}/{unit.calib}/{unit.target}/recover.{unit.method}.tsv")
    variant = f"{bench}/{unit.variant}"
    files += [f"{variant}/{name}" for name in
              (sorted(p.name for p in (ROOT / variant).glob("*.tsv")) if (ROOT / variant).is_dir() else [])]
    return files


def restore_plan(config_path: Path, unit: Unit, cores: int, log) -> bool:
    """Put a plan collected in runs/ back into an empty results/, newer than what it depends on.

    The cheap upstream stages run first (model, tokens, and for similarity-based methods the views),
    so that the restored plan.json is the newest file and Snakemake keeps it.
    """
    if unit.method == "dense":
        return False
    plan = unit.plan
    if (ROOT / plan).is_file() or not runs_path(plan).is_file():
        return False
    upstream = [f"results/{unit.model}/model.json", f"results/{unit.model}/{unit.calib}/tokens.safetensors",
                f"results/{unit.model}/{unit.calib}/similarity/cosine.csv"]
    if run_snakemake(config_path, upstream, cores, log) != 0:
        return False
    (ROOT / plan).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(runs_path(plan), ROOT / plan)  # copyfile: a fresh mtime
    # the jobs that read a plan check it against its manifest (flattengpt.integrity): record the restored copy,
    # as the plan or search job that wrote it did
    from flattengpt.integrity import write_manifest

    record = json.loads((ROOT / plan).read_text())
    rule = "search" if record.get("cost", {}).get("block_forwards") else "plan"
    write_manifest(ROOT / plan, rule, {"model": unit.model, "calib": unit.calib, "target": unit.target,
                                       "method": unit.source})
    log.write(f"# restored {plan} from {runs_path(plan).relative_to(ROOT)}\n")
    log.flush()
    return True


def search_state(unit: Unit) -> str | None:
    """The resume state of a model-based search (SLEB, LaCo, SLM): a small JSON, saved after every round."""
    if unit.method == "dense":
        return None
    return f"results/{unit.model}/{unit.calib}/{unit.target}/.resume/search.{unit.source}/state.json"


def backup_search_state(unit: Unit) -> None:
    """Keep a copy of a running search's state in runs/ (a long search then survives the loss of results/).

    The search keys its state by the model's and the calibration's content, so a copy put back in
    a later session is used only for the same inputs; it is dropped once the plan is collected.
    """
    state = search_state(unit)
    if state is None:
        return
    if runs_path(unit.plan).is_file():
        runs_path(state).unlink(missing_ok=True)
        return
    source = ROOT / state
    if source.is_file() and (not runs_path(state).is_file()
                             or source.read_bytes() != runs_path(state).read_bytes()):
        copy_into_runs(state, overwrite=True)


def restore_search_state(unit: Unit, log) -> None:
    state = search_state(unit)
    plan = unit.plan
    if (state is None or (ROOT / state).is_file() or (ROOT / plan).is_file() or runs_path(plan).is_file()
            or not runs_path(state).is_file()):
        return
    (ROOT / state).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(runs_path(state), ROOT / state)
    log.write(f"# restored the search state {state} from runs/\n")
    log.flush()


def rules_run(log_path: Path, start: int) -> dict[str, int]:
    """Jobs Snakemake started in this unit's part of the log, by rule."""
    text = log_path.read_text(errors="replace")[start:]
    return dict(Counter(re.findall(r"^(?:local)?rule (\w+):$", text, flags=re.M)))


def run_unit(config: dict, unit: Unit, cores: int) -> tuple[int, float, dict]:
    config_path = derived_config(config, unit)
    log_path = ROOT / WORK / "logs" / f"{unit.slug}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log_path, "a") as log:
        offset = log.tell()
        log.write(f"\n# {datetime.now(timezone.utc).isoformat(timespec='seconds')} unit {unit.name}\n")
        log.flush()
        restored = restore_plan(config_path, unit, cores, log)
        restore_search_state(unit, log)
        rc = run_snakemake(config_path, unit.targets, cores, log, tick=lambda: backup_search_state(unit))
    wall = time.monotonic() - started
    info = {"rules": rules_run(log_path, offset), "plan_restored": restored, "log": str(log_path.relative_to(ROOT))}
    return rc, wall, info


def collect(unit: Unit) -> list[str]:
    """Copy the unit's files into runs/; returns the required ones still missing."""
    for path in unit.extra + [p for p in unit.required if "/eval/" not in p]:
        copy_into_runs(path, overwrite=False)  # shared files: the first copy stays
    for path in benchmark_tsvs(unit):
        copy_into_runs(path, overwrite=True)
    for path in unit.required:
        if "/eval/" in path:
            copy_into_runs(path, overwrite=True)  # last: a unit counts as done once these are there
    backup_search_state(unit)  # drops the copy once the plan is in runs/
    return [p for p in unit.required if not runs_path(p).is_file()]


def drop_checkpoints(units: list[Unit]) -> None:
    """Delete the compressed checkpoints in results/ whose units are all collected.

    Not while another Snakemake works in this repository: another benchmark's driver (they share
    results/<model>/) may be evaluating the same checkpoint; a later run deletes it.
    """
    others = live_benchmark_snakemakes()
    if others:
        print(f"  checkpoints kept: Snakemake pids {others} still work in this repository", flush=True)
        return
    by_checkpoint: dict[str, list[Unit]] = {}
    for unit in units:
        for checkpoint in unit.needs:
            by_checkpoint.setdefault(checkpoint, []).append(unit)
    for checkpoint, needing in by_checkpoint.items():
        if (ROOT / checkpoint).is_dir() and all(is_done(u) for u in needing):
            shutil.rmtree(ROOT / checkpoint)
            print(f"  deleted {checkpoint} (every unit that needs it is collected)", flush=True)


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG, help="workflow config (default: config.yaml here)")
    parser.add_argument("--phase", type=int, nargs="+", choices=sorted(PHASES),
                        help="only these phases: " + ", ".join(f"{k} {v}" for k, v in PHASES.items()))
    parser.add_argument("--methods", nargs="+", help="only these methods (names under methods:, and/or dense)")
    parser.add_argument("--targets", nargs="+", help="only these targets (names under targets:)")
    parser.add_argument("--limit", type=int, help="run at most this many units")
    parser.add_argument("--dry-run", action="store_true", help="list the pending units and stop")
    parser.add_argument("--max-minutes", type=float, help="start no new unit after this many minutes")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep compressed checkpoints in results/ after their units are collected")
    args = parser.parse_args(argv)

    use_config(args.config)
    config = load_config(args.config)
    known = set(config["methods"]) | {"dense"} | {m for _, _, m in recovered_methods(config)}
    if args.methods and set(args.methods) - known:
        parser.error(f"unknown methods {sorted(set(args.methods) - known)}; known: {sorted(known)}")
    everything = all_units(config)
    if args.targets and set(args.targets) - set(config["targets"]):
        parser.error(f"unknown targets {sorted(set(args.targets) - set(config['targets']))}")
    selected = [u for u in all_units(config, args.methods) if (not args.phase or u.phase in args.phase)
                and (not args.targets or u.target is None or u.target in args.targets)]
    pending = [u for u in selected if not is_done(u)]
    print(f"{len(selected) - len(pending)} of {len(selected)} selected units collected in "
          f"{RUNS.relative_to(ROOT)}; {len(pending)} pending", flush=True)
    if args.dry_run:
        for unit in pending:
            problem = importable(config, unit.source)
            note = f"  (method does not import: {problem})" if problem else ""
            print(f"  phase {unit.phase}  {unit.name}{note}")
        return 0

    lock_path = ROOT / WORK / "run.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(lock_path, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another run.py holds {lock_path}; one driver at a time")
    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)

    start = time.monotonic()
    failed, finished = [], 0
    try:
        for index, unit in enumerate(pending, start=1):
            if args.max_minutes is not None and time.monotonic() - start >= 60 * args.max_minutes:
                print(f"--max-minutes {args.max_minutes:g} reached: {len(pending) - index + 1} units left for "
                      "the next run", flush=True)
                break
            if args.limit is not None and finished + len(failed) >= args.limit:
                print(f"--limit {args.limit} reached", flush=True)
                break
            prefix = f"[{index}/{len(pending)}] phase {unit.phase} {unit.name}"
            problem = importable(config, unit.source)
            if problem:
                print(f"{prefix}: skipped, method {config['methods'][unit.source]['method']} does not import "
                      f"({problem})", flush=True)
                failed.append(unit.name)
                continue
            clear_stale_locks(unit.model)
            print(f"{prefix}: running", flush=True)
            rc, wall, info = run_unit(config, unit, args.cores)
            missing = collect(unit)
            status = "done" if not missing else f"FAILED (rc {rc}, missing {len(missing)} files; log {info['log']})"
            jobs = ", ".join(f"{k} {v}" for k, v in sorted(info["rules"].items())) or "no jobs"
            print(f"{prefix}: {status} in {minutes(wall)} ({jobs})", flush=True)
            record = {"unit": unit.name, "kind": unit.kind, "phase": unit.phase, "method": unit.method,
                      "calibration": unit.calib, "target": unit.target, "wall_seconds": round(wall, 1),
                      "returncode": rc, "complete": not missing, "jobs": info["rules"],
                      "plan_restored": info["plan_restored"], "cores": args.cores,
                      "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "load_average_1min_at_end": round(os.getloadavg()[0], 2)}
            RUNS.mkdir(parents=True, exist_ok=True)
            with open(RUNS / "units.jsonl", "a") as out:
                out.write(json.dumps(record) + "\n")
            if missing:
                failed.append(unit.name)
            else:
                finished += 1
                if not args.keep_checkpoints:
                    drop_checkpoints(everything)
    except KeyboardInterrupt:
        print("interrupted; rerun to resume (collected units are kept)", flush=True)
        return 130
    left = sum(not is_done(u) for u in selected)
    print(f"collected {finished} units in {minutes(time.monotonic() - start)}; {left} of {len(selected)} "
          f"selected units still pending" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
