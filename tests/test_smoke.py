from __future__ import annotations


def test_start_then_follow(client, server):
    assert client.post("/api/util/msgs/32074986/3").status_code == 201
    first = client.get("/api/pix/32074986/stream/start")
    assert first.status_code == 200
    nxt = first.headers["Pull-Next"]
    second = client.get(nxt, headers={"Accept": "multipart/json"})
    assert second.status_code == 200
    assert len(second.get_json()) == 2
    r = server.http.post("/api/util/msgs/32074986/2")
    assert r.status == 201
    r = server.http.get("/api/pix/32074986/stream/start", accept="multipart/json")
    assert r.status == 200 and len(r.json()) == 2
