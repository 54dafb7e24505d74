"""The report of a real 3-seed sweep: tables, statistics, partial sweeps, one run, and the page in headless chromium."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageStat

from flux_lora.lifecycle.lease import Lease
from flux_lora.report.collect import collect, find_baseline
from flux_lora.report.stats import mean_interval
from tests.cli import ONE_THREAD, run_cli
from tests.report.cdp import Chromium, chromium_binary
from tests.report.conftest import copy_sweep, md_column, md_row
from tests.seed_sweep import Sweep


@pytest.mark.slow
def test_sweep_end_writes_the_report_before_any_evaluation(seed_sweep: Sweep) -> None:
    names = sorted(p.parent.name for p in seed_sweep.path.glob("*/run.json"))
    assert [n.split("_", 1)[1] for n in names] == [
        f"tiny-smoke-cpu-native-{cell}-seed{seed}" for cell in ("baseline", "a1_alpha") for seed in (1, 2, 3)
    ]
    assert f"report: {seed_sweep.path / 'report.html'}" in seed_sweep.launch_output
    md = seed_sweep.report_md_at_sweep_end
    assert md_column(md, "state", "a1_alpha") == "3 succeeded" and md_column(md, "seeds", "baseline") == "1, 2, 3"
    assert "val loss final" not in md_row(md, "cell")  # nothing evaluated yet: no column pretends otherwise
    assert md_column(md, "vs baseline (val loss final)", "a1_alpha") == "-"
    assert "6 of 6 runs have no eval/eval.json" in md


@pytest.mark.slow
def test_three_seeds_mark_a1_alpha_better_on_validation_loss(evaluated_sweep: Path) -> None:
    md = (evaluated_sweep / "report.md").read_text()
    # Every column that shows the validation loss says it was measured on held-out images (the default holds one out).
    assert md_column(md, "vs baseline (val loss final, held-out images)", "a1_alpha").startswith("better (p=")
    assert md_column(md, "changes", "a1_alpha") == "profile.network_alpha=8.0"
    # The cell's mean and interval are those of its three eval.json files.
    finals = [
        json.loads((d / "eval" / "eval.json").read_text())["validation"]["final"]["loss"]
        for d in sorted(evaluated_sweep.glob("*a1_alpha*"))
    ]
    estimate = mean_interval(finals)
    assert estimate is not None and estimate.half_width is not None
    assert (
        md_column(md, "val loss final (held-out images)", "a1_alpha")
        == f"{estimate.mean:.4f} ±{estimate.half_width:.4f}"
    )
    for column in ("load check", "face found", "diversity bits", "best step"):
        assert md_column(md, column, "a1_alpha") != "-", column
    assert "- **a1_alpha**: `profile.network_alpha: 1.0 -> 8.0`" in md  # config differences, nothing else
    cells = collect(evaluated_sweep)
    assert [c.name for c in cells] == ["baseline", "a1_alpha"] and find_baseline(cells) is cells[0]
    files = evaluated_sweep / "report_files"
    assert (files / "validation_loss.png").is_file() and (files / "training_loss.png").is_file()
    # The sample grid: one column per cell (seed 1), the no-LoRA image beside them, one row per sampled step.
    assert "| step | no LoRA (evaluator, seed 0) | baseline (seed 1) | a1_alpha (seed 1) |" in md
    assert [md_row(md, f"step {n}")[3].startswith("![](report_files/samples/") for n in (1, 2, 3)] == [True] * 3


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [value for name, value in attrs if name in ("src", "href") and value]


@pytest.mark.slow
@pytest.mark.skipif(chromium_binary() is None, reason="chromium not installed (.ci/run installs it with apt-get)")
def test_report_page_renders_offline_in_headless_chromium(evaluated_sweep: Path, tmp_path: Path) -> None:
    html = evaluated_sweep / "report.html"
    text = html.read_text()
    parser = _References()
    parser.feed(text)
    assert parser.refs and all(not ref.startswith(("http:", "https:", "//")) for ref in parser.refs)
    assert "url(" not in text and "<script" not in text and "<link" not in text
    for ref in parser.refs:
        assert (evaluated_sweep / ref).is_file(), ref

    # Copied elsewhere (an rsync to a laptop), the page still opens whole.
    moved = Path(
        shutil.copytree(evaluated_sweep, tmp_path / "moved", ignore=shutil.ignore_patterns("*-state", "*.safetensors"))
    )
    control = tmp_path / "control.html"
    control.write_text('<img src="http://example.com/x.png"><p>control</p>')
    with Chromium(width=1280, height=900) as browser:
        page = browser.open_page()
        browser.navigate(page, (moved / "report.html").as_uri())
        urls = browser.requested_urls(page)
        broken = browser.evaluate(
            page, "[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
        )
        images = browser.evaluate(page, "document.images.length")
        png = browser.screenshot(page)
        # The trap works: a page that does reach for the network is seen doing it.
        other = browser.open_page()
        browser.navigate(other, control.as_uri())
        control_urls = browser.requested_urls(other)
    assert urls and all(u.startswith("file://") for u in urls), urls
    assert images == len([r for r in parser.refs if r.endswith(".png")]) and broken == []
    assert any(u.startswith("http://example.com") for u in control_urls)
    shot = Image.open(BytesIO(png)).convert("L")
    assert shot.width >= 1280 and shot.height > 900  # the full page, not one screen
    assert (
        ImageStat.Stat(shot).stddev[0] > 20 and len(shot.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50
    )  # not blank


@pytest.mark.slow
def test_partial_sweep_shows_failed_and_running_cells(sweep_copy: Path) -> None:
    failed = next(sweep_copy.glob("*a1_alpha-seed3"))
    status = json.loads((failed / "status.json").read_text())
    (failed / "status.json").write_text(
        json.dumps({**status, "state": "failed", "reason": "non-finite loss at step 2"})
    )
    shutil.rmtree(failed / "eval")
    running = next(sweep_copy.glob("*baseline-seed3"))
    status = json.loads((running / "status.json").read_text())
    (running / "status.json").write_text(json.dumps({**status, "state": "running", "reason": None}))
    # Running means its owner lives: this test process holds the run id's lease while the report is made.
    outputs = Path(yaml.safe_load((running / "config.yaml").read_text())["paths"]["outputs"])
    lease = Lease.acquire(outputs, json.loads((running / "run.json").read_text())["run_id"])
    try:
        done = run_cli(str(sweep_copy), module="flux_lora.report", env=ONE_THREAD)
    finally:
        lease.release()
    assert done.returncode == 0, done.stderr
    md = (sweep_copy / "report.md").read_text()
    assert md_column(md, "state", "a1_alpha") == "2 succeeded; 1 failed: non-finite loss at step 2"
    assert md_column(md, "state", "baseline") == "2 succeeded; 1 running"
    assert md_column(md, "seeds", "a1_alpha") == "1, 2, 3"  # shown, never dropped
    assert "2 run(s) have not succeeded" in md
    # Two seeds a side remain: the statistics use them (n = 2).
    assert md_row(md, "val loss final (held-out images)")[2] == "2"


@pytest.mark.slow
def test_one_seed_per_cell_claims_no_significance(evaluated_sweep: Path, tmp_path: Path) -> None:
    one_seed = tmp_path / "one_seed"
    for run_dir in evaluated_sweep.glob("*-seed1"):
        shutil.copytree(run_dir, one_seed / run_dir.name, ignore=shutil.ignore_patterns("*-state"))
    assert run_cli(str(one_seed), module="flux_lora.report", env=ONE_THREAD).returncode == 0
    md = (one_seed / "report.md").read_text()
    assert "One seed per cell: no significance can be claimed" in md
    assert md_column(md, "vs baseline (val loss final, held-out images)", "a1_alpha") == "-"
    assert "±" not in md_row(md, "a1_alpha")[md_row(md, "cell").index("val loss final (held-out images)")]


@pytest.mark.slow
def test_single_run_dir_and_bad_paths(evaluated_sweep: Path, tmp_path: Path) -> None:
    run_dir = copy_sweep(next(evaluated_sweep.glob("*a1_alpha-seed2")), tmp_path / "run")
    done = run_cli(str(run_dir), module="flux_lora.report", env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    html = (run_dir / "report.html").read_text()
    assert "Run report:" in html and (run_dir / "report_files" / "validation_loss.png").is_file()
    missing = run_cli(str(tmp_path / "nowhere"), module="flux_lora.report", env=ONE_THREAD)
    assert (
        missing.returncode == 2
        and len(missing.stderr.strip().splitlines()) == 1
        and "no such directory" in missing.stderr
    )
    (tmp_path / "empty").mkdir()
    empty = run_cli(str(tmp_path / "empty"), module="flux_lora.report", env=ONE_THREAD)
    assert empty.returncode == 2 and "holds no run" in empty.stderr.strip()


@pytest.mark.slow
def test_cells_evaluated_on_other_terms_get_no_mark_and_a_line_saying_why(sweep_copy: Path) -> None:
    """a1_alpha evaluated again at 128 px (baseline at 64 px): its numbers are not on baseline's scale, so the report
    marks nothing better or worse and says what differs."""
    import torch

    from flux_lora.eval import EvalSettings, evaluate_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = EvalSettings(
            resolution=128, sample_steps=1, strengths=(0.5, 1.0), seeds=(0, 1), max_prompts_per_set=1, likeness=False
        )
        for run_dir in sorted(sweep_copy.glob("*a1_alpha-seed*")):
            assert evaluate_run(run_dir, settings, log=lambda _: None)["basis"]["resolution"] == 128
    finally:
        torch.set_num_threads(threads)
    done = run_cli(str(sweep_copy), module="flux_lora.report", env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    md = (sweep_copy / "report.md").read_text()
    assert (
        md_column(md, "vs baseline (val loss final, held-out images)", "a1_alpha")
        == "not compared: evaluated on other terms"
    )
    assert (
        "a1_alpha: evaluation numbers not compared with baseline, measured on other terms: resolution 128 vs 64" in md
    )
    assert "better" not in md_row(md, "a1_alpha")[-1] and "worse" not in md_row(md, "a1_alpha")[-1]


@pytest.mark.slow
def test_a_corrupt_status_json_is_said_not_shown_as_not_started(sweep_copy: Path) -> None:
    damaged = next(sweep_copy.glob("*baseline-seed2"))
    (damaged / "status.json").write_text('{"state": "succ')  # cut off mid-write by a full disk
    done = run_cli(str(sweep_copy), module="flux_lora.report", env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    assert f"warning: {damaged / 'status.json'}: status.json is unreadable (JSONDecodeError" in done.stderr
    md = (sweep_copy / "report.md").read_text()
    assert md_column(md, "state", "baseline").startswith("2 succeeded; 1 status unreadable: status.json is unreadable")
    assert "not started" not in md


@pytest.mark.slow
def test_an_external_lora_evaluation_sits_beside_the_sweeps_cells(sweep_copy: Path, judged_diffusers_lora) -> None:
    """`python -m flux_lora.report SWEEP --with EVAL_DIR`: a LoRA file judged by `python -m flux_lora.eval --lora`
    is a cell of its own, and, validated on another image set, is not marked against baseline."""
    _, _, done, judged = judged_diffusers_lora
    assert done.returncode == 0, done.stderr[-2000:]
    done = run_cli(str(sweep_copy), "--with", str(judged), module="flux_lora.report", env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    md = (sweep_copy / "report.md").read_text()
    row = md_row(md, "pytorch_lora_weights (external file)")
    assert md_column(md, "state", "pytorch_lora_weights (external file)").startswith("external: ")
    assert row[md_row(md, "cell").index("val loss final (mixed image sets)")] != "-"
    assert (
        md_column(md, "vs baseline (val loss final, mixed image sets)", "pytorch_lora_weights (external file)")
        == "not compared: evaluated on other terms"
    )
