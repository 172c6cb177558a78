"""The example plugin package under plugins/ installs into a fresh environment beside qvl-pipeline and its plugin
is then chosen like a built-in: as `attention=online_softmax`, in a chain, with its own options, in --help."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "plugins" / "example"


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory) -> Path:
    """A new virtual environment that sees this one's packages (torch, qvl-pipeline) and gets the example
    plugin package installed into its own site-packages."""
    fresh = tmp_path_factory.mktemp("fresh")
    env_dir = fresh / "venv"
    # Built from a private copy: setuptools builds in the source tree (build/, *.egg-info), and two xdist workers
    # installing from plugins/example at once collided there ("File exists: build/bdist...").
    source = shutil.copytree(EXAMPLE, fresh / "example", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    parent = sysconfig.get_path("purelib")
    Path(site, "parent_env.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              str(source)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    return python


def run(python: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(python), "-m", "qvl_pipeline", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


QUICK = ("output=json", "progress=false", "generate.max_new_tokens=4", "prompt=Describe.")


def test_installed_plugin_is_an_option_of_its_group(fresh_python):
    chosen = run(fresh_python, "attention=online_softmax", "attention.options.online_softmax.block_size=16", *QUICK)
    assert chosen.returncode == 0, chosen.stderr
    result = json.loads(chosen.stdout)
    decision = result["plan"]["slots"]["attention"]
    assert decision["chosen"] == "online_softmax" and decision["how"] == "explicit"
    assert decision["origin"] == "qvl-example-plugin 0.1.0" and decision["options"] == {"block_size": 16}
    reference = json.loads(run(fresh_python, "attention=eager", *QUICK).stdout)
    assert result["token_ids"] == reference["token_ids"]          # an exact plugin: the same greedy tokens


def test_installed_plugin_as_a_chain_entry_and_in_help(fresh_python):
    chained = run(fresh_python, "hardware.chains.attention=[online_softmax,eager]", *QUICK)
    assert chained.returncode == 0, chained.stderr
    assert json.loads(chained.stdout)["plan"]["slots"]["attention"]["chosen"] == "online_softmax"
    helped = run(fresh_python, "--help")
    assert "online_softmax" in helped.stdout


def test_plugin_authors_own_tests_pass_in_the_fresh_environment(fresh_python):
    tests = subprocess.run([str(fresh_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                           capture_output=True, text=True, timeout=300, cwd=EXAMPLE)
    assert tests.returncode == 0, tests.stdout + tests.stderr


def test_this_environment_does_not_have_it():
    from qvl_pipeline.registry import PluginRegistry

    assert "online_softmax" not in PluginRegistry().names("attention")
