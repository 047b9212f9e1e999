"""Ray Job entrypoint: `ray job submit --working-dir . -- python jobs/deploy.py --config CONFIG`.

Deploys the config's serve section on the cluster the job runs on and returns once it is
RUNNING (the application outlives the job)."""

import sys

from modelfleet.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "--detach", *sys.argv[1:]]))
