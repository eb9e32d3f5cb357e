"""The end-of-batch report of `clarity upscale --ray`: what was done, skipped and failed, and each node's pace."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from clarity.serving.ray.batch_actor import EXISTS, FAILED, WRITTEN


@dataclass(frozen=True)
class NodeThroughput:
    """What one node did: `images` rows (written, found existing or failed), in `busy_seconds` of actor time."""

    node: str
    images: int
    busy_seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.busy_seconds if self.busy_seconds > 0 else 0.0


@dataclass(frozen=True)
class BatchReport:
    """A cluster batch's outcome.

    `written`: results this run committed. `skipped`: results there before the job started (not sent to
    the cluster). `redone`: images whose result was found committed when an actor reached them, work
    that a lost node or driver had started (never written twice). `failed`: (source, reason) for
    each image that could not be upscaled or committed, missing inputs included. `unreported`: images
    sent to the cluster that no row came back for (0 unless Ray Data lost one; their results may exist).
    """

    planned: int
    written: int
    skipped: int
    redone: int
    failed: list[tuple[str, str]]
    unreported: int
    seconds: float
    nodes: list[NodeThroughput] = field(default_factory=list)

    @classmethod
    def of(cls, planned: int, skipped: int, missing: list[str], rows: list[dict], seconds: float) -> BatchReport:
        """The report of `rows` (the actors' output rows) for a batch of `planned` images, `skipped` of
        them done before it started and `missing` input files never sent."""
        statuses = [row["status"] for row in rows]
        failed = [(source, "no such file") for source in missing]
        failed += [(row["source"], row["error"]) for row in rows if row["status"] == FAILED]
        per_node: dict[str, list[float]] = defaultdict(list)
        for row in rows:
            per_node[row["node"]].append(float(row["seconds"]))
        nodes = [NodeThroughput(node, len(times), sum(times)) for node, times in sorted(per_node.items())]
        sent = planned - skipped - len(missing)
        return cls(planned, statuses.count(WRITTEN), skipped, statuses.count(EXISTS), failed,
                   max(sent - len(rows), 0), seconds, nodes)

    @property
    def ok(self) -> bool:
        """Every image has its result."""
        return not self.failed and not self.unreported

    def lines(self) -> list[str]:
        """The report as printed: a summary line, one line per node, one per failure."""
        summary = (f"done: {self.written} written, {self.skipped} skipped, {len(self.failed)} failed"
                   f" ({self.planned} images, {self.seconds:.1f} s)")
        if self.redone:
            summary += f"; {self.redone} found already written when their turn came (work redone after a loss)"
        if self.unreported:
            summary += f"; {self.unreported} never reported back (run the command again to check them)"
        lines = [summary]
        for node in self.nodes:
            lines.append(f"node {node.node}: {node.images} image(s), {node.busy_seconds:.1f} s busy,"
                         f" {node.images_per_second:.2f} images/s")
        lines += [f"failed: {source}: {reason}" for source, reason in self.failed]
        return lines
