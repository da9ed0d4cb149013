"""The web page in a real browser (Playwright driving Debian's chromium) against the three services
as processes, and the sender routes the page uses.

The browser tests need /usr/bin/chromium (`make install` installs it with apt-get); they are
skipped only where it is missing and apt-get is not there to install it. With
GESCO_WEB_SCREENSHOT=docs/web-page.png the page is also photographed, after a run at the default
sampling steps and an SNR strip, for docs/web-page.md.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import httpx
import numpy as np
import pytest

from gesco import cli
from shared.paths import REPO_ROOT
from tests.link_services import LinkServices
from tests.service_procs import free_port

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = os.environ.get("GESCO_WEB_SCREENSHOT", "")
LOOPBACK = {"127.0.0.1", "localhost"}
STAGE_IMAGES = ("img-input", "img-segmentation", "img-received", "img-fds", "img-generated")
# The page's images that are on screen and show no picture: the browser draws its broken-image icon.
BROKEN_IMAGES = """() => Array.from(document.images).filter(img => img.getClientRects().length > 0
    && (!img.getAttribute('src') || (img.complete && img.naturalWidth === 0))).map(img => img.alt)"""


needs_browser = pytest.mark.skipif(not CHROMIUM.exists() and not shutil.which("apt-get"),
                                   reason=f"{CHROMIUM} is missing and apt-get is not available to install it")


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> Iterator[LinkServices]:
    link = LinkServices(tmp_path_factory.mktemp("web"))
    yield link
    link.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not CHROMIUM.exists():  # apt-get is there (needs_browser skips otherwise): CI must run these
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (make install does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


class PageProbe:
    """A page with its console errors, uncaught exceptions and any request leaving loopback."""

    def __init__(self, browser, width: int = 1280, height: int = 900) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.external: list[str] = []
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.route("**/*", self._only_loopback)

    def _only_loopback(self, route) -> None:
        url = route.request.url
        if url.startswith(("data:", "blob:")) or urlsplit(url).hostname in LOOPBACK:
            route.continue_()
        else:
            self.external.append(url)
            route.abort()

    def natural_width(self, selector: str) -> int:
        return self.page.eval_on_selector(selector, "img => img.naturalWidth")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def probe(browser) -> Iterator[PageProbe]:
    page = PageProbe(browser)
    yield page
    page.close()


def open_page(probe: PageProbe, services: LinkServices) -> None:
    probe.page.goto(services.sender_url + "/")
    probe.page.wait_for_function("document.querySelectorAll('#example option').length >= 3")
    probe.page.wait_for_function("document.querySelectorAll('#legend li').length === 12")
    probe.page.wait_for_function("document.getElementById('channel').value !== ''")  # GET /v1/options


def wait_for_status(probe: PageProbe, prefix: str, timeout_s: float = 240) -> None:
    """Until #status starts with `prefix`; a shown error fails at once with its text."""
    probe.page.wait_for_function(
        "prefix => document.getElementById('status').textContent.startsWith(prefix)"
        " || !document.getElementById('error').hidden", arg=prefix, timeout=timeout_s * 1000)
    error = probe.page.locator("#error")
    assert error.is_hidden(), error.text_content()


def assert_no_broken_images(probe: PageProbe) -> None:
    """Every image on screen shows a picture, or the empty frame (no broken-image icon)."""
    try:
        probe.page.wait_for_function(f"({BROKEN_IMAGES})().length === 0", timeout=5000)
    except Exception:
        raise AssertionError(f"broken images: {probe.page.evaluate(BROKEN_IMAGES)}") from None


@needs_browser
def test_the_page_sends_the_example_and_shows_every_stage(services, probe) -> None:
    open_page(probe, services)
    page = probe.page
    assert page.input_value("#example") == "street_labels.png"  # the drawn street is the default
    assert page.input_value("#kind") == "" and "Detected: a label map" in page.inner_text("#kind-note")
    assert_no_broken_images(probe)  # the empty stages before any Send
    if not SCREENSHOT:
        page.fill("#steps", "2")
    page.fill("#seed", "7")
    page.fill("#snr_db", "10")
    page.click("#send")
    wait_for_status(probe, "done")
    for image in STAGE_IMAGES:
        assert probe.natural_width(f"#{image}") > 0, image
    # the generated image at its own size, with what made it
    shown = page.evaluate("() => { const img = document.querySelector('#img-generated');"
                          " return [img.clientWidth, img.naturalWidth, img.naturalHeight]; }")
    assert shown[0] == shown[1], shown
    caption = page.inner_text("#caption-generated")
    assert f"{shown[1]}x{shown[2]}" in caption and "sample by gesco-camvid" in caption, caption
    tiles = page.locator("#transmitted-maps img")
    assert tiles.count() == 10  # the classes present in the drawn street
    for index in range(tiles.count()):
        assert tiles.nth(index).evaluate("img => img.naturalWidth") > 0
    numbers = page.locator("#numbers").inner_text()
    assert "measured" in numbers and "awgn" in numbers and "channel uses" in numbers
    assert "bandwidth ratio" in numbers and "analog symbols" in numbers
    assert "Receiver timings" in numbers and "sample" in numbers and "trained" in numbers
    assert page.locator("#legend li:not(.absent)").count() == 10
    if SCREENSHOT:
        page.click("#strip-button")
        wait_for_status(probe, "strip done", timeout_s=400)
        page.screenshot(path=str(REPO_ROOT / SCREENSHOT), full_page=True)
    assert probe.errors == [] and probe.external == []


@needs_browser
def test_the_snr_strip_shows_the_semantic_and_the_analog_row(services, probe) -> None:
    open_page(probe, services)
    page = probe.page
    page.fill("#steps", "2")
    page.click("#strip-button")
    page.wait_for_selector("#strip img")
    assert_no_broken_images(probe)  # the strip's cells before their images come
    wait_for_status(probe, "strip done", timeout_s=300)
    images = page.locator("#strip img")
    assert images.count() == 10
    for index in range(10):
        assert images.nth(index).evaluate("img => img.naturalWidth") > 0
    captions = page.locator("#strip figcaption").all_inner_texts()
    assert all(caption.startswith("measured") for caption in captions), captions
    assert probe.errors == [] and probe.external == []


@needs_browser
def test_sampling_progress_is_shown_and_cancel_stops_it(services, probe) -> None:
    open_page(probe, services)
    page = probe.page
    page.select_option("#sampler", "ddim")
    page.fill("#steps", "400")  # long enough to be watched and cancelled
    page.click("#send")
    page.wait_for_function("/^sampling: step \\d+ of 400$/.test(document.getElementById('status').textContent)",
                           timeout=120_000)
    assert page.eval_on_selector("#progress", "bar => !bar.hidden && bar.max === 400")
    page.click("#cancel")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('cancelled: ')",
                           timeout=60_000)
    assert page.locator("#error").is_hidden()  # the user's own cancel is no error
    assert not page.is_disabled("#send") and page.is_disabled("#cancel")
    assert_no_broken_images(probe)


@needs_browser
def test_a_bad_upload_shows_the_apis_message(services, probe) -> None:
    open_page(probe, services)
    page = probe.page
    page.set_input_files("#upload", files=[{"name": "notes.jpg", "mimeType": "image/jpeg",
                                            "buffer": b"these are notes, not a photo"}])
    assert page.input_value("#example") == ""
    page.wait_for_function("document.getElementById('kind-note').textContent.includes('a photo (not a PNG)')")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    text = page.locator("#error").inner_text()
    assert text.startswith("HTTP 400: ") and "not a recognised image" in text and "(field: file)" in text
    assert_no_broken_images(probe)
    # The browser logs the failed request itself; nothing else may go wrong.
    assert all("status of 400" in error for error in probe.errors), probe.errors


@needs_browser
def test_a_busy_receiver_is_shown_with_the_apis_message_and_retry_after(services, probe) -> None:
    """A 429 as the sender answers it when the receiver's queue is full (the answer is stubbed in
    the browser: filling the real queue would take minutes of sampling)."""
    open_page(probe, services)
    page = probe.page
    page.route("**/v1/transmissions", lambda route: route.fulfill(
        status=429, headers={"Retry-After": "7"}, content_type="application/json",
        body='{"error": {"field": null, "message": "the receiver\'s queue is full; retry after 7 s"}}'))
    page.fill("#steps", "2")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    text = page.locator("#error").inner_text()
    assert text == "HTTP 429: the receiver's queue is full; retry after 7 s Retry after 7 s."
    assert not page.is_disabled("#send")


@needs_browser
def test_the_forms_lists_ranges_and_defaults_are_the_apis_options(services, probe) -> None:
    options = httpx.get(services.sender_url + "/v1/options", timeout=10).json()
    open_page(probe, services)
    page = probe.page

    def values(select: str) -> list[str]:
        return page.eval_on_selector_all(f"#{select} option", "options => options.map(o => o.value)")

    assert values("channel") == [c["name"] for c in options["channels"]]
    assert values("snr_definition") == [d["name"] for d in options["snr_definitions"]]
    assert values("sampler") == ["", *(s["name"] for s in options["samplers"])]  # "": the receiver's default
    assert values("downsample_factor") == ["", *(str(f) for f in options["downsample_factors"])]
    assert page.input_value("#channel") == options["defaults"]["channel"]
    assert page.input_value("#snr_definition") == options["defaults"]["snr_definition"]
    assert float(page.input_value("#guidance")) == options["defaults"]["guidance"]
    for field in ("snr_db", "steps", "guidance"):
        limits = options["limits"][field]
        assert [float(page.get_attribute(f"#{field}", bound)) for bound in ("min", "max")] == [limits["min"], limits["max"]]
    assert probe.errors == []


@needs_browser
def test_the_page_fits_a_phone_screen_and_moves_to_the_results(services, browser) -> None:
    probe = PageProbe(browser, width=390, height=844)
    page = probe.page
    try:
        open_page(probe, services)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        assert page.locator("#send").bounding_box()["width"] > 60
        page.select_option("#example", "street_photo.jpg")  # a photo: the Numbers' longest rows
        page.fill("#steps", "2")
        page.click("#send")
        # The form fills the first screen: Send brings the progress and the stages up.
        page.wait_for_function("window.scrollY > 0")
        assert -1 < page.locator("#state").bounding_box()["y"] < 844 / 2  # at the top, give or take a sub-pixel
        wait_for_status(probe, "done")
        assert "Digital link" in page.inner_text("#numbers")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        assert probe.errors == [] and probe.external == []
    finally:
        probe.close()


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def _palette_png() -> bytes:
    from PIL import Image

    picture = Image.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="P")
    picture.putpalette([0, 0, 0] * 256)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


@needs_browser
def test_the_kind_is_detected_from_the_file_as_the_cli_does_and_can_be_overridden(services, probe) -> None:
    open_page(probe, services)
    page = probe.page
    files = {
        "grey.png": _png(np.zeros((8, 8), dtype=np.uint8)),
        "palette.png": _palette_png(),
        "rgb.png": _png(np.zeros((8, 8, 3), dtype=np.uint8)),
        "grey16.png": _png(np.zeros((8, 8), dtype=np.uint16)),
        "photo.jpg": (REPO_ROOT / "examples" / "street_photo.jpg").read_bytes(),
    }
    names = {"photo": "a photo", "label_map": "a label map"}
    for name, data in files.items():
        page.set_input_files("#upload", files=[{"name": name, "mimeType": "image/png", "buffer": data}])
        expected = f"Detected: {names[cli.guess_kind(data)]} ("
        page.wait_for_function("text => document.getElementById('kind-note').textContent.startsWith(text)",
                               arg=expected, timeout=5000)
        assert page.input_value("#kind") == ""
    # The photo example, then a label map upload: sent as a label map, not segmented as a photo.
    page.select_option("#example", "street_photo.jpg")
    page.wait_for_function("document.getElementById('kind-note').textContent.startsWith('Detected: a photo')")
    page.set_input_files("#upload", str(REPO_ROOT / "examples" / "street_labels.png"))
    page.wait_for_function("document.getElementById('kind-note').textContent.startsWith('Detected: a label map')")
    page.select_option("#kind", "photo")
    assert page.inner_text("#kind-note").endswith("Sent as a photo, as chosen.")
    page.select_option("#kind", "")
    page.fill("#steps", "2")
    with page.expect_request("**/v1/transmissions") as posted:
        page.click("#send")
    assert b'name="kind"\r\n\r\nlabel_map' in posted.value.post_data_buffer
    wait_for_status(probe, "done")
    assert "Label map sent (no segmentation)" in page.inner_text("#stage-segmentation")
    assert probe.errors == [] and probe.external == []


@needs_browser
def test_an_empty_seed_draws_a_new_one_each_send_and_says_which(services, probe) -> None:
    open_page(probe, services)
    page = probe.page
    page.fill("#steps", "1")
    seeds = []
    for _ in range(2):
        with page.expect_request("**/v1/transmissions") as posted:
            page.click("#send")
        wait_for_status(probe, "done")
        seeds.append(posted.value.post_data_buffer.split(b'name="seed"\r\n\r\n')[1].split(b"\r\n")[0].decode())
        assert page.input_value("#seed") == ""  # the box stays empty: the next Send draws again
        assert f"this one drew {seeds[-1]};" in page.inner_text("#seed-note")
    assert seeds[0] != seeds[1]


@needs_browser
def test_swagger_ui_try_it_out_runs_against_the_sender(services, probe) -> None:
    page = probe.page
    page.goto(services.sender_url + "/docs")
    health = page.locator(".opblock-get:has(.opblock-summary-path[data-path='/healthz'])")
    health.locator(".opblock-summary").click()
    health.get_by_role("button", name="Try it out").click()
    health.get_by_role("button", name="Execute").click()
    status = health.locator(".live-responses-table tbody .response-col_status").first
    status.wait_for()
    assert status.inner_text().strip() == "200"
    assert '"status": "ok"' in health.locator(".live-responses-table tbody .microlight").first.inner_text()
    # The transmission form, field by field with its examples, sent from the docs page.
    form = page.locator(".opblock-post:has(.opblock-summary-path[data-path='/v1/transmissions'])")
    form.locator(".opblock-summary").click()
    form.get_by_role("button", name="Try it out").click()
    form.locator("input[type=file]").set_input_files(str(REPO_ROOT / "examples" / "street_labels.png"))

    def field(name: str, element: str = "input"):
        return form.locator(f"tr[data-property-name='{name}'] {element}").first

    # Every optional field starts empty: an untouched request is a request for the defaults.
    filled = form.evaluate("""f => Array.from(f.querySelectorAll('tr[data-property-name]'))
        .filter(row => row.dataset.propertyName !== 'file')
        .map(row => [row.dataset.propertyName, row.querySelector('input[type=text], select').value])
        .filter(([name, value]) => value !== '')""")
    assert filled == []
    assert json.loads(execute(form))["channel"]["requested_snr_db"] == 100  # the default
    # One field changed alone: no pre-filled alias or coding conflicts with it.
    field("kind", "select").select_option("label_map")
    field("snr_db").fill("5")
    field("budget").fill("1/12")
    field("steps").fill("1")
    answer = json.loads(execute(form))
    assert answer["channel"]["requested_snr_db"] == 5 and answer["budget"]["requested"] == "1/12"
    assert probe.errors == [] and probe.external == []


def execute(form) -> str:
    """Swagger UI's Execute of an operation: the body of its 202 (the previous answer cleared first)."""
    clear = form.get_by_role("button", name="Clear")
    if clear.count():
        clear.click()
    form.get_by_role("button", name="Execute").click()
    status = form.locator(".live-responses-table tbody .response-col_status").first
    status.wait_for(timeout=60_000)
    assert status.inner_text().strip() == "202", form.locator(".live-responses-table").inner_text()
    return form.locator(".live-responses-table tbody .microlight").first.inner_text()


@needs_browser
def test_redoc_renders_the_receiver_api(services, probe) -> None:
    probe.page.goto(services.receiver_url + "/redoc")
    probe.page.get_by_text("/v1/transmissions/{transmission_id}").first.wait_for()
    assert probe.external == []


# --- the page's routes, without a browser --------------------------------------------------------


def test_the_page_and_its_assets_are_served_without_external_urls(services) -> None:
    page = httpx.get(services.sender_url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("/static/app.js", "/static/style.css"):
        body = httpx.get(services.sender_url + asset, timeout=10)
        assert body.status_code == 200, asset
        assert "http://" not in body.text and "https://" not in body.text, asset
    assert "http://" not in page.text and "https://" not in page.text


def test_examples_classes_and_preview(services) -> None:
    base = services.sender_url
    examples = httpx.get(f"{base}/v1/examples", timeout=10).json()
    assert [e["name"] for e in examples] == ["street_labels.png", "street_photo.jpg"]
    labels = httpx.get(base + examples[0]["url"], timeout=10).content
    assert labels == (REPO_ROOT / "examples" / "street_labels.png").read_bytes()
    assert httpx.get(f"{base}/v1/examples/..%2Fmodels%2Fsegmenter-camvid.pt", timeout=10).status_code == 404
    classes = httpx.get(f"{base}/v1/classes", timeout=10).json()
    assert classes[3] == {"id": 3, "name": "road", "colour": "#804080"}
    preview = httpx.post(f"{base}/v1/preview", files={"file": ("street.png", labels)},
                         data={"kind": "label_map", "downsample_factor": "2"}, timeout=60).json()
    assert preview["semantic"]["map_height"] == 48 and preview["semantic"]["downsample_factor"] == 2
    assert len(preview["transmitted_maps"]) == len(preview["semantic"]["present_class_ids"]) == 10
    assert preview["bits"]["channel_uses"] * 2 == preview["bits"]["num_symbols"]
    # 10 present classes at unit power: the paper's PSNR is about 10 log10(10) dB above the average-power SNR.
    offsets = preview["semantic"]["average_power_snr_offset_db"]
    assert offsets["average_power"] == 0 and -12 < offsets["paper_psnr"] < -9
    sent_labels = _decode(preview["labels_png"])
    drawn = cv2.imread(str(REPO_ROOT / "examples" / "street_labels.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(sent_labels, drawn)


def test_the_preview_matches_what_the_transmission_sends(services) -> None:
    photo = (REPO_ROOT / "examples" / "street_photo.jpg").read_bytes()
    preview = httpx.post(f"{services.sender_url}/v1/preview", files={"file": ("s.jpg", photo)},
                         data={"kind": "photo"}, timeout=60).json()
    sent = httpx.post(f"{services.sender_url}/v1/transmissions", files={"file": ("s.jpg", photo)},
                      data={"kind": "photo", "steps": "1", "guidance": "0"}, timeout=60).json()
    assert sent["semantic"]["present_class_ids"] == preview["semantic"]["present_class_ids"]
    assert sent["bits"]["payload_bits"] == preview["bits"]["payload_bits"]
    assert preview["segmenter"]["used"] is True and preview["segmenter"]["trained"] is True


def test_analog_goes_through_the_channel_at_each_snr(services) -> None:
    photo = (REPO_ROOT / "examples" / "street_photo.jpg").read_bytes()
    answer = httpx.post(f"{services.sender_url}/v1/analog", files={"file": ("s.jpg", photo)},
                        data={"kind": "photo", "snrs_db": "1,100", "seed": "3"}, timeout=120).json()
    clean = _decode(answer["input_png"])
    low, high = (_decode(result["png"]) for result in answer["results"])
    assert clean.shape == low.shape == (96, 128, 3)
    assert [r["channel_uses"] for r in answer["results"]] == [96 * 128 * 3 // 2] * 2
    assert abs(answer["results"][0]["measured_snr_db"] - 1) < 0.5
    # 100 dB leaves the pixels as they were (up to rounding); 1 dB buries them in noise.
    assert np.abs(high.astype(int) - clean).max() <= 1
    assert np.abs(low.astype(int) - clean).mean() > 20


@pytest.mark.parametrize(("data", "status", "field"), [
    ({"kind": "photo", "snrs_db": "1,abc"}, 422, "snrs_db"),
    ({"kind": "photo", "snrs_db": "500"}, 422, "snrs_db"),
    ({"kind": "photo", "channel": "fiber"}, 422, "channel"),
])
def test_analog_rejects_bad_fields_naming_them(services, data, status, field) -> None:
    photo = (REPO_ROOT / "examples" / "street_photo.jpg").read_bytes()
    answer = httpx.post(f"{services.sender_url}/v1/analog", files={"file": ("s.jpg", photo)}, data=data, timeout=30)
    assert answer.status_code == status and answer.json()["error"]["field"] == field


def test_the_relay_passes_the_receivers_answers_and_colours_label_maps(services) -> None:
    labels = (REPO_ROOT / "examples" / "street_labels.png").read_bytes()
    sent = httpx.post(f"{services.sender_url}/v1/transmissions", files={"file": ("l.png", labels)},
                      data={"kind": "label_map", "steps": "1", "guidance": "0", "wait": "true"}, timeout=120)
    assert sent.status_code == 200
    relay = f"{services.sender_url}/receiver/v1/transmissions/{sent.headers['x-transmission-id']}"
    status = httpx.get(relay, params={"wait_s": 5}, timeout=30).json()
    assert status["status"] == "done" and status["progress"] is None
    assert httpx.get(f"{relay}/image", timeout=10).content == sent.content
    ids = _decode(httpx.get(f"{relay}/maps/fds_labels.png", timeout=10).content)
    coloured = _decode(httpx.get(f"{relay}/maps/fds_labels.png", params={"colour": "true"}, timeout=10).content)
    classes = httpx.get(f"{services.sender_url}/v1/classes", timeout=10).json()
    palette = np.array([[int(c["colour"][i:i + 2], 16) for i in (1, 3, 5)] for c in classes], dtype=np.uint8)
    np.testing.assert_array_equal(coloured, palette[ids])
    wrong = httpx.get(f"{relay}/maps/received.png", params={"colour": "true"}, timeout=10)
    assert wrong.status_code == 422 and wrong.json()["error"]["field"] == "colour"
    unknown = httpx.get(f"{services.sender_url}/receiver/v1/transmissions/{'0' * 32}", timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "transmission_id"
    cancel = httpx.post(f"{relay}/cancel", timeout=10)
    assert cancel.status_code == 409  # done already: the receiver's answer, relayed


def test_a_receiver_that_is_down_is_a_503_with_the_apis_message(tmp_path) -> None:
    """The relay of a sender whose receiver does not listen."""
    from fastapi.testclient import TestClient

    from sender_service.app import create_app
    from sender_service.settings import SenderSettings

    settings = SenderSettings(receiver_public_url=f"http://127.0.0.1:{free_port()}", device="cpu",
                              segmenter_checkpoint=tmp_path / "none.pt")
    with TestClient(create_app(settings)) as client:
        answer = client.get(f"/receiver/v1/transmissions/{'a' * 32}")
    assert answer.status_code == 503 and "cannot be reached" in answer.json()["error"]["message"]
    assert answer.headers["retry-after"] == "5"


def _decode(data: bytes | str) -> np.ndarray:
    if isinstance(data, str):  # a data: URL
        data = base64.b64decode(data.partition("base64,")[2])
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.ndim == 3 else image
