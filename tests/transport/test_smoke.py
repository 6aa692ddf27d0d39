"""The shortest end-to-end path: two users, a group, a message, a sync."""

from tests.wire import connect


async def test_group_message_reaches_both_and_sync_returns_it(chatd_server):
    async with connect(chatd_server, "alice") as a, connect(chatd_server, "bob") as b:
        room = (await a.call("create_group", title="Ops", members=["bob"], client_id="g1"))["room"]
        assert room["member_count"] == 2 and room["last_seq"] == 3
        sent = await a.call("send", room_id=room["room_id"], client_msg_id="m1", body="hi bob")
        assert sent["seq"] == 4 and sent["duplicate"] is False
        seen = await b.events(room["room_id"], 4)
        assert [e["seq"] for e in seen] == [1, 2, 3, 4]
        assert seen[-1]["data"] == {"body": "hi bob"} and seen[-1]["sender"] == "alice"
        synced = await b.call("sync", rooms={room["room_id"]: 3})
        assert [e["seq"] for e in synced["rooms"][0]["events"]] == [4]
