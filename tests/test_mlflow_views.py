"""What MLflow's UI shows of tuneline (issue 30): addresses that open the model-training view, and the
model card variant whose samples MLflow's artifact preview renders. No MLflow store here (see
test_tracking.py for runs)."""

from __future__ import annotations

import base64
import re

from PIL import Image

from tuneline.core.tracking.config import TrackingConfig
from tuneline.core.tracking.links import artifact_url, experiments_url, run_url, runs_url, ui_base


def test_links_name_the_runs_list_or_the_run_page_in_the_model_training_view():
    base = ui_base(TrackingConfig())
    assert base == "http://127.0.0.1:5000" and ui_base(TrackingConfig(), port=5123) == "http://127.0.0.1:5123"
    assert ui_base(TrackingConfig(tracking_uri="https://mlflow.example/")) == "https://mlflow.example"
    assert experiments_url(base) == "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    assert runs_url(base, "7") == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert run_url(base, "7", "abc") == "http://127.0.0.1:5000/#/experiments/7/runs/abc?workflowType=machine_learning"
    assert artifact_url(base, "7", "abc", "export/model_card.html") == (
        "http://127.0.0.1:5000/#/experiments/7/runs/abc/artifacts/export/model_card.html"
        "?workflowType=machine_learning")


def test_the_mlflow_card_inlines_the_samples_the_hub_card_links(tmp_path):
    from tuneline.stages.export.metadata import card_html

    sample = tmp_path / "0.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(sample)
    markdown = ("# demo\n\n- steps: `4`\n\n## Samples\n\n![sample](samples/0.png)\n\n"
                "![other](https://example.com/x.png)\n")
    page = card_html(markdown, {"samples/0.png": sample})
    assert "<h1>demo</h1>" in page and "<code>4</code>" in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources[1] == "https://example.com/x.png"  # only the named files are inlined
    assert sources[0].startswith("data:image/png;base64,")
    assert base64.b64decode(sources[0].split(",", 1)[1]) == sample.read_bytes()
    assert "samples/0.png" not in page and "![" not in page  # no relative link, no literal markdown
