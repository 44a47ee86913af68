"""exo-align's shared code: the training loop, losses, data, models and inference.

In the source tree this package is `src/utils`, and the entry scripts in `src/` import it as
`utils` (a script's own directory comes first on sys.path). `pip install` installs it as
`exo_align`, never under the generic name `utils` that a user's own utils.py would shadow;
inside the package every import is relative, so both names load the same code.

A stage imports it as `utils`; a --dataset_module may import it by either name. So that the
two names cannot load two copies (two dataset registries, two PromptRawDataset classes), a
stage aliases `exo_align.*` to the `utils.*` modules it already runs on. A stage also
silences the library messages that ask nothing of the user (see quiet.py).
"""
import importlib
import importlib.abc
import importlib.util
import sys

INSTALLED_NAME = "exo_align"


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves `exo_align[.x]` to the already running `utils[.x]` module objects."""

    def __init__(self, source_name):
        self.source_name = source_name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == INSTALLED_NAME or fullname.startswith(INSTALLED_NAME + "."):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(self.source_name + spec.name[len(INSTALLED_NAME):])
        self._source_spec = module.__spec__
        return module

    def exec_module(self, module):
        # Already executed under its source name; the import system has just set the alias's
        # spec on it: put back the module's own, which its relative imports resolve against.
        module.__spec__ = self._source_spec


if __name__ != INSTALLED_NAME:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder(__name__))
    # Running as the entry scripts' `utils`: silence the known, harmless library messages
    # (quiet.py says why each is harmless). The installed library leaves them alone.
    from . import quiet  # noqa: F401,E402
