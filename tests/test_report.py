"""The report (equiav/eval/report.py, workflow/rules/report.smk): its pieces, and the whole page
of the small demo run rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from workflow_runner import snakemake

from equiav.augment import VisualAugment, VisualAugmentConfig, normalize_image
from equiav.eval import paper_numbers
from equiav.eval import report as rp
from equiav.model import EquiAV, ModelConfig

# --------------------------------------------------------------------------- pieces


def test_markdown_tables_become_html_tables():
    page = rp.markdown_page("# T\n\ntext `x`\n\n| a | b |\n|---|---|\n| 1 | 2 |\n", "The <title>")
    assert "<table>" in page and "<td>1</td>" in page and "<h1>T</h1>" in page
    assert "<title>The &lt;title&gt;</title>" in page


def test_spread_keeps_both_ends_and_the_order():
    items = [f"c{k}" for k in range(10)]
    assert rp.spread(items, 3) == ["c0", "c4", "c9"]
    assert rp.spread(items, 20) == items
    assert rp.spread(["only"], 4) == ["only"]


def test_the_frame_shown_is_the_augmentation_nearest_the_centroid():
    torch.manual_seed(0)
    model = EquiAV(ModelConfig.tiny(image_size=32)).eval()
    frame = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    chosen = rp.nearest_to_centroid(model, frame, candidates=24, seed=5, device=torch.device("cpu"))

    # Brute force: augment every candidate from its own draw and recompute the features.
    augment = VisualAugment(VisualAugmentConfig(size=32))
    images, params = zip(*(augment(frame[None], generator=rp._candidate_generator(5, i)) for i in range(24)))
    with torch.inference_mode():
        tokens = model.visual_encoder(normalize_image(frame[None]))
        features = torch.cat([model.visual_predictor(tokens, p) for p in params])
    cosine = torch.nn.functional.cosine_similarity(features, features.mean(0, keepdim=True))
    assert chosen["nearest_cosine"] == pytest.approx(float(cosine.max()), abs=1e-5)
    assert chosen["farthest_cosine"] == pytest.approx(float(cosine.min()), abs=1e-5)
    assert torch.equal(chosen["nearest"], rp._unnormalise(images[int(cosine.argmax())][0]))
    assert torch.equal(chosen["farthest"], rp._unnormalise(images[int(cosine.argmin())][0]))


def test_a_model_without_predictor_is_refused_clearly():
    model = EquiAV(ModelConfig.tiny(image_size=32, intra="invariant", inter_source="clean"))
    frame = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="no transformation predictor"):
        rp.nearest_to_centroid(model, frame, candidates=4, seed=0, device=torch.device("cpu"))


def test_curves_need_a_pretraining_history(tmp_path):
    with pytest.raises(ValueError, match="lack columns"):
        rp.plot_pretrain_curves(pd.DataFrame({"step": [0], "loss": [1.0]}), "x", tmp_path / "c.png")


# --------------------------------------------------------------------------- the whole page

BROWSER_PACKAGES = {"chromium": "/usr/bin/chromium", "chromium-driver": "/usr/bin/chromedriver"}


@pytest.fixture(scope="session")
def chromium() -> dict[str, str]:
    """Debian's Chromium and its WebDriver, installed with apt-get when missing (CI runs as root)."""
    missing = [name for name, path in BROWSER_PACKAGES.items() if not Path(path).exists()]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip(f"needs Debian packages {missing} (apt-get install {' '.join(missing)}, as root)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
        subprocess.run([*apt, "update", "-qq"], check=True, env=env, capture_output=True)
        subprocess.run([*apt, "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env,
                       capture_output=True)  # fmt: skip
    return BROWSER_PACKAGES


@pytest.fixture(scope="session")
def demo_report(demo_run: Path) -> Path:
    report = demo_run / "report.html"
    snakemake("--configfile", str(demo_run / "small.yaml"), "--report", str(report))
    return report


@pytest.fixture
def browser(chromium: dict[str, str]):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium["chromium"]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromium["chromium-driver"]), options=options)
    yield driver
    driver.quit()


def _show(driver, path: str) -> None:
    """What the result's eye button does: display the result in the content pane."""
    driver.execute_script(
        "const entry = results[arguments[0]];"
        "app.setView({content: arguments[1], contentPath: entry.data_uri, resultPath: arguments[0]});",
        path,
        "img" if path.endswith(".png") else "html",
    )


def test_the_demo_report_renders_its_tables_and_pictures(demo_run, demo_report, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    results = demo_run / "results"
    browser.get(demo_report.as_uri())
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.execute_script("return typeof app !== 'undefined' && typeof results !== 'undefined'"))
    categories = browser.execute_script("return Object.keys(categories)")
    assert set(categories) == {"Data", "Tables", "Training", "Retrieval", "Qualitative"}
    # The menu lists the categories for the user to open.
    menu = browser.find_element(By.TAG_NAME, "nav").text if browser.find_elements(By.TAG_NAME, "nav") else ""
    assert all(c in browser.find_element(By.ID, "app").text or c in menu for c in categories)

    paths = browser.execute_script("return Object.keys(results)")
    pictures = [p for p in paths if p.endswith(".png")]
    pages = [p for p in paths if p.endswith(".html")]
    assert len(pictures) == 1 + 1 + 2 + 1  # pre-training curves, fine-tuning curves, v2a + a2v, qualitative
    assert len(pages) == 3 + 1 + 1  # Tables 1-3, the demo table, the availability report

    for path in pictures:
        _show(browser, path)
        wait.until(lambda d: d.execute_script(
            "const img = document.querySelector('#app img[src^=\"data:image/png\"]');"
            "return img !== null && img.complete && img.naturalWidth > 100;"
        ), message=f"{path} did not render")  # fmt: skip

    for path in pages:
        _show(browser, path)
        frame = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#app iframe"))
        browser.switch_to.frame(frame)
        cells = wait.until(lambda d: d.find_elements(By.TAG_NAME, "td"), message=f"{path} shows no table")
        text = browser.find_element(By.TAG_NAME, "body").text
        browser.switch_to.default_content()
        assert cells
        if "availability" in path:
            status = pd.read_csv(results / "demo" / "status.csv")
            listed = (status["split"] == "test").sum()
            assert f"test {listed} " in text  # the split's row: split, clips listed, ...
        elif "table" in Path(path).stem:
            # The main tables have the paper's numbers, and no run of ours in the demo.
            row, values = next(iter(paper_numbers.PAPER_EQUIAV[Path(path).stem].items()))
            first = next(v for v in values if v is not None)
            assert f"{row} {first:.1f} / –" in text
        else:
            # Each of our numbers in the table is the metric file's, in percent.
            for modality in ("audio", "visual", "audiovisual"):
                value = json.loads((results / f"finetune/demo_{modality}/metrics.json").read_text())["value"]
                assert f"/ {100 * value:.1f}" in text
            retrieval = json.loads((results / "retrieval/demo/metrics.json").read_text())
            assert f"/ {100 * retrieval['v2a']['R@5']:.1f}" in text
