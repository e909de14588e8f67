"""The README's commands are the ones CI runs, and its Python example works."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_leads_with_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    assert len(blocks) >= 2
    main_job, tests = blocks[0], blocks[1]
    assert main_job.split("&&")[-1].strip().startswith("kvdepot demo")
    assert "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_readme_python_example_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    code = code.replace('"4GiB"', '"64MiB"').replace("/var/cache/kvdepot", str(tmp_path / "c"))
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["num_cached"] == 1000
    assert namespace["num_shared"] == 900
    assert tuple(namespace["cached_kv"].shape) == (30, 2, 1000, 3, 64)  # type: ignore[attr-defined]
    assert any((tmp_path / "c").rglob("*.kvc"))
