"""A userspace service proxy for the real node: each Service's cluster IP and port, which the
node puts on a local interface, forwarded to the server behind it on 127.0.0.1.

This is what kube-proxy's old userspace mode did, for a fixed list of services: pods reach
`kubernetes.default.svc` (the `kubernetes` Service, 10.96.0.1:443) and the test's S3 server
at their cluster IPs, while the API server and S3 keep listening on 127.0.0.1 only.

    python -m servers.cluster.forward 10.96.0.1:443=127.0.0.1:6443 [more ...]
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


def _handler(host: str, port: int):  # type: ignore[no-untyped-def]
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.close()

    return handle


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


async def main(pairs: list[str]) -> None:
    servers = []
    for pair in pairs:
        listen, target = pair.split("=", 1)
        lhost, lport = _split(listen)
        servers.append(await asyncio.start_server(_handler(*_split(target)), lhost, lport))
        print(f"forwarding {listen} -> {target}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
