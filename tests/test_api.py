"""The README's Python API example, run as written on tiny data (only the training length and the
image grid are shrunk), and the four names with their docstrings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import pipeline

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
TINY = ('train_steps=2, image_size=16, pixdim=4, modalities=["FLAIR"], unet_channels=[8, 8, 8], '
        'norm_num_groups=8, num_head_channels=8, batch_size=4, num_workers=1, progress=False')


def test_the_api_names_are_documented_and_lazy():
    for name in ("train", "score", "evaluate", "benchmark"):
        assert name in pipeline.__all__ and name in dir(pipeline)
        assert len(getattr(pipeline, name).__doc__.strip().splitlines()[0]) > 30
    with pytest.raises(AttributeError):
        pipeline.frobnicate  # noqa: B018


def test_the_readme_example_runs(synth_root, tmp_path, monkeypatch):
    code = re.search(r"## Python API.*?```python\n(.*?)```", README, flags=re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(synth_root)
    code = code.replace("train_steps=1500", TINY).replace('"runs/scores", model_path=model,',
                                                          '"runs/scores", model_path=model, image_size=16, '
                                                          'pixdim=4, t_start=20, progress=False,')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
    metrics = namespace["metrics"]
    assert 0.0 <= metrics["test"]["auprc"] <= 1.0 and (tmp_path / "runs" / "evaluation" / "report.png").is_file()
    assert namespace["model"] == Path("runs/model/model.pt") and namespace["model"].is_file()
