"""Stand-alone eSpeak NG render server (run as a script, never imported by the package).

eSpeak NG keeps waveform-generator state in C statics (pitch-flutter phase, glottal phase,
AGC) that survive `espeak_Terminate`/`espeak_Initialize`, so a clip rendered in a long-lived
process depends on every clip rendered before it. To make each clip a pure function of its
request, this process initialises the library once and forks a child per request: every
child starts from the same clean state. A fork of this small process costs about a
millisecond, and a crash inside the C library takes down only that child.

Protocol on stdin/stdout (binary): one JSON request per line
`{"voice", "text", "rate", "volume", "pitch", "range"}`; each response is a status byte
(0 ok, 1 error), a little-endian uint64 length, then the payload (int16 little-endian samples
or a UTF-8 error message). The first response, sent at start-up, carries the sample rate as a
little-endian int32. The server exits when stdin closes.

Usage: python _espeak_server.py LIBRARY_PATH DATA_PATH
"""

import ctypes
import json
import os
import struct
import sys

AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
# espeak_PARAMETER enum values.
PARAM = {"rate": 1, "volume": 2, "pitch": 3, "range": 4}

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _respond(status: int, payload: bytes) -> None:
    _write_all(1, struct.pack("<BQ", status, len(payload)) + payload)


def _render(lib, request: dict) -> bytes:
    chunks = []

    def collect(wav, numsamples, events):
        if numsamples > 0 and wav:
            chunks.append(ctypes.string_at(wav, numsamples * 2))
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
    return b"".join(chunks)


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
