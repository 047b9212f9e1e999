"""Ray Job entrypoint: `ray job submit --working-dir . -- python jobs/train.py --config CONFIG`."""

import sys

from modelfleet.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
