"""How a token context is drawn, shared by the feature browser and the human-evaluation cards:
each token shaded rgba(SHADE_RGB, act / max), the token the context is centred on outlined."""

from __future__ import annotations

SHADE_RGB = "255,120,0"
CONTEXT_CSS = """
.ctx{font-family:ui-monospace,monospace;font-size:13px;margin:2px 0;white-space:pre-wrap}
.tok{padding:1px 0;border-radius:2px}
.centre{outline:1px solid #999}
"""
