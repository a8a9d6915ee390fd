"""The tools' shared option parsing."""

from __future__ import annotations

import pytest

from vissl_vit.errors import UserError
from vissl_vit.utils.cli import split_options

SPEC = dict(
    values={"--k": ("k", int)}, switches={"--fast": ("fast", True)}, defaults={"k": 1, "fast": False}, usage="u"
)


def test_options_and_config_arguments_are_separated():
    rest, opts = split_options(["config=a", "--k", "5", "config.X=1", "--fast"], **SPEC)
    assert rest == ["config=a", "config.X=1"] and opts == {"k": 5, "fast": True}
    assert split_options(["config=a"], **SPEC)[1] == {"k": 1, "fast": False}


@pytest.mark.parametrize(
    "argv, message",
    [(["--k"], "needs a value"), (["--k", "x"], "not a valid value"), (["--slow"], "unknown option --slow")],
)
def test_bad_options(argv, message):
    with pytest.raises(UserError, match=message):
        split_options(argv, **SPEC)
