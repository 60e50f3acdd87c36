import msgspec
import pytest
from mailgate_core import schemas as s


def _ref() -> s.MessageRef:
    return s.MessageRef(
        mailgate_id="01J0000000000000000000000A", account_id="acc", recipient="a@x.ru"
    )


def test_every_event_round_trips_through_its_subject() -> None:
    events: list[s.Event] = [
        s.MailAccepted(
            message=_ref(),
            mail_from="n@ours.ru",
            credential="c",
            message_id_header="<x@y>",
            raw=b"From: a\r\n\r\nhi",
        ),
        s.MailSkipped(message=_ref(), mail_from="n@ours.ru", reason="unsubscribed"),
        s.MailSubmitted(message=_ref(), postal_id=1, postal_token="abcdefghijklmnop"),
        s.MailFailed(message=_ref(), reason="rejected", code="UnauthenticatedFromAddress"),
        s.PostalEvent(event="MessageSent", postal_timestamp=1.5, payload={"a": 1}),
        s.TrackOpen(mailgate_id="m"),
        s.TrackClick(url="https://x.ru", mailgate_id="m"),
        s.TrackUnsubscribe(mailgate_id="m", one_click=True),
        s.StatusEvent(name="delivered", message=_ref(), timestamp=10),
        s.PostmasterDaily(domain="ours.ru", date="2026-01-01", delivered=5),
        s.AmsMailingProgress(mailing_id="73", state="running"),
    ]
    for event in events:
        decoded = s.decode_subject(event.subject(), s.encode(event))
        assert decoded == event
    assert {e.subject() for e in events} >= {"postal.MessageSent", "status.delivered"}


def test_decoders_ignore_unknown_fields_from_newer_producers() -> None:
    event = s.TrackOpen(mailgate_id="m")
    data = msgspec.json.decode(s.encode(event))
    data["added_in_v2"] = {"anything": True}
    decoded = s.decode(msgspec.json.encode(data), s.TrackOpen)
    assert decoded.event_id == event.event_id


def test_a_malformed_message_raises_schema_error_naming_the_struct() -> None:
    with pytest.raises(s.SchemaError, match="MailSubmitted"):
        s.decode(b'{"postal_id": "not a number"}', s.MailSubmitted)
    with pytest.raises(s.SchemaError):
        s.decode_subject("nope.subject", b"{}")


def test_event_ids_are_unique_and_time_ordered() -> None:
    ids = [s.TrackOpen().event_id for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 26 for i in ids)
