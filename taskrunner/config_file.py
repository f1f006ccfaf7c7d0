"""The configuration file's bytes: read beneath the repository root without following links, never more
than MAX_CONFIG_FILE_BYTES (+1), and text over that limit refused before YAML parses it (config.py).
YAML costs seconds of CPU per megabyte, even of comments."""

from __future__ import annotations

from pathlib import Path

from taskrunner.defaults import CONFIG_FILE, MAX_CONFIG_FILE_BYTES
from taskrunner.errors import ConfigError, UnsafePath
from taskrunner.safefs import REFUSAL, Beneath
from taskrunner.textsafe import over_limit


def read_config_file(root: Path) -> bytes | None:
    """The bytes of root/.taskrun.yaml, None when there is none; ConfigError when it cannot be taken.

    Read beneath `root` (safefs: no link followed, no FIFO waited on), and
    never more than MAX_CONFIG_FILE_BYTES + 1 bytes: a larger file is
    refused by its size.
    """
    path = root / CONFIG_FILE
    tree = Beneath(root)
    try:
        data, size = tree.read_capped(CONFIG_FILE, MAX_CONFIG_FILE_BYTES)
    except FileNotFoundError:
        return None
    except UnsafePath as exc:
        raise ConfigError(str(path), f"cannot read the file: it is {exc.what}; {exc.reason or REFUSAL}") from None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the file: {exc.strerror or exc}") from exc
    finally:
        tree.close()
    if data is None:
        raise too_large(str(path), size)
    return data


def too_large(file: str, size: int) -> ConfigError:
    """The refusal of a configuration of `size` bytes, over MAX_CONFIG_FILE_BYTES."""
    return ConfigError(file, f"the file is {over_limit(size, MAX_CONFIG_FILE_BYTES, 'configuration files')} "
                             "(MAX_CONFIG_FILE_BYTES); shorten it: remove long comments or unused entries")


def check_config_size(text: str, file: str) -> None:
    """ConfigError (too_large) when `text` is more than MAX_CONFIG_FILE_BYTES of UTF-8."""
    if len(text) * 4 > MAX_CONFIG_FILE_BYTES:  # UTF-8 takes at most 4 bytes a character: short text is not counted
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_CONFIG_FILE_BYTES:
            raise too_large(file, size)
