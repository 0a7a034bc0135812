"""The portal emulator behaves as the portal's callback controller does."""

from __future__ import annotations

import json
import threading
import time

import httpx

from gateway.bitrix.simulator import CALLBACK_PATH


def post(url: str, body: object, content_type: str = "application/json") -> dict:
    raw = json.dumps(body) if content_type == "application/json" else "result=hi"
    return httpx.post(url, content=raw, headers={"Content-Type": content_type}).json()


def test_each_hash_works_once(portal):
    job_hash, body = portal.new_request()
    assert len(job_hash) == 32 and body["auth"] is None and body["callbackUrl"].startswith(portal.url + CALLBACK_PATH)
    assert post(body["callbackUrl"], {"result": "hi"}) == {"status": "success", "data": True, "errors": []}
    assert post(body["errorCallbackUrl"], {"message": "x", "code": 500})["data"] is False
    job = portal.wait(job_hash, 1)
    assert [(c.kind, c.accepted) for c in job.callbacks] == [("success", True), ("error", False)]


def test_expired_and_unknown_hashes_answer_data_false(portal):
    job_hash, body = portal.new_request(ttl=1)
    time.sleep(1.1)
    assert post(body["callbackUrl"], {"result": "late"})["data"] is False
    assert post(body["callbackUrl"].replace(job_hash, "x" * 32), {"result": "?"})["data"] is False


def test_form_encoded_success_is_consumed_as_empty(portal):
    job_hash, body = portal.new_request()
    assert post(body["callbackUrl"], None, content_type="application/x-www-form-urlencoded")["data"] is True
    assert portal.jobs[job_hash].delivered[0].body == {"result": "[]"}  # what PHP would store


def test_scripted_outage(portal):
    _job_hash, body = portal.new_request()
    portal.fail_next(503)
    assert httpx.post(body["callbackUrl"], json={"result": "x"}).status_code == 503
    assert post(body["callbackUrl"], {"result": "x"})["data"] is True


def test_control_api_drives_it_from_another_process(portal):
    created = httpx.post(portal.url + "/-/requests", json={"prompt": "remote", "ttl": 60}).json()
    job_hash, body = created["hash"], created["body"]
    assert body["prompt"] == "remote" and body["ttl"] == 60

    def deliver_later() -> None:
        time.sleep(0.2)
        post(body["callbackUrl"], {"result": "done"})

    threading.Thread(target=deliver_later).start()
    shown = httpx.get(f"{portal.url}/-/requests/{job_hash}", params={"wait": 5}).json()
    assert shown["consumed"] and shown["callbacks"][0]["body"] == {"result": "done"}
    waited = httpx.post(portal.url + "/-/wait", json={"hashes": [job_hash], "timeout": 1}).json()
    assert waited[job_hash][0]["accepted"] is True
    assert httpx.get(f"{portal.url}/-/requests/unknown").status_code == 404
