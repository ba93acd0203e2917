"""Fine-tuning entry point for `ray job submit` (same arguments as `llmos finetune`).

    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/finetune_tiny.yaml \
        model.base=runs/pretrain-tiny/export
"""

import sys

from llmos_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
