"""What ``modelfleet cluster ...``, ``submit`` and ``jobs ...`` do (their arguments are in ``cli/__init__``)."""

from __future__ import annotations

import argparse
import json
import sys

from modelfleet.cluster import jobs, local
from modelfleet.errors import ConfigError


def cmd_cluster(args: argparse.Namespace) -> int:
    if args.action == "up":
        spec = local.load_spec(
            args.cluster_config,
            nodes=args.nodes,
            cpus_per_node=args.cpus_per_node,
            gpus_per_node=args.gpus_per_node,
            head_gpus=args.head_gpus,
            isolated=args.isolated,
            dashboard_port=args.dashboard_port,
            serve_port=args.serve_port,
            gcs_port=args.gcs_port,
            auth="disabled" if args.no_auth else None,
        )
        st = local.up(spec)
        print(
            f"cluster up: {spec.nodes} nodes x ({spec.cpus_per_node} CPU, {spec.gpus_per_node} GPU)"
            + (", worker nodes isolated (each its own /tmp)" if spec.isolated else "")
        )
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
    if args.action == "drain-node":
        node = local.drain_node(
            st,
            args.node,
            args.deadline_s,
            kill=not args.no_kill,
            on_drained=lambda t: print(f"drain of {args.node} accepted at {t:.3f} (unix time)", flush=True),
        )
        print(f"drained node {node.name} ({node.node_id})" + ("" if args.no_kill else ", killed at the deadline"))
        return 0
    if args.action == "restart-node":
        node = local.restart_node(st, args.node)
        print(f"restarted node {node.name} ({node.node_id})")
        return 0
    n = local.down(st)
    print(f"cluster down: stopped {n} processes")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    job_id = jobs.submit(
        args.job,
        args.config,
        args.overrides,
        preset=args.preset,
        submission_id=args.submission_id,
        extra_args=args.args,
        addr=args.address,
    )
    print(f"submitted {args.job} as {job_id}")
    if not args.wait:
        print(f"follow it: modelfleet jobs logs {job_id} --follow")
        return 0
    for chunk in jobs.follow(job_id, args.address):
        sys.stdout.write(chunk)
    s = jobs.wait(job_id, addr=args.address)
    print(f"job {job_id}: {s['status']} {s.get('reason', '')}".rstrip())
    return 0 if s["status"] == "SUCCEEDED" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
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
