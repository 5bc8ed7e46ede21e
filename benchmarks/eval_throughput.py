"""Inference and Grad-CAM throughput over the CIFAR-10 test set.

    python benchmarks/eval_throughput.py [--data-dir data] [--device auto] [--precision auto]
                                         [--images 10000] [--batch-size 512] [--cam-batch-size 256]
                                         [--repeats 3] [--json]

Times `cnnstress.evaluate.predict` (eval mode, no grad, autocast per --precision)
and `cnnstress.GradCAM` (fp32, one forward/backward per batch, maps upsampled
and normalised) on the first --images test images. Weights are a seeded random
init: throughput does not depend on them. Prints min and median images/second
over the repeats; with --json one JSON object.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cnnstress.augment import normalize, to_float  # noqa: E402
from cnnstress.evaluate import predict  # noqa: E402
from cnnstress.xai.cam import GradCAM  # noqa: E402
from cnnstress.model import resnet18  # noqa: E402
from cnnstress.runtime import describe_hardware, resolve_precision  # noqa: E402
from benchmarks.timing import open_test_set, warm_rates  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--cam-batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    loaded = open_test_set(args.data_dir, args.device)
    if loaded is None:
        return 2
    device, images, labels = loaded
    images, labels = images[:args.images], labels[:args.images]
    n = int(labels.numel())
    amp = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    model = resnet18().to(device).to(memory_format=torch.channels_last).eval()

    def run_predict():
        predict(model, images, labels, device=device, batch_size=args.batch_size, amp_dtype=amp)

    cam = GradCAM(model)

    def run_gradcam():
        for lo in range(0, n, args.cam_batch_size):
            x = normalize(to_float(images[lo:lo + args.cam_batch_size].to(device)))
            cam(x)

    pred_rates = warm_rates(run_predict, n, device, args.repeats)
    cam_rates = warm_rates(run_gradcam, n, device, args.repeats)
    result = {
        "predict_img_per_s": statistics.median(pred_rates), "predict_img_per_s_min": min(pred_rates),
        "gradcam_img_per_s": statistics.median(cam_rates), "gradcam_img_per_s_min": min(cam_rates),
        "images": n, "batch_size": args.batch_size, "cam_batch_size": args.cam_batch_size,
        "repeats": args.repeats, "device": str(device), "precision": str(amp or "fp32"),
        "hardware": describe_hardware(device), "date": dt.datetime.now().isoformat(timespec="seconds"),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['hardware']}")
        print(f"predict ({result['precision']}): median {result['predict_img_per_s']:.0f} img/s, "
              f"min {result['predict_img_per_s_min']:.0f} img/s over {n} images x {args.repeats}")
        print(f"Grad-CAM (fp32, layer4): median {result['gradcam_img_per_s']:.0f} img/s, "
              f"min {result['gradcam_img_per_s_min']:.0f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
