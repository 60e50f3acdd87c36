"""The AMS client's pure parts: method table, error classification, documented shapes."""

from __future__ import annotations

import asyncio
import inspect
import re
from pathlib import Path

import msgspec
import pytest
from mailgate_core import ams
from mailgate_core.ams import (
    AmsAuthError,
    AmsBusyError,
    AmsClient,
    AmsInvalidParamsError,
    AmsMethodNotFoundError,
    AmsRpcError,
    Mailing,
    RelaySendingState,
    SendingJobParams,
    SendingJobRecipient,
    classify_error,
    instance_key,
    method_attribute,
)

SEED = Path("/work/shared/seeds/000_d549abb994124a93.txt")


def test_every_method_has_a_coroutine_on_the_client() -> None:
    assert len(ams.METHODS) == len(set(ams.METHODS)) == 62
    for method in ams.METHODS:
        attribute = getattr(AmsClient, method_attribute(method))
        assert inspect.iscoroutinefunction(attribute), method


@pytest.mark.skipif(not SEED.exists(), reason="seed not available")
def test_the_method_table_is_exactly_the_seeds_list() -> None:
    listed = set(re.findall(r"^\| `([a-z][a-zA-Z]+)` \|", SEED.read_text(), re.M))
    assert listed == set(ams.METHODS)


def test_method_attribute_names() -> None:
    assert method_attribute("getMailingListDataSet") == "get_mailing_list_data_set"
    assert method_attribute("stopMailing") == "stop_mailing"


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (
            -32603,
            "AMS is busy: another API command is being executed, try again later",
            AmsBusyError,
        ),
        (-32603, "Mailing 73 is opened by a user in the AMS interface", AmsBusyError),
        (-32603, "Рассылка открыта пользователем", AmsBusyError),
        (-32603, "Invalid apiKey", AmsAuthError),
        (-32603, "Неверный ключ API", AmsAuthError),
        (-32601, "Method not found", AmsMethodNotFoundError),
        (-32602, "Invalid params", AmsInvalidParamsError),
        (-32603, "Mailing 9 not found", AmsRpcError),
        (None, "", AmsRpcError),
    ],
)
def test_errors_are_classified_by_code_and_text(
    code: int | None, message: str, expected: type[AmsRpcError]
) -> None:
    assert classify_error(code, message) is expected


def test_busy_and_auth_errors_are_rpc_errors() -> None:
    assert issubclass(AmsBusyError, AmsRpcError) and issubclass(AmsAuthError, AmsRpcError)
    error = AmsBusyError(-32603, "busy", method="stopMailing")
    assert (error.code, error.message, error.method) == (-32603, "busy", "stopMailing")


def test_one_ams_instance_is_scheme_host_and_port() -> None:
    assert instance_key("http://192.168.1.100/api/v1") == "http://192.168.1.100:80"
    assert instance_key("HTTP://Ams.Local:80/other") == "http://ams.local:80"
    assert instance_key("https://ams.local/api/v1") == "https://ams.local:443"
    assert instance_key("http://ams.local:8080/api/v1") != instance_key("http://ams.local/api/v1")


def test_clients_of_one_instance_share_a_lock() -> None:
    async def locks() -> tuple[bool, bool]:
        a = ams.instance_lock("http://h:80/api/v1")
        b = ams.instance_lock("http://H/api/v1/")
        c = ams.instance_lock("http://other/api/v1")
        return a is b, a is c

    assert asyncio.run(locks()) == (True, False)


def test_the_seeds_get_mailings_entry_parses() -> None:
    entry = {
        "id": 73,
        "name": "Example Mailing",
        "type": "mailing",
        "state": "idle",
        "createDate": "2003-11-13",
        "lastStartDate": "2023-10-18T08:13:15.568",
        "approxSpeed": "0/min",
        "progressInfo": {
            "percentDone": 0,
            "total": 1,
            "sent": 0,
            "notSent": 0,
            "bad": 0,
            "refused": 0,
            "excluded": 0,
            "opened": 0,
            "clicks": 0,
        },
    }
    mailing = msgspec.convert(entry, Mailing, strict=False)
    assert (mailing.id, mailing.state, mailing.approx_speed) == (73, "idle", "0/min")
    assert mailing.last_start_date == "2023-10-18T08:13:15.568"
    assert mailing.progress_info.total == 1


def test_sending_job_shapes_use_ams_spelling_on_the_wire() -> None:
    params = msgspec.to_builtins(SendingJobParams(job_id=5, mailing_id=75))
    assert params == {"jobID": 5, "mailingID": 75}
    recipient = msgspec.convert(
        {
            "ID": "1",
            "Email": "user@example.com",
            "sendResult": "failed",
            "lastReply": "550 5.1.1 user not found",
            "failCategory": "bad email",
        },
        SendingJobRecipient,
    )
    assert (recipient.email, recipient.send_result, recipient.fail_category) == (
        "user@example.com",
        "failed",
        "bad email",
    )


def test_relay_states_tolerate_unknown_and_missing_keys() -> None:
    relay = msgspec.convert(
        {"id": 1, "name": "relay1", "sent": 10, "somethingNew": True}, RelaySendingState
    )
    assert (relay.name, relay.sent, relay.errors, relay.enabled) == ("relay1", 10, 0, True)
