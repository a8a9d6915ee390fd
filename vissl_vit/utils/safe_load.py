"""Reading torch files without running the code a pickle can carry.

``torch.load(weights_only=False)`` unpickles without restriction: a file can name any importable
function (``os.system``, ...) and have it called while it loads. Every file this engine reads
(weights, checkpoints, files to convert) goes through :func:`load_torch_file`, which loads with
``weights_only=True`` (tensors, containers, numbers, strings) plus the few numpy types older
vissl_vit checkpoints hold (numpy's RNG state), and refuses anything else unless the user opted in
by the setting named in the error.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
from typing import Any

import numpy as np
import torch

from vissl_vit.errors import UserError

logger = logging.getLogger(__name__)


def _numpy_safe_globals() -> list[Any]:
    """The numpy globals an ndarray (and a numpy scalar) pickles with: they build arrays of plain
    data and call nothing else, so allowing them keeps the load free of code execution."""
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    dtypes = [np.uint32, np.int64, np.int32, np.float64, np.float32, np.bool_, np.uint8]
    return [_reconstruct, scalar, np.ndarray, np.dtype, *(type(np.dtype(t)) for t in dtypes)]


NUMPY_SAFE_GLOBALS = _numpy_safe_globals()
_GLOBAL_RE = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")


def load_torch_file(data: bytes | str, *, name: str, allow_code_key: str, allow_code: bool) -> Any:
    """``torch.load`` on the CPU that runs no code from the file unless ``allow_code`` is set.

    Args:
        data: the file's bytes, or a local path.
        name: the file's name, for messages.
        allow_code_key: the setting that opts in, named in the refusal: a config key
            (``config.CHECKPOINT.ALLOW_PICKLE_CODE_EXECUTION``) or a command-line switch (``--...``).
        allow_code: the value of that setting: load files that pickle Python objects in full.

    Raises:
        UserError: the file needs code to load (and ``allow_code`` is off), or is not a torch file.
    """
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL_RE.search(str(e))
        if found is None:  # not a pickle the safe unpickler understands: not a torch file
            raise UserError(f"Could not read {name}: not a torch file, or a damaged one.") from None
        if not allow_code:
            opt_in = f"pass {allow_code_key}" if allow_code_key.startswith("--") else f"set {allow_code_key}=True"
            raise UserError(
                f"{name} holds pickled Python objects ({found.group(1)}) that would run code when loaded; it was "
                f"not loaded. If you trust the file, {opt_in}."
            ) from None
        logger.warning(
            "%s holds pickled Python objects (%s): loading it in full, which runs the code it names, because "
            "%s=True. Only do this with files you trust.",
            name,
            found.group(1),
            allow_code_key,
        )
    except Exception as e:  # noqa: BLE001  a zip or format error: not a torch file, or truncated
        raise UserError(f"Could not read {name}: {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(data, bytes):
        with open(data, "rb") as f:
            data = f.read()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"Could not read {name}: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__
