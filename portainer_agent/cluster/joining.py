"""Finding the cluster: resolve the cluster address, contact every result, keep trying.

The Go agent resolved ``tasks.<service>`` once, three seconds after start, and gave up for good
if nobody answered: with Docker's DNS late or incomplete at start (the most reported failure),
agents stayed alone forever. Here the joiner:

* resolves the name to *all* its A/AAAA records and contacts each one (ignoring our own
  addresses, logged once),
* retries with a jittered exponential backoff (1 s doubling to 15 s, plus up to 1 s drawn at
  random, Twisted's ``backoffPolicy``) until at least one peer answers: a global service
  restarted on every node at once does not retry in lockstep,
* then keeps re-resolving every ``rejoin_interval`` (30 s) and contacts any address that is not
  a live member yet, which merges clusters that formed apart (e.g. two halves started while
  DNS only listed half of the tasks),
* and falls back to the fast retry whenever we find ourselves alone again.

Clock-injected and resolver-injected; no reactor import.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Callable, Generator, Iterable

import attrs
from twisted.application.internet import backoffPolicy
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from portainer_agent.cluster.member import PeerAddress, format_hostport
from portainer_agent.cluster.swim import Clock, DelayedCall, SwimNode

log = Logger(namespace="portainer_agent.cluster")

#: ``resolve(host) -> Deferred[list of IP strings]`` (every A and AAAA record).
Resolver = Callable[[str], "Deferred[list[str]]"]


class InvalidClusterAddress(ValueError):
    """``--cluster-addr`` is not ``name``, ``name:port``, ``ip``, ``ip:port`` or ``[ipv6]:port``."""


@attrs.frozen
class ClusterAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)


def parse_cluster_address(text: str, default_port: int) -> ClusterAddress:
    """Parse ``--cluster-addr``: a name or address with an optional port."""
    text = text.strip()
    if not text:
        raise InvalidClusterAddress("empty cluster address")
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise InvalidClusterAddress(f"unbalanced bracket in {text!r}")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise InvalidClusterAddress(f"garbage after ] in {text!r}")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _port(port_text, text)
    elif text.count(":") > 1:
        try:
            ipaddress.IPv6Address(text)
        except ValueError as error:
            raise InvalidClusterAddress(f"not an address: {text!r}") from error
    if not host:
        raise InvalidClusterAddress(f"no host in {text!r}")
    return ClusterAddress(host, port)


def _port(text: str, whole: str) -> int:
    try:
        port = int(text)
    except ValueError as error:
        raise InvalidClusterAddress(f"bad port in {whole!r}") from error
    if not 0 < port < 65536:
        raise InvalidClusterAddress(f"port out of range in {whole!r}")
    return port


class Joiner:
    """Keeps this node joined to whatever the cluster address resolves to."""

    def __init__(
        self,
        node: SwimNode,
        address: ClusterAddress,
        resolve: Resolver,
        clock: Clock,
        own_addresses: Iterable[str] = (),
        initial_backoff: float = 1.0,
        max_backoff: float = 15.0,
        rejoin_interval: float = 30.0,
        check_interval: float = 5.0,
        jitter: Callable[[], float] | None = None,
    ) -> None:
        self.node = node
        self.address = address
        self.resolve = resolve
        self.clock = clock
        self.own_addresses = set(own_addresses) | {node.local.cluster_addr}
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.rejoin_interval = rejoin_interval
        self.check_interval = check_interval
        self._last_resolve = 0.0
        self.attempts = 0
        self.joined = False
        #: Delay before retry number n (0-based): doubling, capped, plus ``jitter()`` seconds
        #: (0 to 1 s at random by default).
        self._delay_for = backoffPolicy(initialDelay=initial_backoff, maxDelay=max_backoff, factor=2.0,
                                        **({"jitter": jitter} if jitter is not None else {}))
        self._failures = 0
        self._timer: DelayedCall | None = None
        self._running = False
        self._logged_self: set[str] = set()

    def start(self) -> None:
        self._running = True
        self._schedule(0)

    def stop(self) -> None:
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, delay: float) -> None:
        if self._running:
            self._timer = self.clock.callLater(delay, self._attempt)

    def _watch(self) -> None:
        """While joined: re-resolve every ``rejoin_interval``, or at once if we are alone."""
        if not self._running:
            return
        check = min(self.rejoin_interval, self.check_interval)

        def tick() -> None:
            self._timer = None
            if self.node.cluster_size() <= 1 or self.clock.seconds() - self._last_resolve >= self.rejoin_interval:
                self._attempt()
            else:
                self._watch()

        self._timer = self.clock.callLater(check, tick)

    @inlineCallbacks
    def _attempt(self) -> Generator[Any, Any, None]:
        self._timer = None
        self.attempts += 1
        try:
            addresses = yield self.resolve(self.address.host)
        except Exception as error:  # noqa: BLE001 - DNS failures are expected at start
            log.info("cannot resolve cluster address {address} yet: {error}", address=str(self.address),
                     error=str(error) or error.__class__.__name__)
            addresses = []
        peers = self._peers(addresses or [])
        alone = self.node.cluster_size() <= 1
        live = {m.key for m in self.node.live_members()}
        fresh = [p for p in peers if alone or p.key not in live]
        answered = 0
        if fresh:
            answered = yield self.node.join(fresh)
        if answered or self.node.cluster_size() > 1:
            if not self.joined or answered:
                log.info(
                    "in a cluster of {members} members (through {address}: {answered} of {contacted} "
                    "contacted addresses answered)",
                    address=str(self.address), answered=answered, contacted=len(fresh),
                    members=self.node.cluster_size(),
                )
            self.joined = True
            self._failures = 0
            self._last_resolve = self.clock.seconds()
            self._watch()
            return
        self.joined = False
        delay = self._delay_for(self._failures)
        self._failures += 1
        # Info on the first failures, then quieter: a lone seed agent retries for its whole life.
        capped = self.initial_backoff * 2 ** (self._failures - 1) >= self.max_backoff
        emit = log.info if not capped or self.attempts % 20 == 0 else log.debug
        emit(
            "no agent answered at {address} ({count} addresses); retrying in {delay}s",
            address=str(self.address), count=len(peers), delay=round(delay, 2),
        )
        self._schedule(delay)

    def _peers(self, addresses: Iterable[str]) -> list[PeerAddress]:
        peers = []
        for address in dict.fromkeys(addresses):
            if address in self.own_addresses:
                if address not in self._logged_self:
                    self._logged_self.add(address)
                    log.info("cluster address {address} includes this agent ({own}); skipping it",
                             address=str(self.address), own=address)
                continue
            peers.append(PeerAddress(address, self.address.port))
        return peers
