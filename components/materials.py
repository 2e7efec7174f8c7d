"""Registry of crystals as seen down a zone axis.

A material is data: its projected rectangular cell and the atomic columns in it. Adding a
material means adding an entry to MATERIALS, not writing simulator code. Plain Python only,
so every part of the project can import it.
"""

from dataclasses import dataclass

# Atomic numbers of the elements the registry uses; HAADF contrast goes as Z**n.
ATOMIC_NUMBERS = {
    "O": 8,
    "Ti": 22,
    "Zn": 30,
    "Se": 34,
    "Sr": 38,
    "Nb": 41,
    "Cd": 48,
    "Te": 52,
    "La": 57,
}


@dataclass(frozen=True)
class Species:
    symbol: str
    z: int


def species(symbol: str) -> Species:
    """Look up an element, with an error that lists the known ones."""
    try:
        return Species(symbol, ATOMIC_NUMBERS[symbol])
    except KeyError:
        raise ValueError(
            f"unknown element {symbol!r}; known elements: {', '.join(sorted(ATOMIC_NUMBERS))}"
        ) from None


@dataclass(frozen=True)
class Column:
    """An atomic column of the projected structure.

    position: fractional (u, v) in the projected cell, u along a_x and v along a_y.
    atoms: (element, atoms in the column per unit-cell repeat along the beam).
    """

    position: tuple[float, float]
    atoms: tuple[tuple[str, float], ...]
    name: str

    def __post_init__(self):
        if not self.atoms:
            raise ValueError(f"column {self.name!r} has no atoms")
        for symbol, count in self.atoms:
            species(symbol)
            if count <= 0:
                raise ValueError(f"column {self.name!r}: count of {symbol} must be > 0")
        if not all(0.0 <= p < 1.0 for p in self.position):
            raise ValueError(f"column {self.name!r}: position must be fractional in [0, 1)")

    @property
    def host(self) -> str:
        """The heaviest element of the column: the one a substituent replaces."""
        return max((symbol for symbol, _ in self.atoms), key=lambda s: species(s).z)


@dataclass(frozen=True)
class Material:
    """A crystal projected along a zone axis.

    cell: edges (a_x, a_y) of the projected rectangular cell in angstrom.
    substituents: (column name, element replacing that column's host element).
    vacancy_columns: columns where vacancies are drawn; only columns HAADF can see, since
        a vacancy in a column too dim to image would be a label without a signal.
    interstitials: extra columns that can appear at empty-channel sites of the projection.
    """

    name: str
    zone_axis: str
    cell: tuple[float, float]
    columns: tuple[Column, ...]
    substituents: tuple[tuple[str, str], ...]
    vacancy_columns: tuple[str, ...]
    interstitials: tuple[Column, ...]

    def __post_init__(self):
        if min(self.cell) <= 0:
            raise ValueError(f"{self.name}: cell edges must be > 0, got {self.cell}")
        if not self.columns:
            raise ValueError(f"{self.name}: no columns")
        names = {c.name for c in self.columns}
        for column_name, element in self.substituents:
            if column_name not in names:
                raise ValueError(f"{self.name}: substituent for unknown column {column_name!r}")
            species(element)
        for column_name in self.vacancy_columns:
            if column_name not in names:
                raise ValueError(f"{self.name}: vacancy column {column_name!r} is not a column")

    def substituent(self, column_name: str) -> str | None:
        return dict(self.substituents).get(column_name)


_STO_A = 3.905  # SrTiO3, cubic perovskite
_CDTE_A = 6.481  # CdTe, zinc blende

MATERIALS: dict[str, Material] = {
    # [001]: Sr columns at the corners, Ti-O columns at the centre, pure O columns on the
    # edges. The empty channels sit at the quarter points, 1.38 A from every column.
    "SrTiO3": Material(
        name="SrTiO3",
        zone_axis="[001]",
        cell=(_STO_A, _STO_A),
        columns=(
            Column((0.0, 0.0), (("Sr", 1.0),), "Sr"),
            Column((0.5, 0.5), (("Ti", 1.0), ("O", 1.0)), "TiO"),
            Column((0.5, 0.0), (("O", 1.0),), "O"),
            Column((0.0, 0.5), (("O", 1.0),), "O"),
        ),
        substituents=(("Sr", "La"), ("TiO", "Nb")),
        vacancy_columns=("Sr", "TiO"),
        interstitials=tuple(
            Column((u, v), (("Ti", 1.0),), "Ti_i") for u in (0.25, 0.75) for v in (0.25, 0.75)
        ),
    ),
    # [110]: x along [1-10] (repeat a/sqrt2), y along [001] (repeat a), centred cell.
    # Cd at (0,0,0) and Te at (1/4,1/4,1/4) project to (0, 0) and (0, 1/4): dumbbells along
    # y, a/4 = 1.62 A long, one atom per column per a/sqrt2 along the beam. The tetrahedral
    # interstitial sites (1/2,1/2,1/2) and (3/4,3/4,3/4) project into the open hexagonal
    # channels at (0, 1/2) and (0, 3/4), plus their centred copies.
    "CdTe": Material(
        name="CdTe",
        zone_axis="[110]",
        cell=(_CDTE_A / 2**0.5, _CDTE_A),
        columns=(
            Column((0.0, 0.0), (("Cd", 1.0),), "Cd"),
            Column((0.0, 0.25), (("Te", 1.0),), "Te"),
            Column((0.5, 0.5), (("Cd", 1.0),), "Cd"),
            Column((0.5, 0.75), (("Te", 1.0),), "Te"),
        ),
        substituents=(("Cd", "Zn"), ("Te", "Se")),
        vacancy_columns=("Cd", "Te"),
        interstitials=tuple(
            Column(p, (("Cd", 1.0),), "Cd_i")
            for p in ((0.0, 0.5), (0.0, 0.75), (0.5, 0.0), (0.5, 0.25))
        ),
    ),
}


def get_material(name: str) -> Material:
    try:
        return MATERIALS[name]
    except KeyError:
        raise ValueError(
            f"unknown material {name!r}; known materials: {', '.join(sorted(MATERIALS))}"
        ) from None
