"""RUN_DIR/report.html: the run's content on one offline page, and a partial page after a failed stage."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lora_pipeline.config import Config
from lora_pipeline.reports.run_page import render_run_report, write_run_report
from test_register import make_run


def full_run(root: Path) -> Path:
    run_dir = make_run(root)
    config = Config().to_dict()
    config["train"]["lora_r"] = 32
    config["registry"]["token"] = "<redacted>"
    manifest = {
        "run_dir": str(run_dir),
        "status": "completed",
        "started": "2026-01-02T03:04:05+0000",
        "finished": "2026-01-02T03:14:05+0000",
        "versions": {"python": "3.11.7", "torch": "2.13.0"},
        "config": config,
        "stages": {
            "dataset": {"status": "ran", "seconds": 1.25},
            "train": {"status": "ran", "seconds": 612.5},
            "eval": {"status": "cached"},
            "register": {"status": "ran", "seconds": 0.2},
        },
    }
    (run_dir / "run.json").write_text(json.dumps(manifest))
    dataset = json.loads((run_dir / "dataset" / "dataset.json").read_text())
    dataset.update(rows_read=104, rows_valid=100, rows_used=100)
    dataset["dropped"] = {"empty_messages": {"count": 3, "first_rows": ["chat.jsonl:7"]}, "not_json": {"count": 1}}
    (run_dir / "dataset" / "dataset.json").write_text(json.dumps(dataset))
    metrics = json.loads((run_dir / "train" / "metrics.json").read_text())
    metrics["history"] = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-4} for s in range(1, 21)]
    metrics["history"].append({"step": 20, "eval_loss": 0.61})
    metrics.update(world_size=2, batching={"padding_share": 0.0123})
    metrics["memory"] = {"estimate": {"total": 300 * 2**20}, "peak": {"rss_peak_bytes": 1234 * 2**20}}
    (run_dir / "train" / "metrics.json").write_text(json.dumps(metrics))
    samples = run_dir / "eval" / "samples"
    samples.mkdir()
    choices = [["Q: <b>cat</b>?", " animal"], ["Q: <b>cat</b>?", " fruit"]]
    row = {"doc_id": 0, "doc": {"question": "Is a <b>cat</b> an animal?"}, "target": 0, "arguments": choices}
    (samples / "tuned_demo_topic.jsonl").write_text(json.dumps({**row, "filtered_resps": [[-0.1, True], [-3, 0]]}))
    (samples / "base_demo_topic.jsonl").write_text(json.dumps({**row, "filtered_resps": [[-4, 0], [-0.2, True]]}))
    (run_dir / "register").mkdir()
    registration = {"status": "registered", "model_name": "topic", "version": "1.2.3", "registry_kind": "local"}
    registration.update(registry="/data/registry.db", uri="/runs/x/train/adapter", model_version_id="7")
    (run_dir / "register" / "registration.json").write_text(json.dumps(registration))
    return run_dir


def test_report_shows_the_whole_run(tmp_path: Path) -> None:
    path = write_run_report(full_run(tmp_path / "run"))
    assert path == tmp_path / "run" / "report.html"
    page = path.read_text()
    for text in (
        "completed",
        "612.5s",  # stage timings
        "empty_messages",  # dropped rows by reason, with their first row
        "chat.jsonl:7",
        "104",
        "phase_02_train_man_lora_r",  # a KFP name beside the flag
        "--train.lora_r",
        "<svg",  # the loss chart, inline
        "0.2000",  # base score
        "+0.7000",  # delta
        "strict-match",
        "Is a &lt;b&gt;cat&lt;/b&gt; an animal?",  # sample input, escaped
        "✓ animal",  # tuned prediction right
        "✗ fruit",  # base prediction wrong
        "topic <b>1.2.3</b>",
        "/data/registry.db",
        "1.2%",  # padding share
        "1,234 MiB",  # peak memory
        "300 MiB",  # expected memory
    ):
        assert text in page, text
    assert "<redacted>" not in page and "&lt;redacted&gt;" in page  # shown escaped, never as markup


def test_report_is_self_contained(tmp_path: Path) -> None:
    page = render_run_report(full_run(tmp_path / "run"))
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    assert not re.search(r"\b(src|href)\s*=", page)  # no image, stylesheet or link to load
    urls = set(re.findall(r"https?://[^\s\"'<>]+", page))
    assert urls <= {"http://www.w3.org/2000/svg", "https://example.org/chat.jsonl?&lt;redacted&gt;"}, urls


def test_report_of_a_run_that_stopped_at_train(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    manifest = {
        "status": "failed",
        "config": Config().to_dict(),
        "stages": {"dataset": {"status": "ran", "seconds": 0.5}, "train": {"status": "failed", "error": "boom <x>"}},
    }
    (run_dir / "run.json").write_text(json.dumps(manifest))
    page = render_run_report(run_dir)
    assert "failed" in page and "boom &lt;x&gt;" in page
    assert "No output from the train stage" in page and "No output from the register stage" in page


def test_training_section_leads_with_the_final_loss_and_labels_the_mean(tmp_path: Path) -> None:
    page = render_run_report(full_run(tmp_path / "run"))
    training = page[page.index("Training") :]
    first = re.search(r"<dt>([^<]*)</dt><dd>([^<]*)</dd>", training)
    assert first and first.groups() == ("final loss", "0.4")  # make_run: final 0.4, mean 0.5
    labels = re.findall(r"<dt>([^<]*)</dt><dd>0\.5</dd>", training)
    assert labels and all("mean" in label for label in labels)
