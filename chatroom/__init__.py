"""chatroom: a multi-client chat room for the terminal (see README.md and ARCHITECTURE.md)."""

# The one place the version is written: pyproject.toml reads it, --version prints it, and a
# test holds the Java client to it.
__version__ = "0.3.0"
