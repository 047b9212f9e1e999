"""The serving baseline: the same artifact and the same batched KV-cache generator behind plain
FastAPI + uvicorn in one process (no Ray, no proxy, no batching across requests unless --batch).

    python bench/uvicorn_baseline.py ARTIFACT_DIR --port 8411
"""


import argparse
import sys
from pathlib import Path

from modelfleet.families.artifact import load_artifact

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build(artifact_dir: str):
    import torch
    from fastapi import FastAPI
    from pydantic import BaseModel

    from modelfleet.serve.generation import Job, generate_steps

    torch.set_num_threads(1)  # a Serve replica gets one CPU: compare like with like
    model, tok, _ = load_artifact(artifact_dir)
    app = FastAPI()

    class Body(BaseModel):
        prompt: str
        max_tokens: int = 16
        temperature: float = 0.0

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    def completions(body: Body) -> dict:  # sync: FastAPI runs it in its thread pool
        job = Job(prompt_ids=tok.encode(body.prompt), max_tokens=body.max_tokens, temperature=body.temperature)
        text, n = [], 0
        with torch.inference_mode():
            for out in generate_steps(model, [job], eos_id=tok.eos_id, decode=tok.decode):
                if out[0] is not None:
                    text.append(out[0].text)
                    n += out[0].tokens
        return {"object": "text_completion", "choices": [{"index": 0, "text": "".join(text)}],
                "usage": {"completion_tokens": n}}

    return app


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--port", type=int, default=8411)
    args = ap.parse_args()
    uvicorn.run(build(args.artifact), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
