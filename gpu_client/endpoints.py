"""Which coordinator a node connects to next: MESH_COORDINATOR_URL's list, tried in turn.

A node configured with several coordinators (an HA mesh: one leader, standbys) tries them in
order; a standby closes the socket with 4010 NOT_LEADER and the leader's ws:// URL as the
reason. The node follows that pointer only to a URL it was configured with (compared by
scheme, host and port, case-insensitively): the reason is text from whoever answered on that
port, and the node sends its join token and credential to wherever it connects, so a standby
(or anything impersonating one) must not be able to send it to an arbitrary host. A pointer
outside the list is logged and the node tries the next configured URL instead.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Generator

from gpu_client.settings import normalize_url
from shared.config import ConfigError

log = logging.getLogger(__name__)


def reconnect_delays(max_s: float) -> Generator[float, None, None]:
    """Jittered, capped exponential backoff: 0..0.5 s, then 0.5 s x 1.6^n up to max_s."""
    yield random.uniform(0.0, 0.5)
    n = 0
    while True:
        base = min(max_s, 0.5 * 1.6**n)
        yield random.uniform(base / 2, base)
        n += 1


def _key(url: str) -> str:
    return url.lower().rstrip("/")


class Endpoints:
    def __init__(self, urls: tuple[str, ...]) -> None:
        assert urls, "at least one coordinator URL"
        self.urls = urls
        self._i = 0
        self._failed_in_round = 0

    @property
    def current(self) -> str:
        return self.urls[self._i]

    def failed(self) -> bool:
        """The current URL did not serve us: move to the next. True when every URL failed
        since the last success (the caller backs off then, not between URLs of a round)."""
        self._i = (self._i + 1) % len(self.urls)
        self._failed_in_round += 1
        if self._failed_in_round >= len(self.urls):
            self._failed_in_round = 0
            return True
        return False

    def served(self) -> None:
        """The current URL registered us: start the next round from it."""
        self._failed_in_round = 0

    def redirect(self, reason: str) -> bool:
        """Follow a standby's 4010 to the leader if the leader is one of our URLs."""
        try:
            target = _key(normalize_url(reason))
        except ConfigError:
            target = ""
        for i, url in enumerate(self.urls):
            if _key(url) == target and target:
                self._i = i
                return True
        log.warning(
            "coordinator %s says the leader is %r, which is not in MESH_COORDINATOR_URL; "
            "not following it (add it to the list if it is this mesh's)", self.current, reason)
        self.failed()
        return False
