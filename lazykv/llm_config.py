"""ExecuTorch ``export_llm`` configurations: the same YAML files and overrides, read the
same way.

``python -m executorch.extension.llm.export.export_llm --config FILE.yaml KEY=VALUE ...``
composes its configuration with Hydra (``FILE.yaml`` as the primary config, the
``KEY=VALUE`` overrides on top, Hydra's override grammar: ``+key=value`` adds a key the
file does not set, ``~key`` deletes one), then merges the result into the structured
``LlmConfig`` and converts it to the dataclass. :func:`load_llm_config` does exactly
that through Hydra's compose API, so a configuration means here what it means to
``export_llm``: same defaults, same validation, same errors.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from lazykv.errors import LazyKVError


class ConfigError(LazyKVError):
    """An ``export_llm`` configuration file or override that cannot be read."""

    exit_code = 2


#: Name of the structured ``LlmConfig`` node in Hydra's config store (export_llm's own).
_NODE = "llm_config"


def load_llm_config(config_file: Optional[os.PathLike], overrides: Sequence[str] = ()):
    """The ``LlmConfig`` that ``export_llm --config config_file *overrides`` would export.

    ``config_file`` may be None (overrides on top of ``LlmConfig``'s defaults, like
    ``export_llm`` without ``--config``). Raises :class:`ConfigError` naming the file or
    override and the fix (a missing file, an override of a key the file does not set,
    a value of the wrong type).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from executorch.extension.llm.export.config.llm_config import LlmConfig

    overrides = [str(o) for o in overrides]
    for o in overrides:
        if "=" not in o and not o.startswith("~"):
            raise ConfigError(
                f"override {o!r} is not KEY=VALUE (export_llm's syntax, e.g. "
                f"export.max_context_length=4096, or +base.model_class=llama3_2 for a key "
                f"the config file does not set)"
            )
    # export_llm registers this node at import; do the same so a run without a file
    # composes from LlmConfig's defaults.
    ConfigStore.instance().store(name=_NODE, node=LlmConfig)
    if config_file is not None:
        path = Path(config_file).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"--config {config_file}: no such file")
        config_dir, config_name = str(path.parent), path.name
    else:
        config_dir, config_name = None, _NODE
    if GlobalHydra.instance().is_initialized():  # pragma: no cover - another caller's state
        GlobalHydra.instance().clear()
    try:
        # Without a file, compose LlmConfig's node from an empty directory (a file called
        # llm_config.yaml in the working directory must not be picked up instead).
        with tempfile.TemporaryDirectory() as empty, initialize_config_dir(
            config_dir=config_dir or empty, version_base=None
        ):
            cfg = compose(config_name=config_name, overrides=overrides)
        merged = OmegaConf.merge(OmegaConf.structured(LlmConfig), cfg)
        return OmegaConf.to_object(merged)
    except Exception as e:  # Hydra and OmegaConf raise many types; all are user errors here
        raise ConfigError(_explain(e, config_file)) from None


def _explain(e: Exception, config_file) -> str:
    text = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
    where = f"--config {config_file}" if config_file is not None else "the overrides"
    fix = "fix the key or value (export_llm reads the same configuration the same way)"
    if "not in struct" in str(e) or "Could not override" in str(e):
        fix = (
            "a key that the config file does not set needs Hydra's '+' prefix, as with "
            "export_llm (e.g. +base.model_class=llama3_2)"
        )
    elif "Could not append" in str(e) or "already exists" in str(e):
        fix = "the key is already set: drop the '+' prefix"
    return f"{where}: {type(e).__name__}: {text}. Fix: {fix}"
