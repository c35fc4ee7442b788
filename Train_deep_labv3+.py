"""Train DeepLabV3+ on CBIS-DDSM.

    python Train_deep_labv3+.py --csv-dir csv --checkpoint-dir checkpoint


Runs unchanged under torchrun for several GPUs or nodes. See `--help` and docs/training.md.
"""

from training import main

if __name__ == "__main__":
    raise SystemExit(main())
