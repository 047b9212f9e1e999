"""The serving baseline: the same artifact and the same continuous-batching engine behind plain
FastAPI + uvicorn — no Ray, no proxy, no ingress. The async endpoint submits its job and awaits
the engine's answer; concurrent requests join the running batch like on a Serve replica.

With ``--core`` the engine is the replica's own engine core process (``serve/core_client.py``:
what an LM replica runs), so Serve ÷ this baseline is what Serve costs over a bare HTTP server
hosting the same core. Without it, one ``Engine`` on one ``EngineLoop`` thread in this process.

    python bench/uvicorn_baseline.py ARTIFACT_DIR --port 8411 [--max-num-seqs 16] [--core]
"""

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runnable from a bare checkout


class Body(BaseModel):
    prompt: str
    max_tokens: int = 16
    temperature: float = 0.0


def _response(prompt_tokens: int, text: str, n: int) -> dict:
    """The OpenAI completion body both variants answer."""
    return {
        "object": "text_completion",
        "choices": [{"index": 0, "text": text}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n},
    }


def build(artifact_dir: str, max_num_seqs: int = 16):
    import asyncio

    import torch
    from fastapi import FastAPI, HTTPException

    from modelfleet.families.artifact import load_artifact
    from modelfleet.serve.engine import Engine, EngineConfig, EngineFull, EngineLoop, StepOutput
    from modelfleet.serve.generation import Job

    torch.set_num_threads(1)  # a Serve replica gets one CPU: compare like with like
    model, tok, _ = load_artifact(artifact_dir)
    engine = Engine(
        model, eos_id=tok.eos_id, decode=tok.decode, config=EngineConfig(max_num_seqs=max_num_seqs, max_waiting=256)
    )
    # id(job) -> (the request's future, its text so far); the text grows on the engine thread.
    pending: dict[int, tuple[asyncio.Future, list[str]]] = {}
    aloop: list[asyncio.AbstractEventLoop] = []

    def finish(done: list[tuple[asyncio.Future, str, int]], error: BaseException | None) -> None:
        if error is not None:  # the engine thread died: fail everything still waiting
            for fut, _ in pending.values():
                if not fut.done():
                    fut.set_exception(RuntimeError(f"decoding failed: {error!r}"))
            return
        for fut, text, n in done:
            if not fut.done():
                fut.set_result((text, n))

    def deliver(result: StepOutput, _loop: EngineLoop) -> None:
        """Engine thread, once per step: wakes the event loop only when a request finished."""
        done = []
        for seq, step in result.outputs:
            entry = pending.get(id(seq.job))
            if entry is None:
                continue
            entry[1].append(step.text)
            if step.finish_reason:
                done.append((entry[0], "".join(entry[1]), seq.produced))
        if (done or loop.error is not None) and aloop:
            aloop[0].call_soon_threadsafe(finish, done, loop.error)

    loop = EngineLoop(engine, deliver, name="engine-uvicorn")
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        if loop.error is not None:
            raise HTTPException(500, f"decoding thread failed: {loop.error!r}")
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(body: Body) -> dict:
        if not aloop:
            aloop.append(asyncio.get_running_loop())
        job = Job(
            prompt_ids=tok.encode(body.prompt) or [tok.eos_id], max_tokens=body.max_tokens, temperature=body.temperature
        )
        fut = asyncio.get_running_loop().create_future()
        pending[id(job)] = (fut, [])  # before submit: the engine thread may answer at once
        seq = None
        try:
            try:
                seq = loop.submit(job)
            except ValueError as e:
                raise HTTPException(400, str(e)) from None
            except EngineFull as e:
                raise HTTPException(503, str(e)) from None
            text, n = await fut
        finally:
            pending.pop(id(job), None)
            if seq is not None and not seq.finished:
                loop.cancel(seq)  # the client went away
        return _response(len(job.prompt_ids), text, n)

    return app


def build_core(artifact_dir: str, max_num_seqs: int = 16):
    """The same routes over an engine core process (one reader thread, one wake-up per step)."""
    import asyncio
    import itertools

    from fastapi import FastAPI, HTTPException

    from modelfleet.families.artifact import load_preprocessor
    from modelfleet.serve import core_messages as cm
    from modelfleet.serve.core_client import CoreClient
    from modelfleet.serve.generation import Job

    tok, _ = load_preprocessor(artifact_dir)
    pending: dict[int, tuple[asyncio.Future, list[str]]] = {}  # rid -> (future, text so far)
    aloop: list[asyncio.AbstractEventLoop] = []
    rids = itertools.count(1)

    def finish(done: list[tuple[asyncio.Future, Any]]) -> None:
        for fut, value in done:
            if fut.done():
                continue
            if isinstance(value, BaseException):
                fut.set_exception(value)
            else:
                fut.set_result(value)

    def deliver(report: cm.StepReport) -> None:
        done = []
        for s in report.seqs:
            entry = pending.get(s.rid)
            if entry is None:
                continue
            entry[1].append(s.text)
            if s.finish_reason == "error":
                done.append((entry[0], RuntimeError(s.error)))
            elif s.finish_reason:
                done.append((entry[0], ("".join(entry[1]), s.produced)))
        if done and aloop:
            aloop[0].call_soon_threadsafe(finish, done)

    def refused(r: cm.Refused) -> None:
        entry = pending.get(r.rid)
        if entry is not None and aloop:
            aloop[0].call_soon_threadsafe(finish, [(entry[0], HTTPException(503, r.error))])

    core = CoreClient(
        cm.Start(artifact_dir, "cpu", "float32", 1, max_num_seqs, 64, 256, 0, 0, 16, 0, True, False, "uvicorn"),
        deliver,
        refused,
    )
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        if core.problem is not None:
            raise HTTPException(500, core.problem)
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(body: Body) -> dict:
        if not aloop:
            aloop.append(asyncio.get_running_loop())
        job = Job(
            prompt_ids=tok.encode(body.prompt) or [tok.eos_id], max_tokens=body.max_tokens, temperature=body.temperature
        )
        if len(job.prompt_ids) + job.max_tokens > core.started.max_len:
            raise HTTPException(400, "prompt + max_tokens exceeds the context")
        rid, fut = next(rids), asyncio.get_running_loop().create_future()
        pending[rid] = (fut, [])  # before submit: the reader thread may answer at once
        try:
            core.submit(rid, job)
            text, n = await fut
        finally:
            if not fut.done():
                core.cancel(rid)  # the client went away
            pending.pop(rid, None)
        return _response(len(job.prompt_ids), text, n)

    return app


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--port", type=int, default=8411)
    ap.add_argument(
        "--max-num-seqs", type=int, default=16, help="engine sequence slots (Serve: batching.max_batch_size)"
    )
    ap.add_argument("--core", action="store_true", help="host an engine core process, as an LM replica does")
    args = ap.parse_args()
    app = (build_core if args.core else build)(args.artifact, args.max_num_seqs)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
