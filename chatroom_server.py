"""Runs the chat room server from a checkout: `python chatroom_server.py --help`.

The code lives in the chatroom package (chatroom/serve.py starts the loop in chatroom/server.py);
installed, this is `chatroom-server`.
"""

import sys

from chatroom.serve import main

if __name__ == "__main__":
    sys.exit(main())
