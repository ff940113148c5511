"""A Python booking service on aiohttp with pushbook underneath.

Its own HTTP API takes bookings; a Python handler stands in for the payment call; the same app,
on the same port, serves the push protocol at /v1/ws (pushbook.aiohttp), which pushes each
decision to the client's WebSocket the moment it is made. One origin, one port, one auth.

    PUSHBOOK_SECRET=s3cret PYTHONPATH=build/python python3 examples/python/booking_service.py

See examples/python/README.md for a session with curl and a WebSocket client.
"""
import argparse
import asyncio
import logging
import os
import signal

from aiohttp import web

import pushbook
import pushbook.aiohttp

log = logging.getLogger("booking-service")


async def payment(booking):
    """The business step: a (simulated) call to a payment provider."""
    await asyncio.sleep(0.05)
    if booking.metadata.get("card") == "declined":
        return pushbook.Decision(False, "card declined")
    return True


# HTTP status of each pushbook error code (the gateway's own REST API uses the same).
STATUS = {"bad_request": 400, "not_found": 404, "already_exists": 409, "exceeds_capacity": 422,
          "idempotency_conflict": 422, "invalid_transition": 409, "capacity_in_use": 409,
          "overloaded": 503, "shutting_down": 503, "store_failed": 500}


def error(code, message):
    return web.json_response({"error": {"code": code, "message": message}}, status=STATUS.get(code, 422))


def make_app(engine, bus, secret):
    routes = web.RouteTableDef()

    @routes.post("/bookings")
    async def book(request):
        try:
            body = await request.json()
            if not isinstance(body, dict):
                return error("bad_request", "the body must be a JSON object")
            # submit_async: the loop never waits for the store (a SQLite commit, say).
            ack = await asyncio.wrap_future(engine.submit_async(
                user=body["user"], resource=body["resource"], quantity=body.get("quantity", 1),
                idempotency_key=request.headers.get("Idempotency-Key"), metadata=body.get("metadata")))
        except pushbook.Error as e:  # first: pushbook.ValidationError is a ValueError too
            return error(e.code, e.message)
        except KeyError as e:
            return error("bad_request", f"missing field {e}")
        except (ValueError, TypeError) as e:  # not JSON, or a field of the wrong type
            return error("bad_request", str(e))
        # The decision is pushed: subscribe to booking/<id> over /v1/ws (or book over it).
        return web.json_response({"booking_id": ack.booking_id, "status": ack.status.value,
                                  "push": "/v1/ws"}, status=202)

    @routes.get("/bookings/{booking_id}")
    async def get(request):
        try:
            return web.json_response(engine.get(request.match_info["booking_id"]).to_dict())
        except pushbook.Error as e:
            return error(e.code, e.message)

    @routes.get("/token")
    async def token(request):
        # Demo login: a real service gets tokens from its identity provider.
        user = request.query.get("user", "")
        if not user:
            return error("bad_request", "name the user: /token?user=<id>")
        return web.json_response({"token": pushbook.sign_token(user, 3600, secret)})

    app = web.Application()
    app.add_routes(routes)
    # The push protocol on this app's port. Here the user is whoever a token from /token names;
    # a real service passes its own session or identity check as user_of.
    pushbook.aiohttp.setup(app, engine, bus, user_of=pushbook.aiohttp.bearer_user(secret), secret=secret)
    return app


async def main(args):
    secret = os.environ.get("PUSHBOOK_SECRET", "dev-secret-change-me")
    bus = pushbook.LocalBus()
    engine = pushbook.BookingEngine(bus, workers=2, handler=payment, loop=asyncio.get_running_loop())
    for spec in args.resource:
        rid, cap = spec.rsplit(":", 1)
        engine.add_resource(rid, capacity=int(cap))
    runner = web.AppRunner(make_app(engine, bus, secret))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    log.info("booking API on http://127.0.0.1:%d, push on ws://127.0.0.1:%d/v1/ws", port, port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()  # WebSockets close with 1001 "going away" (pushbook.aiohttp)
        engine.shutdown()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--resource", action="append", default=[], help="ID:CAPACITY (repeatable)")
    a = parser.parse_args()
    a.resource = a.resource or ["room-101:5", "room-102:5"]
    try:
        asyncio.run(main(a))
    except KeyboardInterrupt:
        pass
