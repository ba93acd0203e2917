"""Deploy models on a Ray cluster with Ray Serve, as `llmos serve` does locally.

    ray job submit --working-dir . -- python jobs/serve.py -c jobs/configs/serve_tiny.yaml \
        serve.models='[my-model]' serve.host=0.0.0.0

A Serve application outlives the job that deploys it: the job ends once every replica is ready.
With --wait it stays up until stopped (`ray job stop`), then deletes the application.
"""

import argparse
import sys

from llmos_ray.config import load_config
from llmos_ray.errors import LlmosError
from llmos_ray.serve import run_until_stopped, serve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", default="jobs/configs/serve_tiny.yaml", help="YAML config file")
    parser.add_argument("--wait", action="store_true", help="keep running; delete the app when stopped")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        serve(cfg)
    except LlmosError as e:
        print(f"serve job: error: {e}", file=sys.stderr)
        return 2
    s = cfg.serve
    print(f"deployed {', '.join(s.models)} as application {s.app_name!r} on port {s.port}{s.route_prefix}")
    if args.wait:
        run_until_stopped(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
