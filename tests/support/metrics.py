"""Ray's metrics page as tests read it: the gateway's series of every replica (serving.metrics), each named
`ray_<name>` (counters `_total`) with Ray's labels (WorkerId, NodeAddress, SessionName, ...) beside Keel's.

Ray's agent keeps a counter of a worker that is gone at its last value: a test module reads the series of its
own gateway's workers, leaving out those an earlier module's left (`skip`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


class Scrape:
    def __init__(self, text: str, skip: Collection[str] = ()) -> None:
        self.text = text  # all of it, skipped workers' series too
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples
                        if s.labels.get("WorkerId") not in skip]

    def series(self, name: str, **labels: str) -> list[Sample]:
        """The samples named `name` whose labels include `labels`."""
        return [s for s in self.samples if s.name == name and labels.items() <= s.labels.items()]

    def total(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.series(name, **labels))

    def workers(self) -> set[str]:
        """The workers that counted something of the gateway's."""
        return {s.labels["WorkerId"] for s in self.samples if s.name.startswith("ray_keel_gateway_")
                and s.name.endswith("_total") and "WorkerId" in s.labels}


def scrape(url: str, skip: Collection[str] = ()) -> Scrape:
    r = httpx.get(url, timeout=10)
    r.raise_for_status()
    return Scrape(r.text, skip)


def wait_until(url: str, ready: Callable[[Scrape], bool], skip: Collection[str] = (), timeout_s: float = 20) -> Scrape:
    """The first scrape `ready` accepts: a replica reports every second (the test head's interval), and a series
    appears at the agent within two reports."""
    deadline = time.monotonic() + timeout_s
    while not ready(page := scrape(url, skip)):
        if time.monotonic() > deadline:
            keel = "\n".join(line for line in page.text.splitlines() if "keel_" in line)
            raise AssertionError(f"not ready within {timeout_s:g} s; Keel's series:\n{keel[-4000:]}")
        time.sleep(0.5)
    return page
