"""The wire format, for code run from a checkout that imports `protocol`.

It lives in chatroom/protocol.py, so that an installed chatroom claims no top-level name as
generic as `protocol`; this re-exports it unchanged.
"""

from chatroom.protocol import *  # noqa: F403
