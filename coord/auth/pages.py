"""The sign-in pages: small HTML that says what happened and what to do next (pure: strings in, strings out).

Every value from a node or an IdP is escaped. The pages load nothing from anywhere (no scripts, fonts or
images), and the shell serves them with ``no-store`` caching, no referrer and no framing (the confirm page must
not be clickjacked into an approval).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from coord.auth.claims import Profile

HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:36em;margin:3em auto;padding:0 1em;line-height:1.5}"
    "dt{font-weight:600}dd{margin:0 0 .5em 0}button{font-size:1em;padding:.4em 1.2em}"
    ".code{font-family:monospace;color:#555}"
)


@dataclass(frozen=True)
class Machine:
    """What the confirm page shows of the machine that asked to join."""

    hostname: str
    os: str
    source: str
    age_s: float


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def page(title: str, message: str, next_step: str = "", *, code: str = "") -> str:
    parts = [f"<h1>{_e(title)}</h1>", f'<p id="message">{_e(message)}</p>']
    if next_step:
        parts.append(f'<p id="next">{_e(next_step)}</p>')
    if code:
        parts.append(f'<p class="code" id="code">{_e(code)}</p>')
    return _doc(title, "".join(parts))


def _doc(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)} · Shoal</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def age_text(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} seconds ago"
    if s < 3600:
        return f"{s // 60} minutes ago"
    return f"{s // 3600} hours ago"


def confirm(machine: Machine, profile: Profile, *, action: str, confirm_id: str, csrf: str) -> str:
    groups = ", ".join(profile.groups) or "none"
    rows = [
        ("Machine", machine.hostname or "(no hostname)"),
        ("Operating system", machine.os or "(not reported)"),
        ("Asked from", machine.source or "(unknown)"),
        ("Asked", age_text(machine.age_s)),
        ("You are", f"{profile.name}" + (f" ({profile.email})" if profile.email and profile.email != profile.name
                                         else "")),
        ("Your groups here", groups),
    ]
    dl = "".join(f"<dt>{_e(k)}</dt><dd id=\"{_e(k.lower().replace(' ', '-'))}\">{_e(v)}</dd>" for k, v in rows)
    body = (
        f"<h1>Add {_e(machine.hostname or 'this machine')} to the tailnet?</h1>"
        "<p>Approve only if you just ran <code>shoal up</code> on this machine yourself. Someone who sends you a "
        "login link is asking you to add <em>their</em> machine under <em>your</em> name.</p>"
        f"<dl>{dl}</dl>"
        f'<form method="post" action="{_e(action)}">'
        f'<input type="hidden" name="confirm" value="{_e(confirm_id)}">'
        f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
        '<button type="submit" id="approve">Approve this machine</button></form>'
        "<p>If you did not start this, close this page: nothing happens without the button.</p>"
    )
    return _doc("Approve this machine", body)


def approved(hostname: str, user: str, address: str) -> str:
    return page(
        "Machine approved",
        f"{hostname} joined the tailnet as {user}" + (f", with address {address}." if address else "."),
        "You can close this page; `shoal up` on the machine finishes by itself.",
    )
