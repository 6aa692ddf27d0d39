"""The HTTP API's operational endpoints on a running chatd."""

import json
import urllib.error
import urllib.request

import trio

from tests.wire import connect


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


async def test_healthz_and_readyz(chatd_server):
    base = chatd_server.http_urls[0]
    status, _, body = await trio.to_thread.run_sync(_get, base + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "alive"
    status, _, body = await trio.to_thread.run_sync(_get, base + "/readyz")
    assert status == 200 and json.loads(body) == {"status": "ready"}


async def test_readyz_is_503_while_draining(chatd_server):
    chatd_server.draining = True
    status, _, body = await trio.to_thread.run_sync(_get, chatd_server.http_urls[0] + "/readyz")
    assert status == 503 and "draining" in json.loads(body)["problems"]
    chatd_server.draining = False


async def test_metrics_count_connections_and_deliveries(chatd_server):
    async with connect(chatd_server, "alice") as a:
        room = (await a.call("create_group", title="m", client_id="g"))["room"]["room_id"]
        await a.call("send", room_id=room, client_msg_id="x", body="hello")
        status, ctype, body = await trio.to_thread.run_sync(_get, chatd_server.http_urls[0] + "/metrics")
    text = body.decode()
    assert status == 200 and ctype.startswith("text/plain")
    assert "chatd_connections 1.0" in text
    deliveries = [l for l in text.splitlines() if l.startswith("chatd_deliveries_total")]
    assert deliveries and float(deliveries[0].split()[-1]) >= 3  # room_created, member_joined, message
    assert 'chatd_gc_max_pause_seconds{generation="2"}' in text
    assert "chatd_writer_batches_total" in text and "chatd_writer_lingered_total" in text
    assert all(f"chatd_search_{name}_total" in text for name in ("merges", "merged_pages", "merge_failures"))
