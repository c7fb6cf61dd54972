"""What a chat message says: the text of OpenAI-style message content.

Content is a string, or a list of parts of which the "text" ones carry text (others are images,
audio...). The gateway and the in-cluster targets both read it.
"""

from __future__ import annotations

from typing import Any


def text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
