"""The aiohttp example service (examples/python/booking_service.py), run as a user would."""
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import websockets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_booking_service_pushes_the_decision_of_a_booking_made_over_its_api():
    api = free_port()
    env = dict(os.environ, PUSHBOOK_SECRET="t")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples/python/booking_service.py"),
                             "--port", str(api)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # wait for the start-up line
            if re.search(r"booking API on", line):
                break
        token = json.load(urllib.request.urlopen(f"http://127.0.0.1:{api}/token?user=alice"))["token"]

        async def go():
            async with websockets.connect(f"ws://127.0.0.1:{api}/v1/ws",
                                          extra_headers={"Authorization": "Bearer " + token}) as ws:
                def post(body):
                    req = urllib.request.Request(f"http://127.0.0.1:{api}/bookings", method="POST",
                                                 data=json.dumps(body).encode())
                    return json.load(urllib.request.urlopen(req))
                ok = post({"user": "alice", "resource": "room-101"})
                bad = post({"user": "alice", "resource": "room-101", "metadata": {"card": "declined"}})
                assert ok["status"] == "processing"
                for i, ack in enumerate((ok, bad)):
                    await ws.send(json.dumps({"id": i, "op": "subscribe", "topic": "booking/" + ack["booking_id"]}))
                final = {}
                while len(final) < 2:
                    frame = await asyncio.wait_for(ws.recv(), 10)
                    for m in (json.loads(x) for x in frame.split("\n") if x):
                        if m.get("type") == "event" and m["data"]["status"] != "processing":
                            final[m["data"]["booking_id"]] = m["data"]
                return final[ok["booking_id"]], final[bad["booking_id"]]
        def refused(path, body=None):
            req = urllib.request.Request(f"http://127.0.0.1:{api}{path}", method="POST" if body else "GET",
                                         data=json.dumps(body).encode() if body else None)
            try:
                urllib.request.urlopen(req)
            except urllib.error.HTTPError as e:
                return e.code, json.load(e)["error"]["code"]
            raise AssertionError(f"{path} {body} was not refused")
        assert refused("/bookings", {"user": "alice", "resource": "room-101", "quantity": 99}) == \
            (422, "exceeds_capacity")
        assert refused("/bookings", {"user": "alice", "resource": "nowhere"}) == (404, "not_found")
        assert refused("/bookings", {"user": "alice"}) == (400, "bad_request")
        assert refused("/bookings", {"user": "alice", "resource": "room-101", "quantity": "two"}) == \
            (400, "bad_request")
        assert refused("/token?user=") == (400, "bad_request")
        ok, bad = asyncio.run(go())
        assert ok["status"] == "confirmed"
        assert bad["status"] == "rejected" and bad["reason"] == "rejected_by_handler"
        assert bad["reason_message"] == "card declined"
    finally:
        proc.terminate()
        proc.wait(10)
