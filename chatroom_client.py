"""Runs the chat room client from a checkout: `python chatroom_client.py --help`.

The code lives in the chatroom package (chatroom/client.py); installed, this is `chatroom-client`.
"""

import sys

from chatroom.client import main

if __name__ == "__main__":
    sys.exit(main())
