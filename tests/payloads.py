"""Hostile and awkward text for the bad-input tests: what must never reach a terminal raw."""

from __future__ import annotations

ESC = "\x1b"
BEL = "\x07"
ST = ESC + "\\"
CSI_C1 = "\x9b"
OSC_C1 = "\x9d"

# Terminal escape sequences (WallEscape CVE-2024-28085, git sideband, gurk-rs), as text a
# member might send; each must arrive with no control character left in it.
ESCAPE_SEQUENCES = [
    ESC + "[2J",  # clear screen
    ESC + "[H" + ESC + "[2J",  # home and clear
    ESC + "[1A" + ESC + "[2K",  # up a line and erase it: rewrite what someone said
    ESC + "[3J",  # clear scrollback
    ESC + "c",  # full reset
    ESC + "[6n",  # report cursor position: answers land in the victim's input
    ESC + "[21t",  # report window title
    ESC + "]0;pwned" + BEL,  # set window title, BEL-terminated
    ESC + "]0;pwned" + ST,  # set window title, ST-terminated
    ESC + "]2;title" + BEL,
    ESC + "]8;;https://evil.example/" + ST + "click" + ESC + "]8;;" + ST,  # hyperlink
    ESC + "]52;c;cm0gLXJmIH4K" + BEL,  # write the clipboard (OSC 52)
    ESC + "]52;c;?" + BEL,  # read the clipboard
    ESC + "P+q544e" + ST,  # DCS: request terminfo
    ESC + "P$qm" + ST,  # DECRQSS
    ESC + "[?1049h",  # alternate screen
    ESC + "[?25l",  # hide the cursor
    ESC + "[31mred" + ESC + "[0m",  # colours
    ESC + "[8mhidden" + ESC + "[0m",  # invisible text
    ESC + "[5m",  # blink
    ESC + "#8",  # DEC screen alignment: fills the screen with E
    ESC + "(0",  # line-drawing character set
    ESC + "[?1000h",  # mouse reporting
    ESC + "[4i",  # printer control
    ESC + "[200~paste",  # bracketed paste start
    CSI_C1 + "2J",  # 8-bit CSI
    OSC_C1 + "0;title" + BEL,  # 8-bit OSC
    "\x90+q544e\x9c",  # 8-bit DCS and ST
    "\x85",  # NEL
    "\x8d",  # reverse line feed
    "back\x08\x08\x08\x08over",  # backspaces
    "del\x7f\x7f\x7f",  # DEL
    "nul\x00byte",  # NUL
    "bell\x07",  # BEL
    "hi\r[9.9.9.9:9] fake",  # a bare CR rewrites the start of the line
    "tab\there",  # a tab becomes a space
    "\x0b\x0c\x1c\x1d\x1e\x1f",  # vertical tab, form feed, separators
    "\x0e\x0f",  # shift out / shift in
    "\x1a\x04\x03",  # SUB, EOT, ETX
    ESC,  # a lone ESC at the end of the line
]

# The twelve bidirectional controls (Trojan Source, CVE-2021-42574).
BIDI_CONTROLS = [
    "\u202a",
    "\u202b",
    "\u202c",
    "\u202d",
    "\u202e",
    "\u2066",
    "\u2067",
    "\u2068",
    "\u2069",
    "\u200e",
    "\u200f",
    "\u061c",
]

# Ordinary Unicode that must pass untouched.
ORDINARY = [
    "héllo wörld",
    "👨\u200d👩\u200d👧 family",  # ZWJ sequence
    "e\u0301 a\u0308",  # combining marks
    "漢字かなカナ 한국어",
    "مرحبا بالعالم",  # right-to-left script itself is fine; only the controls are not
    "🏳\ufe0f\u200d🌈",
    "a\u00a0b",  # no-break space
]

# Bytes that are not UTF-8: each must arrive as U+FFFD, never raw.
INVALID_UTF8 = [
    b"lone \x80 continuation",
    b"overlong \xc0\x80 nul",
    b"surrogate \xed\xa0\x80 half",
    b"truncated \xf0\x9f\x98 emoji",
    b"never \xff valid",
    b"\xfe\xfe",
]
