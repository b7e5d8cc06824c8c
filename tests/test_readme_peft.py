"""The README's "Use with PEFT" section works when copied line by line.

Every ```bash and ```python block of that section runs, in order, in one fresh directory, with the
installed ``lora-da`` console script on PATH — exactly what a user pasting it would do.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _blocks(section: str) -> list[tuple[str, str]]:
    readme = (ROOT / "README.md").read_text()
    body = readme.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", body, re.S)


@pytest.mark.timeout(600)
def test_use_with_peft_section_runs_when_copied(tmp_path):
    blocks = _blocks("Use with PEFT")
    assert [lang for lang, _ in blocks].count("bash") >= 2
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    for i, (lang, code) in enumerate(blocks):
        cmd = (
            ["bash", "-euo", "pipefail", "-c", code]
            if lang == "bash"
            else [sys.executable, "-c", code]
        )
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, (
            f"README block {i} ({lang}) failed:\n{code}\n{done.stderr[-3000:]}"
        )
    assert (tmp_path / "tiny-adapter" / "adapter_config.json").exists()
    assert (tmp_path / "tiny-adapter-sub" / "base_model").is_dir()
