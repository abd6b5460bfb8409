"""Image files given as input (e.g. a concept's reference images): which files of a folder are images.

Pure path logic, no decoding and no torch, so the command line lists and checks a folder's images
(:func:`conceptsmith.validate.check_images`) before it imports anything heavy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from conceptsmith.errors import CustomizationError

#: File suffixes read as images (compared in lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def find_images(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image files of a folder (sorted by name) or the given list of files, checked to exist."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise CustomizationError(f"Reference image path '{path}' does not exist.")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                others = sorted(p.name for p in path.iterdir())[:5]
                seen = f" (it holds: {', '.join(others)})" if others else " (it is empty)"
                raise CustomizationError(
                    f"No images in '{path}'{seen}. Put the 3-10 reference images of the concept there "
                    f"as {', '.join(IMAGE_SUFFIXES)} files."
                )
            return files
        return [path]
    files = []
    for item in source:
        files.extend(find_images(item))
    if not files:
        raise CustomizationError("No reference images given: pass a folder or image files of the concept.")
    return files
