"""The study's derived text files: a calibration half and a selection half of two sources unlike WikiText-2.

    .venv/bin/python benchmarks/flattengpt_levers/prepare.py

Instruction data: ../shared/data/text/alpaca_data_1k.json, records 0-499 to
resources/flattengpt_levers/alpaca-calibration.json (part of the mixed calibration), records
500-999 to alpaca-selection.json.

Code: modules of this Python's standard library (every install has them; the study ran on 3.11.7),
concatenated with a `# file: <name>` line before each: CALIBRATION_MODULES to python-calibration.txt
(part of the mixed calibration), SELECTION_MODULES to python-selection.txt. No module is in both.

The selection halves are the text the settings are chosen on: neither a calibration set nor a reported
corpus. The files are derived, not committed; the calibration and perplexity records of the stages
that read them carry their sha256, and this script prints it.

It also reuses the methods comparison's zero-shot records of the models this study shares with it
(dense, and `flattengpt` and `flattengpt-paper` on wikitext2-seed0): the same workflow jobs with the
same params, checked here (model, calibration, target, method options, compute, activations and
zero_shot settings equal), are copied into runs/, so run.py does not evaluate them a second time.
"""

import hashlib
import json
import shutil
import sys
import sysconfig
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ALPACA = ROOT.parent / "shared" / "data" / "text" / "alpaca_data_1k.json"
OUT = ROOT / "resources" / "flattengpt_levers"  # not results/: every input there must be a job's output, with its manifest
CALIBRATION_MODULES = ("argparse", "configparser", "dataclasses", "difflib", "inspect")
SELECTION_MODULES = ("calendar", "fractions", "functools", "heapq", "pprint", "shlex", "statistics", "textwrap")
HERE = Path(__file__).resolve().parent
COMPARISON = HERE.parent / "methods_comparison"
SHARED_MODELS = {"dense": None, "flattengpt": "wikitext2-seed0", "flattengpt-paper": "wikitext2-seed0"}


def write(name: str, text: str, what: str) -> None:
    path = OUT / name
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    print(f"{path.relative_to(ROOT)}: {what}, sha256 {hashlib.sha256(text.encode()).hexdigest()}")


def python_text(modules: tuple[str, ...]) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for module in modules:
        source = stdlib / f"{module}.py"
        if not source.is_file():
            raise SystemExit(f"{source}: not found; this Python ({sys.version.split()[0]}) lacks the module")
        parts.append(f"# file: {module}.py\n{source.read_text()}")
    return "\n".join(parts)


def reuse_zero_shot() -> None:
    """Copy the comparison's zero-shot records of the models both benchmarks evaluate (identical job params)."""
    ours, theirs = (yaml.safe_load((d / "config.yaml").read_text()) for d in (HERE, COMPARISON))
    for key in ("models", "compute", "activations"):
        if ours[key] != theirs[key]:
            print(f"not reusing zero-shot records: {key} differs from the methods comparison's")
            return
    if ours["evaluation"]["zero_shot"] != theirs["evaluation"]["zero_shot"]:
        print("not reusing zero-shot records: evaluation.zero_shot differs from the methods comparison's")
        return
    (model,) = ours["models"]
    copied = 0
    for method, calib in SHARED_MODELS.items():
        if calib is None:
            variants = ["dense"]
        else:
            if ours["methods"][method] != theirs["methods"][method] or ours["calibration"][calib] != theirs["calibration"][calib]:
                print(f"not reusing {method}: its options or calibration {calib} differ")
                continue
            variants = [f"{calib}/{t}/{method}" for t in ours["targets"] if ours["targets"][t] == theirs["targets"].get(t)]
        for variant in variants:
            for task in ours["evaluation"]["zero_shot"]["tasks"]:
                rel = Path(model) / variant / "eval" / "zero_shot" / f"{task}.json"
                source, dest = COMPARISON / "runs" / rel, HERE / "runs" / rel
                if source.is_file() and not dest.is_file():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, dest)
                    copied += 1
    print(f"zero-shot records reused from {COMPARISON.relative_to(ROOT)}/runs: {copied} copied")


def main() -> None:
    assert not set(CALIBRATION_MODULES) & set(SELECTION_MODULES)
    records = json.loads(ALPACA.read_text())
    if len(records) != 1000:
        raise SystemExit(f"{ALPACA}: expected 1000 records, found {len(records)}")
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("alpaca-calibration.json", records[:500]), ("alpaca-selection.json", records[500:])):
        write(name, json.dumps(part, indent=1) + "\n", f"{len(part)} records")
    print(f"Python {sys.version.split()[0]} standard library")
    for name, modules in (("python-calibration.txt", CALIBRATION_MODULES), ("python-selection.txt", SELECTION_MODULES)):
        text = python_text(modules)
        write(name, text, f"{len(modules)} modules, {len(text)} characters")
    reuse_zero_shot()


if __name__ == "__main__":
    main()
