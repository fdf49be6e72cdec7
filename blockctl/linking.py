"""Files a merge leaves unchanged are linked to the base's, not copied: a merged SD 1.5 folder
then costs the disk only what changed (the UNet, the text encoder when tokens are added).

Tried in order, the first the filesystem allows:

1. **reflink** (a copy-on-write clone: btrfs, XFS, ZFS 2.2+ on Linux): shares the data
   blocks yet is an independent file, so writing to either never changes the other;
2. **hard link**: the same file under two names. The merged folder stays self-contained: it
   survives the base being moved or deleted, and ``cp -r``, ``tar`` or ``upload_folder`` see
   ordinary files. The price: a program that rewrites the file *in place* (``save_pretrained``
   back into the merged folder truncates and rewrites) rewrites the base's file too;
3. **symbolic link**, where hard links cannot go (another filesystem), but only to a Hub
   cache blob: blobs are named by their content and never rewritten, so the link can dangle
   (the cache cleaned) but never silently point at other bytes, as a link into an ordinary
   folder could once its file is replaced (a new version of the package holding the toy
   base, a user's edited base). The same in-place caveat as hard links;
4. a plain **copy**.

Hard links come before symbolic links because a merged folder that outlives or travels without
its base is worth more than the one thing a symbolic link adds (crossing filesystems); both
share the in-place caveat, which the Hub cache's own symlinked snapshots have too. blockctl
itself never writes into a file it linked, and deleting or replacing a merged folder removes
only the links. ``copy=True`` (``merge --copy``) forces independent copies.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

FICLONE = 0x40049409  # Linux ioctl: make the destination a copy-on-write clone of the source
METHODS = ("reflink", "hardlink", "symlink", "copy")


def place(src: Path, dst: Path, *, copy: bool = False) -> str:
    """Make ``dst`` (which must not exist) hold ``src``'s bytes; returns the method used."""
    if not copy:
        for name, method in (("reflink", _reflink), ("hardlink", _hardlink), ("symlink", _symlink)):
            try:
                method(src, dst)
                return name
            except (OSError, ImportError, NotImplementedError, AttributeError):
                continue  # not on this filesystem or platform: the next method
    shutil.copyfile(src, dst)
    return "copy"


def _reflink(src: Path, dst: Path) -> None:
    import fcntl  # POSIX only; its absence (Windows) falls through to the next method

    with src.open("rb") as source, dst.open("xb") as target:
        try:
            fcntl.ioctl(target.fileno(), FICLONE, source.fileno())
        except BaseException:
            dst.unlink()  # the empty file this attempt created, nothing else
            raise


def _hardlink(src: Path, dst: Path) -> None:
    os.link(src, dst)  # follows a symlinked source (Hub cache snapshots) to the real file


def _symlink(src: Path, dst: Path) -> None:
    target = src.resolve(strict=True)
    if not is_hub_blob(target):
        raise OSError(f"{target} is not content-addressed: a symbolic link could change meaning")
    os.symlink(target, dst)


def is_hub_blob(path: Path) -> bool:
    """A file of the Hugging Face cache's content-addressed store (``models--org--name/blobs/``)."""
    repo = path.parent.parent.name
    return path.parent.name == "blobs" and repo.startswith(("models--", "datasets--", "spaces--"))


class Placer:
    """``place`` with one policy for a whole merge, counting what it did for the user."""

    def __init__(self, *, copy: bool = False) -> None:
        self.copy = copy
        self.counts: Counter[str] = Counter()

    def __call__(self, src: Path, dst: Path) -> None:
        self.counts[place(src, dst, copy=self.copy)] += 1

    def notes(self) -> list[str]:
        linked = {m: n for m, n in self.counts.items() if m != "copy"}
        if not linked:
            return []
        how = ", ".join(f"{n} by {m}" for m, n in sorted(linked.items()))
        return [
            f"{sum(linked.values())} unchanged file(s) linked to the base's ({how}), not copied; "
            "--copy makes independent copies"
        ]
