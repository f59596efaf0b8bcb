"""Several hosts for one test: network namespaces joined by a bridge, or one host's loopback.

With namespaces, each host has its own network stack, address and host name
(``ip netns exec NS unshare --uts``), so processes on different hosts know each
other only through the database and the network, as on separate machines. They
share the file system, as hosts share a mounted volume, and the clock. The test
process stays in the root namespace, which reaches every host over the bridge.

Without namespaces (a kernel or container that refuses them), every host is
127.0.0.1 and processes are told apart only by their ports.

Everything made here is removed afterwards, failure or not: processes (by their
process group), the host-side veth ends, the namespaces, the bridge.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from support.pacs import free_port


class NamespacesRefused(RuntimeError):
    """This kernel or container does not let the test make network namespaces (the message says why)."""


@dataclass(frozen=True)
class Host:
    name: str  # "a", "b", ...
    address: str  # where the other hosts (and the test) reach it
    netns: str | None = None  # None: the test's own host

    @property
    def hostname(self) -> str:
        return f"mi2b2-host-{self.name}"

    def launcher(self) -> list[str]:
        """The prefix that runs a command on this host."""
        if self.netns is None:
            return []
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', self.hostname]


@dataclass
class Hosts:
    kind: str  # "namespaces" | "one-host"
    hosts: dict[str, Host]
    root_address: str  # where hosts reach servers the test process runs
    _processes: dict[str, list[subprocess.Popen[bytes]]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def port(self) -> int:
        """A port for a server: free on 127.0.0.1, and a namespace host has all its ports free."""
        return free_port()

    def spawn(self, host: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log:
            process = subprocess.Popen([*self.hosts[host].launcher(), *argv], stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        self._processes.setdefault(host, []).append(process)
        return process

    def kill(self, host: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to every process started on ``host`` (each in its own process group)."""
        for process in self._processes.get(host, []):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
        if sig == signal.SIGKILL:
            for process in self._processes.pop(host, []):
                process.wait(10)

    def stop(self, process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
        """SIGTERM one process, SIGKILL if it lingers."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        for started in self._processes.values():
            if process in started:
                started.remove(process)

    def stop_all(self) -> None:
        for host in list(self._processes):
            for process in list(self._processes[host]):
                self.stop(process, grace=10.0)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NamespacesRefused(f"`ip {' '.join(args)}` failed: {done.stderr.strip() or done.returncode}")


@contextlib.contextmanager
def namespace_hosts(names: Sequence[str]) -> Iterator[Hosts]:
    """One namespace per name on a bridge of its own; raises NamespacesRefused when the kernel says no."""
    tag = f"{os.getpid() % 0x10000:04x}"
    subnet = f"10.215.{random.randrange(1, 250)}"
    bridge = f"m15b{tag}"
    made_links: list[str] = []
    made_namespaces: list[str] = []
    made_bridge = False
    hosts = Hosts("namespaces", {}, f"{subnet}.1")
    try:
        _ip("link", "add", bridge, "type", "bridge")
        made_bridge = True
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for n, name in enumerate(names, start=2):
            netns, outside, inside = f"mi2b2-{tag}-{name}", f"m15{tag}{name}", f"m15{tag}{name}n"
            _ip("netns", "add", netns)
            made_namespaces.append(netns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            made_links.append(outside)
            _ip("link", "set", inside, "netns", netns)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", netns, "addr", "add", f"{subnet}.{n}/24", "dev", inside)
            _ip("-n", netns, "link", "set", inside, "up")
            _ip("-n", netns, "link", "set", "lo", "up")
            hosts.hosts[name] = Host(name, f"{subnet}.{n}", netns)
        yield hosts
    finally:
        hosts.stop_all()
        for link in made_links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)
        for netns in made_namespaces:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        if made_bridge:
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)


@contextlib.contextmanager
def local_hosts(names: Sequence[str]) -> Iterator[Hosts]:
    """Every host is this one: 127.0.0.1, told apart by ports."""
    hosts = Hosts("one-host", {name: Host(name, "127.0.0.1") for name in names}, "127.0.0.1")
    try:
        yield hosts
    finally:
        hosts.stop_all()
