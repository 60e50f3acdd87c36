"""Bytes the tracker answers with: the pixel and the small bilingual pages (no external assets)."""

from __future__ import annotations

import html

#: A 1x1 transparent GIF (43 bytes).
PIXEL_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)

NO_CACHE_HEADERS = {
    "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0, private",
    "Pragma": "no-cache",
    "Expires": "Thu, 01 Jan 1970 00:00:00 GMT",
}

INVALID_LINK_TEXT = "Ссылка недействительна или устарела.\nThis link is invalid or has expired.\n"

_STYLE = (
    "body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:32rem;"
    "margin:4rem auto;padding:0 1rem;color:#222;line-height:1.5}"
    "button{font-size:1rem;padding:.6rem 1.2rem;cursor:pointer}"
    "p.en{color:#555}"
)


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="ru"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta name="robots" content="noindex,nofollow">'
        f"<title>{title}</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def unsubscribe_confirm_page(action: str) -> str:
    """The GET page: nothing happens until the person presses the button (scanners follow
    links; they don't submit forms)."""
    return _page(
        "Отписка от рассылки / Unsubscribe",
        "<h1>Отписаться от рассылки?</h1>"
        "<p>Вы больше не будете получать письма этой рассылки.</p>"
        '<p class="en" lang="en">Unsubscribe from this mailing list? '
        "You will no longer receive these emails.</p>"
        f'<form method="post" action="{html.escape(action, quote=True)}">'
        '<input type="hidden" name="confirm" value="yes">'
        '<button type="submit">Отписаться / Unsubscribe</button></form>',
    )


def unsubscribed_page() -> str:
    return _page(
        "Вы отписаны / Unsubscribed",
        "<h1>Вы отписаны</h1><p>Вы больше не будете получать письма этой рассылки.</p>"
        '<p class="en" lang="en">You have been unsubscribed and will no longer receive '
        "these emails.</p>",
    )


def unsubscribe_failed_page() -> str:
    """503 for a person who pressed the button while the event could not be recorded."""
    return _page(
        "Попробуйте ещё раз / Please try again",
        "<h1>Отписаться не получилось</h1>"
        "<p>Сейчас мы не можем записать вашу отписку. Пожалуйста, повторите через минуту.</p>"
        '<p class="en" lang="en">We could not record your unsubscribe right now. '
        "Please try again in a minute.</p>",
    )
