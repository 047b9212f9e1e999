"""What ``modelfleet cluster ...``, ``submit`` and ``jobs ...`` do (argument tables and actions)."""

from __future__ import annotations

import argparse
import json
import sys

from modelfleet.config import ConfigError


def add_cluster(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = sub.add_parser("up", help="start a simulated multi-node cluster on this machine")
    up.add_argument("--config", dest="cluster_config", help="cluster YAML (default: cluster/local.yaml)")
    up.add_argument("--nodes", type=int, help="nodes including the head")
    up.add_argument("--cpus-per-node", type=int, help="logical CPUs each node advertises")
    up.add_argument("--gpus-per-node", type=int, help="logical GPUs each node advertises")
    up.add_argument("--dashboard-port", type=int, help="dashboard and Jobs API port on 127.0.0.1")
    up.add_argument("--serve-port", type=int, help="Serve HTTP port on 127.0.0.1")
    up.add_argument("--gcs-port", type=int, help="head GCS port; other ports derive from it")
    up.add_argument("--no-auth", action="store_true", help="disable Ray token authentication (not advised)")
    sub.add_parser("status", help="nodes with total and free resources").add_argument(
        "--json", action="store_true", help="print JSON instead of a table")
    sub.add_parser("down", help="stop exactly the processes `cluster up` started")
    kill = sub.add_parser("kill-node", help="SIGKILL one simulated worker node (failure drills)")
    kill.add_argument("node", help="node name from `cluster status`, e.g. worker-1")


def cmd_cluster(args: argparse.Namespace) -> int:
    from modelfleet.cluster import local

    if args.action == "up":
        spec = local.load_spec(args.cluster_config, nodes=args.nodes, cpus_per_node=args.cpus_per_node,
                               gpus_per_node=args.gpus_per_node, dashboard_port=args.dashboard_port,
                               serve_port=args.serve_port, gcs_port=args.gcs_port,
                               auth="disabled" if args.no_auth else None)
        st = local.up(spec)
        print(f"cluster up: {spec.nodes} nodes x ({spec.cpus_per_node} CPU, {spec.gpus_per_node} GPU)")
        print(f"  Ray address  {st.gcs_address}   (auth: {spec.auth})")
        print(f"  dashboard    {st.dashboard_url}  (Jobs API; 127.0.0.1 only)")
        print(f"  Serve        http://127.0.0.1:{spec.serve_port}")
        if spec.auth == "token":
            print("  the token is ~/.ray/auth_token; for the plain `ray` CLI: export RAY_AUTH_MODE=token")
        return 0
    st = local.read_state()
    if st is None:
        raise ConfigError("no simulated cluster is up (start one with `modelfleet cluster up`)")
    if args.action == "status":
        rows = local.status(st)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(f"{'NODE':<10} {'STATE':<7} {'CPU free/total':>15} {'GPU free/total':>15}  NODE ID")
            for r in rows:
                print(f"{r['name']:<10} {r['state']:<7} {r['cpu']:>15} {r['gpu']:>15}  {r['node_id']}")
        return 0
    if args.action == "kill-node":
        node = local.kill_node(st, args.node)
        print(f"killed node {node.name} ({node.node_id})")
        return 0
    n = local.down(st)
    print(f"cluster down: stopped {n} processes")
    return 0


def add_submit(p: argparse.ArgumentParser) -> None:
    from modelfleet.cluster.jobs import JOBS

    p.add_argument("job", choices=JOBS, help="jobs/<JOB>.py to run")
    p.add_argument("config", nargs="?", help="YAML config inside the working directory")
    p.add_argument("--preset", help="start from this preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable)")
    p.add_argument("--submission-id", help="job id; resubmitting an existing id is refused")
    p.add_argument("--address", help="Jobs API URL (default: the local cluster, else 127.0.0.1:8265)")
    p.add_argument("--wait", action="store_true", help="follow the logs and return the job's result")
    p.add_argument("--arg", dest="args", action="append", default=[], metavar="ARG",
                   help="extra argument for the job, e.g. --arg RUN for export (repeatable)")


def cmd_submit(args: argparse.Namespace) -> int:
    from modelfleet.cluster import jobs

    job_id = jobs.submit(args.job, args.config, args.overrides, preset=args.preset,
                         submission_id=args.submission_id, extra_args=args.args, addr=args.address)
    print(f"submitted {args.job} as {job_id}")
    if not args.wait:
        print(f"follow it: modelfleet jobs logs {job_id} --follow")
        return 0
    for chunk in jobs.follow(job_id, args.address):
        sys.stdout.write(chunk)
    s = jobs.wait(job_id, addr=args.address)
    print(f"job {job_id}: {s['status']} {s.get('reason', '')}".rstrip())
    return 0 if s["status"] == "SUCCEEDED" else 1


def add_jobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Jobs API URL (default: the local cluster, else 127.0.0.1:8265)")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="all jobs with their status").add_argument("--json", action="store_true")
    sub.add_parser("status", help="one job's status (and why it failed)").add_argument("id")
    logs = sub.add_parser("logs", help="one job's logs")
    logs.add_argument("id")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    sub.add_parser("stop", help="stop a running job").add_argument("id")


def cmd_jobs(args: argparse.Namespace) -> int:
    from modelfleet.cluster import jobs

    if args.action == "list":
        rows = jobs.list_jobs(args.address)
        if args.json:
            print(json.dumps(rows, indent=1))
        for r in [] if args.json else rows:
            print(f"{r['id']:<28} {r['status']:<10} {r['entrypoint'][:70]}")
        return 0
    if args.action == "status":
        s = jobs.status(args.id, args.address)
        print(json.dumps(s, indent=1))
        return 0 if s["status"] != "FAILED" else 1
    if args.action == "logs":
        if args.follow:
            for chunk in jobs.follow(args.id, args.address):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        else:
            sys.stdout.write(jobs.logs(args.id, args.address))
        return 0
    stopped = jobs.stop(args.id, args.address)
    print(f"job {args.id}: {'stop requested' if stopped else 'already finished'}")
    return 0
