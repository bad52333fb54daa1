"""Stand-alone eSpeak NG render server (run as a script, never imported by the package).

eSpeak NG keeps waveform-generator state in C statics (pitch-flutter phase, glottal phase,
AGC) that survive `espeak_Terminate`/`espeak_Initialize`, so a clip rendered in a long-lived
process depends on every clip rendered before it. To make each clip a pure function of its
request, this process initialises the library once and forks a child per request: every
child starts from the same clean state. A fork of this small process costs about a
millisecond, and a crash inside the C library takes down only that child.

eSpeak NG also has a random noise source (`espeak_rand`, used for the breath noise of
variants with a `breath` line, such as `+f2` and `+f3`, and by the Klatt generator), and
`espeak_Initialize` seeds it from `time()`. Forking alone therefore repeats clips within one
process but not across processes. Each child reseeds it, and libc's `rand()` (which the
library's wave generator also calls), from a hash of its request before synthesizing.

Protocol on stdin/stdout (binary): one JSON request per line
`{"voice", "text", "rate", "volume", "pitch", "range"}`; each response is a status byte
(0 ok, 1 error), a little-endian uint64 length, then the payload: on success a little-endian
uint32 word count W, W records of three int32 (the word's 1-based character position in the
text, its length in characters, its start in the audio in milliseconds: eSpeak's word
events), then the int16 little-endian samples; on failure a UTF-8 error message. The first response, sent at start-up, carries the sample rate as a
little-endian int32. The server exits when stdin closes.

Usage: python _espeak_server.py LIBRARY_PATH DATA_PATH
"""

import ctypes
import json
import os
import struct
import sys
import zlib

AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
# espeak_PARAMETER enum values.
PARAM = {"rate": 1, "volume": 2, "pitch": 3, "range": 4}

EVENT_LIST_TERMINATED, EVENT_WORD = 0, 1


class _Event(ctypes.Structure):
    # espeak_EVENT of speak_lib.h (the union `id` is read as its widest member, a pointer).
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
                ("text_position", ctypes.c_int), ("length", ctypes.c_int),
                ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_void_p)]


_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _respond(status: int, payload: bytes) -> None:
    _write_all(1, struct.pack("<BQ", status, len(payload)) + payload)


def _seed_noise(lib, libc, line: bytes) -> None:
    # A function of the request only: clips with identical requests are identical, and
    # different requests still get different breath noise. 31 bits fit every C seed type.
    seed = zlib.crc32(line.strip()) & 0x7FFFFFFF
    lib.espeak_ng_SetRandSeed(seed)
    libc.srand(seed)


def _render(lib, request: dict) -> bytes:
    chunks, words = [], []

    def collect(wav, numsamples, events):
        if numsamples > 0 and wav:
            chunks.append(ctypes.string_at(wav, numsamples * 2))
        i = 0
        while events and events[i].type != EVENT_LIST_TERMINATED:
            e = events[i]
            if e.type == EVENT_WORD:
                words.append((e.text_position, e.length, e.audio_position))
            i += 1
        return 0

    callback = _CALLBACK(collect)
    lib.espeak_SetSynthCallback(callback)
    err = lib.espeak_SetVoiceByName(request["voice"].encode())
    if err != 0:
        raise ValueError(f"eSpeak NG has no voice {request['voice']!r} (error {err})")
    for name, code in PARAM.items():
        if name in request:
            lib.espeak_SetParameter(code, int(request[name]), 0)
    text = request["text"].encode("utf-8") + b"\0"
    err = lib.espeak_Synth(text, len(text), 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None)
    if err != 0:
        raise RuntimeError(f"espeak_Synth failed with error {err}")
    lib.espeak_Synchronize()
    head = struct.pack("<I", len(words)) + b"".join(struct.pack("<iii", *w) for w in words)
    return head + b"".join(chunks)


def main() -> None:
    lib_path, data_path = sys.argv[1], sys.argv[2]
    lib = ctypes.CDLL(lib_path)
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
        ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]
    if not hasattr(lib, "espeak_ng_SetRandSeed"):
        # Without it the breath noise is seeded from the clock and clips are not reproducible.
        message = (f"{lib_path} lacks espeak_ng_SetRandSeed "
                   "(eSpeak NG 1.52 from espeakng-loader has it)")
        _respond(1, message.encode())
        return
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    libc = ctypes.CDLL(None)
    libc.srand.argtypes = [ctypes.c_uint]
    sample_rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
    if sample_rate <= 0:
        _respond(1, f"espeak_Initialize failed for data path {data_path}".encode())
        return
    # The first voice selection scans every voice file (~8 ms); doing it once here means each
    # forked child inherits the scanned list. The parent never synthesizes, so every child
    # still starts from the same state.
    lib.espeak_SetVoiceByName(b"en")
    _respond(0, struct.pack("<i", sample_rate))
    stdin = sys.stdin.buffer
    for line in stdin:
        if not line.strip():
            continue
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _seed_noise(lib, libc, line)
                _respond(0, _render(lib, json.loads(line)))
            except BaseException as e:  # noqa: BLE001 - every failure goes back as a message
                _respond(1, f"{type(e).__name__}: {e}".encode())
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            _respond(1, f"render process died (wait status {status})".encode())


if __name__ == "__main__":
    main()
