"""The Postal sandbox's API rules without HTTP (specs/postal.md §1-§5)."""

import base64
from collections.abc import AsyncIterator

import pytest
from mailgate_fakes.postal import Faults, PostalSandbox, strip_name_from_address

KEY = "k" * 24


@pytest.fixture
async def sandbox() -> AsyncIterator[PostalSandbox]:
    box = PostalSandbox([KEY], domains=["ours.example"])
    yield box
    await box.close()


def raw_mail(from_: str = "news@ours.example", extra: str = "") -> str:
    text = (
        f"From: News <{from_}>\r\nTo: a@x.com\r\nSubject: Hi\r\n"
        f"Message-ID: <01HZZZZZZZZZZZZZZZZZZZZZZZ@ours.example>\r\n{extra}\r\nHello\r\n"
    )
    return base64.b64encode(text.encode()).decode()


def message_params(**overrides: object) -> dict[str, object]:
    params: dict[str, object] = {
        "to": ["a@x.com"],
        "from": "news@ours.example",
        "plain_body": "hi",
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


def test_auth_errors(sandbox: PostalSandbox) -> None:
    denied = sandbox.call("send/raw", {}, None)
    assert (denied["status"], denied["data"]["code"]) == ("error", "AccessDenied")
    invalid = sandbox.call("send/raw", {}, "nope")
    assert invalid["data"] == {
        "message": "The API token provided in X-Server-API-Key was not valid.",
        "token": "nope",
        "code": "InvalidServerAPIKey",
    }
    sandbox.faults.update({"suspended": True})
    assert sandbox.call("send/raw", {}, KEY)["data"] == {"code": "ServerSuspended"}


@pytest.mark.parametrize(
    ("params", "code"),
    [
        (message_params(to=None), "NoRecipients"),
        (
            message_params(to=[f"u{i}@x.com" for i in range(51)], plain_body=None),
            "TooManyToAddresses",
        ),
        (message_params(cc=[f"u{i}@x.com" for i in range(51)], from_=None), "TooManyCCAddresses"),
        (message_params(bcc=[f"u{i}@x.com" for i in range(51)]), "TooManyBCCAddresses"),
        (message_params(plain_body=None, **{"from": None}), "NoContent"),
        (message_params(**{"from": None}), "FromAddressMissing"),
        (
            message_params(**{"from": "a@other.example"}, attachments=[{}]),
            "UnauthenticatedFromAddress",
        ),
        (message_params(attachments=[{"data": "eA=="}, {"name": "a"}]), "AttachmentMissingName"),
        (message_params(attachments=["skipped", {"name": "a"}]), "AttachmentMissingData"),
    ],
)
def test_send_message_reports_only_the_first_failure_in_postals_order(
    sandbox: PostalSandbox, params: dict[str, object], code: str
) -> None:
    answer = sandbox.call("send/message", params, KEY)
    assert answer["status"] == "error"
    assert answer["data"]["code"] == code
    assert answer["data"]["message"]


async def test_send_message_caps_are_inclusive_and_names_are_stripped(
    sandbox: PostalSandbox,
) -> None:
    to = ", ".join(f"User {i} <u{i}@x.com>" for i in range(50))
    answer = sandbox.call("send/message", message_params(to=to, tag="t1"), KEY)
    assert answer["status"] == "success"
    assert len(answer["data"]["messages"]) == 50
    assert "u0@x.com" in answer["data"]["messages"]
    assert answer["data"]["message_id"].endswith("@rp.postal.example.com")
    assert {m["tag"] for m in sandbox.messages} == {"t1"}


async def test_a_duplicate_address_in_send_message_is_sent_twice(sandbox: PostalSandbox) -> None:
    answer = sandbox.call("send/message", message_params(to=["a@x.com", "a@x.com"]), KEY)
    assert len(sandbox.messages) == 2
    assert answer["data"]["messages"]["a@x.com"]["id"] == sandbox.messages[1]["id"]


@pytest.mark.parametrize(
    ("params", "text"),
    [
        (
            {"rcpt_to": "a@x.com", "mail_from": "m", "data": "x"},
            "`rcpt_to` parameter is required but is missing",
        ),
        (
            {"rcpt_to": [], "mail_from": " ", "data": "x"},
            "`mail_from` parameter is required but is missing",
        ),
        ({"rcpt_to": [], "mail_from": "m@x"}, "`data` parameter is required but is missing"),
    ],
)
def test_send_raw_parameter_errors(sandbox: PostalSandbox, params: dict, text: str) -> None:
    answer = sandbox.call("send/raw", params, KEY)
    assert answer == {**answer, "status": "parameter-error", "data": {"message": text}}


async def test_send_raw_dedupes_recipients_and_reads_message_id_and_tag(
    sandbox: PostalSandbox,
) -> None:
    data = raw_mail(extra="X-Postal-Tag: first\r\nX-Postal-Tag: camp-7\r\n")
    answer = sandbox.call(
        "send/raw",
        {"rcpt_to": ["a@x.com", "b@x.com", "a@x.com"], "mail_from": "b@ours.example", "data": data},
        KEY,
    )
    assert answer["status"] == "success"
    assert answer["data"]["message_id"] == "01HZZZZZZZZZZZZZZZZZZZZZZZ@ours.example"
    assert list(answer["data"]["messages"]) == ["a@x.com", "b@x.com"]
    ids = [m["id"] for m in sandbox.messages]
    assert ids == sorted(ids) and len(set(ids)) == 2
    for message in sandbox.messages:
        assert message["tag"] == "camp-7"
        assert message["mail_from"] == "b@ours.example"
        assert len(message["token"]) == 16 and message["token"].isalnum()
        assert message["raw"] == base64.b64decode(data)


def test_send_raw_with_no_recipients_succeeds_with_nothing(sandbox: PostalSandbox) -> None:
    answer = sandbox.call("send/raw", {"rcpt_to": [], "mail_from": "m@x", "data": raw_mail()}, KEY)
    assert answer["data"] == {"message_id": None, "messages": {}}


def test_send_raw_authenticates_the_from_header_not_mail_from(sandbox: PostalSandbox) -> None:
    params = {
        "rcpt_to": ["a@x.com"],
        "mail_from": "b@ours.example",
        "data": raw_mail("x@other.example"),
    }
    answer = sandbox.call("send/raw", params, KEY)
    assert (answer["status"], answer["data"]) == ("error", {"code": "UnauthenticatedFromAddress"})
    assert sandbox.messages == []


def test_headers_end_at_the_first_blank_crlf_line(sandbox: PostalSandbox) -> None:
    text = "Subject: x\r\n\r\nFrom: news@ours.example\r\n\r\nbody"
    params = {
        "rcpt_to": ["a@x.com"],
        "mail_from": "m@x",
        "data": base64.b64encode(text.encode()).decode(),
    }
    assert sandbox.call("send/raw", params, KEY)["data"]["code"] == "UnauthenticatedFromAddress"


async def test_messages_endpoints_and_message_not_found(sandbox: PostalSandbox) -> None:
    params = {"rcpt_to": ["a@x.com"], "mail_from": "m@ours.example", "data": raw_mail()}
    sent = sandbox.call("send/raw", params, KEY)["data"]["messages"]["a@x.com"]
    found = sandbox.call("messages/message", {"id": sent["id"], "_expansions": ["details"]}, KEY)
    assert found["data"]["token"] == sent["token"]
    assert found["data"]["details"]["message_id"] == "01HZZZZZZZZZZZZZZZZZZZZZZZ@ours.example"
    assert "status" not in found["data"]
    missing = sandbox.call("messages/deliveries", {"id": 999}, KEY)
    assert missing["data"] == {
        "message": "No message found matching provided ID",
        "id": 999,
        "code": "MessageNotFound",
    }


def test_strip_name_from_address() -> None:
    assert strip_name_from_address("A B <a@b.c>") == "a@b.c"
    assert strip_name_from_address(" a@b.c ") == "a@b.c"


def test_faults_validate_their_names() -> None:
    faults = Faults()
    faults.update({"timeout_s": 2})
    assert faults.timeout_requests == 1
    with pytest.raises(ValueError, match="unknown fault"):
        faults.update({"nope": 1})
