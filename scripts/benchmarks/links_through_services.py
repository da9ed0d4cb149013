"""Score each link through the three services against the rate-quality report's column.

    python -m scripts.benchmarks.links_through_services --limit 16 --snr-db 10 \\
        --requests "auto:1/12,digital:,learned:"

Starts the stack on free loopback ports (gesco.stack; the receiver without the upscaler, so its
PNG is the generator's image enlarged to the map size, as the evaluation scores it), sends the
report's val label maps (evaluation.rate_quality's images, at 96x128) with each `link:budget` at an
average-power SNR with DDIM 10 steps and guidance 2, and scores every returned image with the
evaluation's segmenter (`Evaluation.score`). Prints each request's mIoU, the report's column for
the same images (docs/rate-quality/results.json) and the per-image paired difference with its
standard error. Each image is sampled with the evaluation's seed for it (`Evaluation.sampling_seed`,
the report's), so where the link delivers the same condition the image is the report's; the
channel's noise is the services' own.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import numpy as np

from evaluation.evaluate import Evaluation
from evaluation.rate_quality import RateQualityConfig
from gesco.stack import Ports, RunningStack, services
from shared.paths import REPO_ROOT
from shared.wire.imageio import encode_png

# The report's column each request is scored by: (representation, rate) in results.json.
REPORT_COLUMNS = {("auto", "1/12"): ("separated", "1/12"), ("digital", ""): ("separated", "2"),
                  ("learned", ""): ("learned", "1/24"), ("maps", "1/12"): ("ours", "f8")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--snr-db", type=float, default=10.0)
    parser.add_argument("--requests", default="auto:1/12,digital:,learned:", help="link:budget, comma-separated")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per request (a bound, not a target)")
    args = parser.parse_args()
    requests = [tuple(item.split(":", 1)) for item in args.requests.split(",") if item]
    ev = Evaluation(RateQualityConfig(limit=args.limit, snrs=(args.snr_db,), threads=1).evaluation_config())
    report = json.loads((REPO_ROOT / "docs/rate-quality/results.json").read_text())
    snr_key = f"{args.snr_db:g}"
    with tempfile.TemporaryDirectory() as tmp:
        stack = RunningStack(services(Ports.free(), settings={
            "receiver": {"GESCO_RECEIVER_STORE_DIR": f"{tmp}/store", "GESCO_RECEIVER_UPSCALE": "false",
                         "GESCO_RECEIVER_OUTPUT_HEIGHT": str(ev.size[0]),
                         "GESCO_RECEIVER_OUTPUT_WIDTH": str(ev.size[1]), "GESCO_RECEIVER_TORCH_THREADS": "1"},
            "sender": {"GESCO_SENDER_WAIT_TIMEOUT_S": str(args.timeout_s)}}), Path(tmp) / "logs")
        try:
            for link, budget in requests:
                started = time.monotonic()
                images, schemes = [], set()
                for i, labels in enumerate(ev.labels):
                    fields = {"kind": "label_map", "link": link, "snr_db": str(args.snr_db),
                              "snr_definition": "average_power", "sampler": "ddim", "steps": "10",
                              "guidance": "2", "seed": str(ev.sampling_seed(i)), "wait": "true"}
                    if budget:
                        fields["budget"] = budget
                    response = httpx.post(f"{stack.url('sender')}/v1/transmissions", data=fields,
                                          files={"file": ("labels.png", encode_png(labels))}, timeout=args.timeout_s)
                    if response.status_code != 200:
                        raise SystemExit(f"{link} {budget} image {i}: {response.status_code} {response.text[:300]}")
                    status = httpx.get(f"{stack.url('receiver')}/v1/transmissions/"
                                       f"{response.headers['x-transmission-id']}", timeout=30).json()
                    schemes.add(status["link"]["scheme"])
                    bgr = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
                    images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                scores = ev.score(np.stack(images))
                per_image = np.asarray(scores["per_image"]["miou"])
                name, rate = REPORT_COLUMNS[(link, budget)]
                column = report["results"][name][rate][snr_key]["per_image"]["miou"]
                order = report["settings"]["image_names"]
                reference = np.asarray([column[order.index(image)] for image in ev.names])
                difference = per_image - reference
                stderr = difference.std(ddof=1) / math.sqrt(difference.size)
                print(json.dumps({"link": link, "budget": budget or None, "snr_db": args.snr_db,
                                  "images": len(images), "schemes": sorted(schemes),
                                  "miou": round(float(per_image.mean()), 4),
                                  "report": f"{name} {rate}", "report_miou": round(float(reference.mean()), 4),
                                  "paired_difference": round(float(difference.mean()), 4),
                                  "stderr": round(float(stderr), 4),
                                  "seconds": round(time.monotonic() - started, 1)}), flush=True)
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
