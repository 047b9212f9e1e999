"""The run's progress records: what rank 0 sends the driver over the run's channel
(train/channel.py) and the driver writes to ``metrics.jsonl``, one typed record per kind.

msgspec Structs tagged by ``kind``: the channel carries them as msgpack bytes, checked against
these types when the driver decodes them (a record of the wrong shape fails there, naming the
field, not as a ``KeyError`` in the progress line), and a ``metrics.jsonl`` line is the same
``{"kind": "step", ...}`` JSON object its readers parse. A field with a default is left out of the
line while it holds it (``reshard`` without a logit check, a sync ``checkpoint``'s timings).

Imports nothing of the project's: the worker loop and the driver both read it.
"""

from __future__ import annotations

import msgspec


class Record(msgspec.Struct, tag_field="kind", kw_only=True, omit_defaults=True):
    time: float = 0.0
    """Wall-clock time the record was made: stamped by its sender (``time.time()`` on that host)."""


class Built(Record, tag="built"):
    """The engine is built: its group size and parameter storage."""

    sharded: bool
    world: int
    full_bytes: int
    max_local_bytes: int
    transient_bytes: int


class Resume(Record, tag="resume"):
    """A checkpoint was restored at ``step``; ``skipped``: newer ones found incomplete."""

    step: int
    skipped: list[str]


class Reshard(Record, tag="reshard"):
    """The restored checkpoint was written by another number of ranks and re-partitioned."""

    step: int
    from_workers: int
    to_workers: int
    grad_accum: int
    restore_s: float
    max_abs_logit_diff: float | None = None
    """The restored logits against those the checkpoint recorded (None: it recorded none)."""


class StepRates(Record, tag="step_rates"):
    """A logged step's rates (``throughput.step_rates`` computes them); never sent alone, the
    fields of ``Step``."""

    step_time_s: float
    samples_per_s: float
    tokens_per_s: float | None
    model_flops_per_token: float | None
    mfu: float | None
    """Achieved model FLOP/s over ``world x peak_flops`` (on a shared CPU it can exceed 1)."""
    mfu_basis: str
    peak_flops: float | None
    peak_mem_bytes: int
    peak_mem_basis: str
    """``cuda_max_allocated`` on a GPU; ``process_max_rss`` on CPU (the whole process)."""


class Step(StepRates, tag="step"):
    """One logged optimizer step (every ``train.log_every``): its rates and these."""

    step: int
    max_steps: int
    loss: float
    lr: float
    grad_norm: float | None
    elapsed_s: float
    """Since this worker group's start."""
    epoch: int


class FirstStep(Record, tag="first_step"):
    init_s: float
    """Worker start to the built engine."""
    first_step_s: float
    """Worker start to the end of the first step."""


class Eval(Record, tag="eval"):
    step: int
    val_loss: float
    val_ppl: float


class Checkpoint(Record, tag="checkpoint"):
    """A checkpoint is complete (for an async save: uploaded and published)."""

    step: int
    mode: str
    snapshot_s: float | None = None
    write_s: float | None = None
    write_cpu_s: float | None = None
    waited_s: float | None = None


class Save(Record, tag="save"):
    """How long the step loop stopped for a save (what async saves cut)."""

    step: int
    mode: str
    stall_s: float


class Stopped(Record, tag="stopped"):
    """The ranks checkpointed at ``step`` for the driver's stop request and end."""

    step: int
    reason: str


class Preempted(Record, tag="preempted"):
    """A drain notice: the ranks checkpointed at ``step`` and wait for Ray Train's teardown."""

    step: int
    deadline_ms: int | None
    ranks: list[int]


class DrainCancelled(Record, tag="drain_cancelled"):
    step: int


class Done(Record, tag="done"):
    step: int
    elapsed_s: float
    drain_checks: int
    drain_check_mean_s: float


class Resize(Record, tag="resize"):
    """Written by the driver: the worker group changed size (see ``sink.ProgressSink``). The
    parts are absent when the old group logged no step."""

    step: int
    from_workers: int
    to_workers: int
    took_s: float | None
    lost_s: float | None = None
    detection_s: float | None = None
    group_start_s: float | None = None
    restore_s: float | None = None
    first_step_s: float | None = None
    redone_s: float | None = None
    redone_steps: int | None = None


Progress = (
    Built
    | Resume
    | Reshard
    | Step
    | FirstStep
    | Eval
    | Checkpoint
    | Save
    | Stopped
    | Preempted
    | DrainCancelled
    | Done
    | Resize
)

_json = msgspec.json.Encoder()
_json_decoder = msgspec.json.Decoder(Progress)
_packer = msgspec.msgpack.Encoder()
_unpacker = msgspec.msgpack.Decoder(Progress)


def pack(record: Progress) -> bytes:
    """The channel's form of a record (msgpack)."""
    return _packer.encode(record)


def unpack(data: bytes) -> Progress:
    """A record off the channel; ``msgspec.ValidationError`` names a field of the wrong shape."""
    return _unpacker.decode(data)


def to_line(record: Progress) -> str:
    """The ``metrics.jsonl`` line of a record (no newline)."""
    return _json.encode(record).decode()


def from_line(line: str | bytes) -> Progress:
    return _json_decoder.decode(line)


def read_lines(lines: list[str]) -> list[Progress]:
    """The records of ``metrics.jsonl`` lines; a line this version cannot read (another version's
    record, a line cut short by a driver that died mid-write) is left out, never a failed resume."""
    out: list[Progress] = []
    for line in lines:
        try:
            out.append(from_line(line))
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
    return out


def numbers(record: Progress) -> dict[str, float]:
    """The record's numeric fields (booleans and None left out), by name: what tracking and the
    Prometheus gauges log."""
    out: dict[str, float] = {}
    for name in record.__struct_fields__:
        v = getattr(record, name)
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[name] = float(v)
    return out


def kind(record: Progress) -> str:
    return str(record.__struct_config__.tag)
