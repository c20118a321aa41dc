"""The README's config reference stays in step with the key table the CLI is built from."""

from pathlib import Path

from aegis.config import KEYS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_readme_lists_every_key_with_its_flag():
    rows = {line.split("|")[1].strip().strip("`"): line
            for line in README.splitlines() if line.startswith("| `")}
    missing = [k.name for k in KEYS if k.name not in rows]
    assert not missing, f"README config reference lacks {missing}"
    for key in KEYS:
        assert key.flag.split()[0] in rows[key.name], f"{key.name}: flag {key.flag} not in README"


def test_readme_quick_start_commands_exist():
    root = Path(__file__).resolve().parents[2]
    for script in ("scripts/demo", "scripts/test"):
        assert f"{script} " in README or f"{script}\n" in README
        assert (root / script).stat().st_mode & 0o111, f"{script} is not executable"
    assert "exec scripts/test" in (root / ".ci" / "run").read_text()


def test_demo_config_is_valid(tmp_path):
    # scripts/demo writes its config from a here-document; a key the config later refuses
    # (instance_env VLLM_CACHE_ROOT once) made the quick start fail before anything started.
    import re

    from aegis.config import load_config

    demo = (Path(__file__).resolve().parents[2] / "scripts" / "demo").read_text()
    (body,) = re.findall(r"<<YAML\n(.*?)\nYAML\n", demo, re.S)
    values = {"MODEL": str(tmp_path / "tiny"), "DEMO_DIR": str(tmp_path), "PORT": "8300",
              "VLLM_VENV": str(tmp_path / "venv")}
    text = re.sub(r"\$(\w+)", lambda m: values[m.group(1)], body)
    (tmp_path / "config.yaml").write_text(text)
    config = load_config(str(tmp_path / "config.yaml"))
    assert config.platform == "local" and config.models[0].instances == 2
