"""Evaluate a DeepLabV3+ checkpoint on the test CSV.

    python Test_deep_labV3+.py --checkpoint checkpoint/best.pth

Writes metrics.json, per_image.csv, plots and overlays to results/<run folder>/<checkpoint name>.
"""

from evaluation import main

if __name__ == "__main__":
    raise SystemExit(main())
