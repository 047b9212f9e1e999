"""Ray Job entrypoint: `ray job submit --working-dir . -- python jobs/export.py RUN --config CONFIG`."""

import sys

from modelfleet.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
