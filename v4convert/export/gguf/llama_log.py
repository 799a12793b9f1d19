"""llama.cpp's log output, made safe: one callback that never raises.

llama-cpp-python's own callback (``llama_cpp/_logger.py``) decodes every message with strict UTF-8;
llama.cpp splits long lines (e.g. token lists printed during ``llama_model_quantize``) at byte
boundaries, so a multi-byte character cut in two raises ``UnicodeDecodeError`` inside the ctypes
callback and Python prints a traceback on an otherwise successful run. Ours decodes with
``errors="replace"`` and drops llama.cpp's INFO/DEBUG chatter (hundreds of lines per file) unless
``V4CONVERT_LLAMA_LOG=1``; warnings and errors still reach stderr.
"""
from __future__ import annotations

import ctypes
import os
import sys

# ggml_log_level (ggml.h of the vendored llama.cpp): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
# (continues the previous message). llama-cpp-python's _logger.py comment still lists an older order.
LEVEL_WARN, LEVEL_ERROR, LEVEL_CONT = 3, 4, 5
_state = {"last": 0, "callback": None}


def _show(level: int) -> bool:
    if os.environ.get("V4CONVERT_LLAMA_LOG") == "1":
        return True
    level = _state["last"] if level == LEVEL_CONT else level
    if level not in (LEVEL_WARN, LEVEL_ERROR):
        return False
    import logging

    from llama_cpp._logger import (
        logger,  # Llama(verbose=False) raises it to ERROR: honour that
    )
    return level == LEVEL_ERROR or logger.level <= logging.WARNING


def install() -> None:
    """Route llama.cpp's log through our callback (idempotent). Call after ``import llama_cpp``."""
    if _state["callback"] is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        try:
            if _show(level):
                sys.stderr.write(text.decode("utf-8", errors="replace"))
                sys.stderr.flush()
            if level != LEVEL_CONT:
                _state["last"] = level
        except Exception:  # noqa: BLE001, S110 -- a callback must never raise into C (Python would print a traceback)
            pass

    _state["callback"] = callback            # keep the ctypes thunk alive
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
