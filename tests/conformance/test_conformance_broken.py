"""The suite catches deliberately broken implementations.

Each case runs the relevant subset of the suite in a child pytest against a
small broken variant (cf_targets.FakeHub / FakeAgent, cf_codec.HeaderCrcBlindCodec)
and asserts that the run fails, naming the test that caught it; the same
subset against the variant's correct twin must pass, so the failure is the
defect's and not the fake's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

CASES = {
    # name: (environment, test file, -k expression, test that must fail, correct twin env)
    "hub-acks-before-durability": (
        {"REPAGENT_CONF_VARIANT": "broken-hub"}, "test_conformance_hub.py",
        "acked_writes_survive", "test_acked_writes_survive_a_crash",
        {"REPAGENT_CONF_VARIANT": "fake-hub"}),
    "agent-clears-dirty-without-ack": (
        {"REPAGENT_CONF_VARIANT": "broken-agent"}, "test_conformance_agent.py",
        "ack_withholding", "test_ack_withholding_keeps_the_region_dirty",
        {"REPAGENT_CONF_VARIANT": "fake-agent"}),
    "codec-ignores-header-crc": (
        {"REPAGENT_CONF_CODEC": "broken-header-crc"}, "test_conformance_codec.py",
        "rejects_malformed or header_crc", "test_codec_rejects_malformed_vector[malformed:bad_header_crc]",
        {"REPAGENT_CONF_CODEC": "independent"}),
}


def run_suite(env_extra: dict, test_file: str, expr: str, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPAGENT_CONF_")}
    env.update(env_extra)
    env["REPAGENT_CONF_REPORT"] = str(tmp_path / "report")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         str(HERE / test_file), "-k", expr], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=120)


@pytest.fixture(autouse=True)
def only_for_the_reference_run(setup):
    if setup.hub or setup.agent_listen:
        pytest.skip("the suite's self-test runs only when no external implementation is judged")


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_variant_is_caught(case, tmp_path):
    broken_env, test_file, expr, culprit, twin_env = CASES[case]
    broken = run_suite(broken_env, test_file, expr, tmp_path / "broken")
    out = broken.stdout + broken.stderr
    assert broken.returncode == 1, f"the suite passed a broken variant ({case}):\n{out[-3000:]}"
    assert f"FAILED tests/conformance/{test_file}::{culprit}" in out, out[-3000:]
    twin = run_suite(twin_env, test_file, expr, tmp_path / "twin")
    assert twin.returncode == 0, f"the correct twin of {case} fails:\n{(twin.stdout + twin.stderr)[-3000:]}"
