"""A Python web app serving the push protocol through pushbook's adapter, for the tests that run
one protocol suite against the Beast gateway and the Python hosts.

    protocol_host.py --kind aiohttp|asgi --secret S [--resource ID:CAP ...] [--port 0]

Prints "listening on http://127.0.0.1:PORT (KIND)" once it serves; SIGTERM stops it gracefully
(WebSockets closed with 1001).
"""
import argparse
import asyncio
import signal
import sys

import pushbook


async def serve_aiohttp(engine, bus, args):
    from aiohttp import web
    import pushbook.aiohttp

    app = web.Application()
    pushbook.aiohttp.setup(app, engine, bus, user_of=pushbook.aiohttp.bearer_user(args.secret),
                           secret=args.secret)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"listening on http://127.0.0.1:{port} ({args.kind})", flush=True)
    await stop.wait()
    # Stopping already: a second SIGTERM changes nothing. The loop's handler is removed first: a
    # loop that closes with it still registered puts SIGTERM back to its default (the process
    # would die of a second SIGTERM while the engine shuts down, exit status -15).
    loop.remove_signal_handler(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    await runner.cleanup()


async def serve_asgi(engine, bus, args):
    import uvicorn
    from fastapi import FastAPI
    import pushbook.asgi

    push = pushbook.asgi.PushEndpoint(engine, bus, user_of=pushbook.asgi.bearer_user(args.secret),
                                      secret=args.secret)
    app = FastAPI()
    app.add_websocket_route("/v1/ws", push)
    app.add_route("/v1/events", pushbook.asgi.EventsEndpoint(push))
    server = pushbook.asgi.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning",
                                                 lifespan="off"), [push])
    serving = asyncio.create_task(server.serve())  # uvicorn handles SIGTERM: 1001 first, then stop
    while not server.started:
        if serving.done():
            return await serving
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{port} ({args.kind})", flush=True)
    await serving


async def main(args):
    bus = pushbook.LocalBus()
    engine = pushbook.BookingEngine(bus, workers=2)
    for spec in args.resource:
        rid, cap = spec.rsplit(":", 1)
        engine.add_resource(rid, capacity=int(cap))
    try:
        await {"aiohttp": serve_aiohttp, "asgi": serve_asgi}[args.kind](engine, bus, args)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--kind", choices=["aiohttp", "asgi"], required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--secret", required=True)
    p.add_argument("--resource", action="append", default=[])
    asyncio.run(main(p.parse_args()))
    sys.exit(0)
