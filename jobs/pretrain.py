"""Pretraining entry point for `ray job submit` (same arguments as `llmos pretrain`).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pretrain.py --config jobs/configs/pretrain_tiny.yaml train.max_steps=50
"""

import sys

from llmos_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
