"""The docs stay in step with the code: the config reference is generated, the README opens with
the two commands, and CI runs the README's test command."""

import os

from ray_dafusion.config import config_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_configuration_reference_matches_the_config_classes():
    assert _read("docs", "configuration.md") == config_reference(), (
        "docs/configuration.md is out of date; regenerate it with the command at its top"
    )


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = _read("README.md")
    first_block = readme.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    ci = [line.strip() for line in _read(".ci", "run").splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == "make test"


def test_every_docs_page_is_linked_from_the_readme():
    readme = _read("README.md")
    for name in sorted(os.listdir(os.path.join(ROOT, "docs"))):
        if name.endswith(".md"):
            assert f"docs/{name}" in readme, f"README does not link docs/{name}"


def test_output_schema_page_names_every_column():
    from ray_dafusion import schema

    page = _read("docs", "output-schema.md")
    for columns in (schema.REAL_COLUMNS, schema.SYNTHETIC_COLUMNS, schema.ERROR_COLUMNS):
        for name in columns:
            assert f"`{name}`" in page, f"docs/output-schema.md does not describe column {name}"
