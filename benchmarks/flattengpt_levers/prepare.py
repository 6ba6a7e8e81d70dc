"""Split ../shared/data/text/alpaca_data_1k.json into the study's calibration half and its selection half.

    .venv/bin/python benchmarks/flattengpt_levers/prepare.py

Records 0-499 go to results/flattengpt_levers/data/alpaca-calibration.json (the instruction part of
the mixed-calibration lever), records 500-999 to alpaca-selection.json (the text the settings are
chosen on: neither a calibration set nor a reported corpus). The files are derived, not committed;
the calibration and perplexity records of the stages that read them carry their sha256.
"""

import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT.parent / "shared" / "data" / "text" / "alpaca_data_1k.json"
OUT = ROOT / "results" / "flattengpt_levers" / "data"


def main() -> None:
    records = json.loads(SOURCE.read_text())
    if len(records) != 1000:
        raise SystemExit(f"{SOURCE}: expected 1000 records, found {len(records)}")
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("alpaca-calibration.json", records[:500]), ("alpaca-selection.json", records[500:])):
        path = OUT / name
        text = json.dumps(part, indent=1) + "\n"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
        print(f"{path.relative_to(ROOT)}: {len(part)} records, sha256 {hashlib.sha256(text.encode()).hexdigest()}")


if __name__ == "__main__":
    main()
