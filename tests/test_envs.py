"""The conda environments in envs/ and requirements.txt pin the same versions."""

import re

import yaml

from .models_for_tests import REPO


def pins(lines):
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if match:
            out[match.group(1).lower().replace("_", "-")] = match.group(2)
    return out


def test_every_env_agrees_with_requirements():
    requirements = pins((REPO / "requirements.txt").read_text().splitlines())
    assert "transformers" in requirements and "torch" not in requirements
    env_files = sorted((REPO / "envs").glob("*.yaml"))
    assert env_files
    for env_file in env_files:
        env = yaml.safe_load(env_file.read_text())
        pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
        env_pins = pins(pip_section)
        shared = set(env_pins) & set(requirements)
        assert shared, env_file
        for name in shared:
            assert env_pins[name] == requirements[name], f"{env_file.name}: {name} {env_pins[name]} != {requirements[name]}"
        # runtime requirements (all but test tools) must be in every env that runs rules
        missing = set(requirements) - set(env_pins) - {"pytest", "pytest-xdist"}  # test tools
        assert not missing, f"{env_file.name} lacks {sorted(missing)}"
        assert any(str(d).startswith("python") for d in env["dependencies"])


def test_every_rule_names_an_existing_env_and_log():
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        for env in re.findall(r'conda:\s*\n\s*"([^"]+)"', text):
            assert (smk.parent / env).resolve().is_file(), f"{smk.name}: {env}"
        assert text.count("rule ") == text.count("log:") or smk.name == "common.smk", smk.name
