"""Ray Job entrypoint: train -> export -> deploy in one job.

`ray job submit --working-dir . -- python jobs/pipeline.py --config CONFIG` trains the config,
publishes the artifact, and points the serve section's models at the new version (a running
application is moved to it with a rolling update)."""

import sys

from modelfleet.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
