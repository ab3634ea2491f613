"""An output class: its name and display colour (shared by model bundles and mosaics; no torch here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class ClassInfo:
    """One output class: its display name and colour.

    Args:
        name: Human-readable class name (non-empty).
        color: RGB colour, three integers 0..255 (a list is accepted and stored as a tuple).

    Raises:
        ConfigError: If the name is empty or the colour is not an RGB triple.
    """

    name: str
    color: tuple[int, int, int]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"Class name {self.name!r} is invalid; expected a non-empty string.")
        if not isinstance(self.color, Sequence) or isinstance(self.color, str):
            raise ConfigError(f"colour of class {self.name!r} {self.color!r} is invalid; expected a list or tuple.")
        color = tuple(self.color)
        if len(color) != 3 or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color):
            raise ConfigError(
                f"Colour {self.color!r} of class {self.name!r} is invalid; expected three "
                "integers 0..255 (red, green, blue), e.g. (255, 0, 0)."
            )
        object.__setattr__(self, "color", color)


def default_colors(count: int) -> list[tuple[int, int, int]]:
    """`count` distinct display colours: black for class 0 (the background), then well-separated hues."""
    import colorsys

    hues = [(k * 0.618034) % 1.0 for k in range(count - 1)]  # the golden ratio spreads any number apart
    return [(0, 0, 0)] + [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 0.95)) for h in hues]  # type: ignore[misc]


def parse_class(text: str, index: int) -> ClassInfo:
    """A class from `NAME` or `NAME:R,G,B` (a command line's form); NAME alone takes a default colour.

    Raises:
        ConfigError: If the colour is not three integers 0..255.
    """
    name, _, color = text.partition(":")
    if not color:
        return ClassInfo(name.strip(), default_colors(index + 1)[index])
    try:
        rgb = tuple(int(c) for c in color.split(","))
    except ValueError:
        raise ConfigError(f"Class {text!r}: the colour after ':' must be R,G,B, three integers 0..255.") from None
    return ClassInfo(name.strip(), rgb)  # type: ignore[arg-type]
