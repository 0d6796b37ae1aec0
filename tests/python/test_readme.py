"""The README's Python block runs as written (in a scratch folder, so its runs/ go there)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_readme_python_block_runs(tmp_path, monkeypatch, capsys):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"## Python\n\n```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "the README's Python section should hold one block"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(blocks[0], "README.md (Python block)", "exec"), namespace)
    assert namespace["y"].shape == (8, 256) and namespace["m"].step == 20
    assert (tmp_path / "runs" / "readme" / "metrics.jsonl").exists()
    assert len(capsys.readouterr().out) > 0  # the streamed text
