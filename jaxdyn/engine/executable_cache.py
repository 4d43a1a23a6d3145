"""A disk cache of the runner's compiled steps, so a restart skips tracing and lowering too.

JAX's persistent compilation cache saves XLA's compilation, but a warm start still traces and
lowers every step (the unrolled model, once per bucket shape) to find its cache key: on an H200,
most of a warm start's warm-up (8B shape: about 1.5-2 s a shape). This cache keeps the compiled
executables themselves (``jax.experimental.serialize_executable``), one file per compiled part
(a (token bucket, page bucket, sampler variant) step, a bucket's ``sampler_switch`` or forward, a
sampler apart: ``ModelRunner._part_keys``), under a directory named by a fingerprint of everything the
executable depends on: jax / jaxlib / flax versions, backend and devices, the mesh, the model
config, the runner's config, the weights' shapes, dtypes and shardings, the KV cache spec,
``XLA_FLAGS`` and the source of ``jaxdyn`` and ``pallas_kernels``. Any change gives a new
directory; nothing is ever reused across one.

A file that cannot be read or loaded is a miss (the step is compiled and the file rewritten);
saving never fails the caller. Writes are atomic (temporary file, then rename), so concurrent
processes with the same fingerprint at worst both write the same executable.

Loading an executable runs code from the file: point the cache only at a directory you trust
(as with JAX's own cache). A code or config change leaves the previous fingerprint's directory behind:
when a new one is made, only the ``KEEP_FINGERPRINTS`` most recently used stay (a hit marks its directory
used); other files in the cache directory are never touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile

log = logging.getLogger(__name__)

_ROOTS = ("jaxdyn", "pallas_kernels")      # the packages whose code is traced into the step
_source_digest: str | None = None


def source_digest() -> str:
    """sha256 over the Python sources of the packages traced into the step (computed once)."""
    global _source_digest
    if _source_digest is None:
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        h = hashlib.sha256()
        for root in _ROOTS:
            base = os.path.join(here, root)
            for dirpath, dirnames, filenames in os.walk(base):
                dirnames.sort()
                for name in sorted(filenames):
                    if name.endswith(".py"):
                        path = os.path.join(dirpath, name)
                        h.update(os.path.relpath(path, here).encode())
                        with open(path, "rb") as f:
                            h.update(hashlib.sha256(f.read()).digest())
        _source_digest = h.hexdigest()
    return _source_digest


def fingerprint(*parts) -> str:
    """A short hex digest of ``parts`` (their reprs) and of the versions, flags and sources above."""
    import flax
    import jax
    import jaxlib
    h = hashlib.sha256()
    for p in (jax.__version__, jaxlib.__version__, flax.__version__, os.environ.get("XLA_FLAGS", ""),
              source_digest(), *parts):
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


KEEP_FINGERPRINTS = 4
_FINGERPRINT = re.compile(r"[0-9a-f]{32}")


def default_directory() -> str | None:
    """``JAXDYN_EXECUTABLE_CACHE`` if set (empty: off); else ``jaxdyn-executables`` inside JAX's persistent
    compilation cache directory when one is configured; else ``jaxdyn/executables`` in the user's cache
    directory (``$XDG_CACHE_HOME``, else ``~/.cache``), as vLLM keeps its compiled graphs; None (no cache)
    when there is no home directory either."""
    env = os.environ.get("JAXDYN_EXECUTABLE_CACHE")
    if env is not None:
        return env or None
    # JAX's setting where JAX is imported (the server process, before its engine starts, has not:
    # then the variable JAX reads it from)
    jax = sys.modules.get("jax")
    jax_dir = (jax.config.jax_compilation_cache_dir if jax is not None else None) \
        or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if jax_dir:
        return os.path.join(jax_dir, "jaxdyn-executables")
    user = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return None if user.startswith("~") else os.path.join(user, "jaxdyn", "executables")


def prune(directory: str, keep: int = KEEP_FINGERPRINTS) -> list[str]:
    """Remove all but the ``keep`` most recently used fingerprint directories of ``directory`` (names of 32
    hex digits; nothing else is touched); returns the removed ones' names. Never raises."""
    try:
        dirs = [e for e in os.scandir(directory) if e.is_dir(follow_symlinks=False) and _FINGERPRINT.fullmatch(e.name)]
        dirs.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime, reverse=True)
    except OSError:
        return []
    removed = []
    for e in dirs[keep:]:
        try:
            shutil.rmtree(e.path)
            removed.append(e.name)
        except OSError as err:
            log.warning("executable cache: cannot remove %s (%s)", e.path, err)
    return removed


_said_cpu = False


def jax_cache_in_use() -> bool:
    """Whether JAX's persistent compilation cache is on in this process (a directory set, the cache enabled)."""
    import jax
    return bool(jax.config.jax_compilation_cache_dir) and bool(jax.config.jax_enable_compilation_cache)


@dataclasses.dataclass
class ExecutableCache:
    """Compiled steps of one fingerprint in ``directory/fingerprint/``; ``devices``: where they run."""

    directory: str
    key: str
    devices: list

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.key)

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name + ".jaxexec")

    def load(self, name: str) -> jax.stages.Compiled | None:
        """The executable saved as ``name``, or None (no file, or one that cannot be loaded)."""
        from jax.experimental import serialize_executable
        path = self._file(name)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, "rb") as f:
                blob, in_tree, out_tree = pickle.load(f)
            compiled = serialize_executable.deserialize_and_load(
                blob, in_tree, out_tree, backend=self.devices[0].client, execution_devices=self.devices)
            os.utime(self.path)            # used: kept by prune over older fingerprints
            return compiled
        except Exception as e:     # a torn, foreign or stale file: compile instead (and overwrite it)
            log.warning("executable cache: %s cannot be loaded (%s: %s); compiling it", path, type(e).__name__, e)
            return None

    def save(self, name: str, compiled: jax.stages.Compiled) -> bool:
        """Write ``compiled`` as ``name`` (atomically); False, with a warning, if it cannot be. On the CPU
        with JAX's persistent compilation cache in use, nothing is written (False; said once in the log):
        there ``compiled`` may have been loaded from JAX's cache, and such an executable, serialized and
        loaded again, fails when it runs ("NOT_FOUND: Function ..._fusion not found", jax 0.10.2), so a later
        start would load a step that cannot run. JAX's cache still keeps the compilation."""
        from jax.experimental import serialize_executable
        if self.devices[0].platform == "cpu" and jax_cache_in_use():
            global _said_cpu
            if not _said_cpu:
                _said_cpu = True
                log.info("executable cache: not saving on the CPU while JAX's persistent compilation cache is "
                         "in use (an executable loaded from it cannot be saved again)")
            return False
        try:
            blob, in_tree, out_tree = serialize_executable.serialize(compiled)
            if not os.path.isdir(self.path):
                os.makedirs(self.path, exist_ok=True)
                prune(self.directory)
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    pickle.dump((blob, in_tree, out_tree), f, protocol=pickle.HIGHEST_PROTOCOL)
                os.replace(tmp, self._file(name))
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            return True
        except Exception as e:
            log.warning("executable cache: cannot save %s in %s (%s: %s)", name, self.path, type(e).__name__, e)
            return False
