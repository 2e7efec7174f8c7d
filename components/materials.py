"""Registry of crystals as seen down a zone axis.

A material is data: its projected rectangular cell, the atomic columns in it, and the
crystallography its defects need (Burgers vector, stacking planes). Adding a material means
adding an entry to MATERIALS, not writing simulator code. Plain Python only, so every part
of the project can import it.
"""

import math
from dataclasses import dataclass

from components.defects import DEFECT_CLASSES

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
class StackingPlanes:
    """One variant of a stacking-plane family seen edge-on: where faults and twins form.

    Vectors are (x, y) in angstrom in the projected cell frame (x along a_x, y along a_y).
    normal: unit normal of the planes; it lies in the image plane since they are edge-on.
    spacing: distance between successive stacking layers along `normal`.
    layer_column: the column that opens a layer; every copy of it opens one.
    partial: projected Shockley partial, the shift of everything above a stacking fault.
    fault_cut: height of the stacking-fault cut above a layer_column, in units of spacing.
    twin_cut: height of the twin boundary above a layer_column, in units of spacing. The
        twin is the 180-degree rotation about `normal` through a layer_column of the first
        layer above the cut: it mirrors the stacking and keeps the polarity along `normal`.
    """

    miller: str
    normal: tuple[float, float]
    spacing: float
    layer_column: str
    partial: tuple[float, float]
    fault_cut: float
    twin_cut: float

    def __post_init__(self):
        if abs(math.hypot(*self.normal) - 1) > 1e-9:
            raise ValueError(f"planes {self.miller}: normal must be a unit vector")
        if abs(self.normal[0] * self.partial[0] + self.normal[1] * self.partial[1]) > 1e-9:
            raise ValueError(f"planes {self.miller}: the partial must lie in the plane")
        if self.spacing <= 0 or not (0 <= self.fault_cut < 1 and 0 <= self.twin_cut < 1):
            raise ValueError(f"planes {self.miller}: need spacing > 0 and cuts in [0, 1)")


@dataclass(frozen=True)
class Material:
    """A crystal projected along a zone axis.

    cell: edges (a_x, a_y) of the projected rectangular cell in angstrom.
    repeat: period along the beam in angstrom; Column.atoms count atoms per this length.
    substituents: (column name, element replacing that column's host element).
    vacancy_columns: columns where vacancies are drawn; only columns HAADF can see, since
        a vacancy in a column too dim to image would be a label without a signal.
    interstitials: extra columns that can appear at empty-channel sites of the projection;
        dislocation cores are put on these sites too, so that no column sits on the core.
    defect_classes: the defect classes this material is drawn with.
    burgers: fractional (u, v) Burgers vector of the edge dislocation whose line is the
        beam: a lattice vector of the projected cell, perpendicular to the beam.
    poisson_ratio: isotropic Poisson ratio of the dislocation's elastic field.
    stacking_planes: variants of the edge-on plane family of stacking faults and twins.
    """

    name: str
    zone_axis: str
    cell: tuple[float, float]
    repeat: float
    columns: tuple[Column, ...]
    defect_classes: tuple[str, ...]
    substituents: tuple[tuple[str, str], ...] = ()
    vacancy_columns: tuple[str, ...] = ()
    interstitials: tuple[Column, ...] = ()
    burgers: tuple[float, float] | None = None
    poisson_ratio: float | None = None
    stacking_planes: tuple[StackingPlanes, ...] = ()

    def __post_init__(self):
        if min(self.cell) <= 0 or self.repeat <= 0:
            raise ValueError(f"{self.name}: cell edges and repeat must be > 0")
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
        for planes in self.stacking_planes:
            if planes.layer_column not in names:
                raise ValueError(
                    f"{self.name}: layer column {planes.layer_column!r} is not a column")
        unknown = [c for c in self.defect_classes if c not in DEFECT_CLASSES]
        if unknown or len(set(self.defect_classes)) != len(self.defect_classes):
            raise ValueError(
                f"{self.name}: defect_classes must be distinct names from "
                f"{', '.join(DEFECT_CLASSES)}; got {self.defect_classes}"
            )
        # Every declared class needs the data that draws it.
        needs = {
            "vacancy": self.vacancy_columns,
            "substitution": self.substituents,
            "interstitial": self.interstitials,
            "dislocation": self.burgers is not None and self.poisson_ratio is not None
            and self.interstitials,
            "stacking_fault": self.stacking_planes,
            "twin_boundary": self.stacking_planes,
        }
        for defect_class in self.defect_classes:
            if not needs[defect_class]:
                raise ValueError(f"{self.name}: {defect_class} needs data the entry lacks")
        if self.poisson_ratio is not None and not 0 <= self.poisson_ratio < 0.5:
            raise ValueError(f"{self.name}: poisson_ratio must be in [0, 0.5)")

    def substituent(self, column_name: str) -> str | None:
        return dict(self.substituents).get(column_name)

    @property
    def substitution_contrast(self) -> int:
        """+1 when every substituent is heavier than the host it replaces (HAADF intensity
        goes as Z**n, so its column turns brighter), -1 when every one is lighter (dimmer),
        0 when they differ or there are none."""
        hosts = {column.name: column.host for column in self.columns}
        signs = {1 if species(element).z > species(hosts[column_name]).z else -1
                 for column_name, element in self.substituents}
        return signs.pop() if len(signs) == 1 else 0


_STO_A = 3.905  # SrTiO3, cubic perovskite
_CDTE_A = 6.481  # CdTe, zinc blende

# CdTe [110] in the cell frame x || [1-10], y || [001]. The edge-on {111} planes are (1-11)
# and (-111), mirror images under the (1-10) mirror of the zinc-blende point group (x -> -x).
# (1-11): normal (sqrt2, 1)/sqrt3, spacing a/sqrt3; partial a/6[1-1-2] -> (sqrt2, -2) a/6, the
# one Shockley partial of the plane that is perpendicular to the beam. A layer is a Cd-Te
# double layer: Cd at 0, its Te d/4 above (three bonds), the next Cd 3d/4 above that Te (one
# bond along the normal). The intrinsic fault ABC|BCA shears in the glide set, between the Cd
# and the Te of a layer (d/8 above Cd), so that every bond survives; the twin boundary sits
# in the wide gap (5d/8 above Cd), and its twin keeps Te above Cd along the normal.
_CDTE_PLANES = tuple(
    StackingPlanes(
        miller=miller,
        normal=(sign * math.sqrt(2 / 3), math.sqrt(1 / 3)),
        spacing=_CDTE_A / math.sqrt(3),
        layer_column="Cd",
        partial=(sign * math.sqrt(2) * _CDTE_A / 6, -_CDTE_A / 3),
        fault_cut=1 / 8,
        twin_cut=5 / 8,
    )
    for miller, sign in (("(1-11)", 1), ("(-111)", -1))
)

MATERIALS: dict[str, Material] = {
    # [001]: Sr columns at the corners, Ti-O columns at the centre, pure O columns on the
    # edges. The empty channels sit at the quarter points, 1.38 A from every column.
    "SrTiO3": Material(
        name="SrTiO3",
        zone_axis="[001]",
        cell=(_STO_A, _STO_A),
        repeat=_STO_A,
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
        defect_classes=("vacancy", "substitution", "interstitial", "dislocation"),
        # a[100] edge dislocation on (010). Poisson ratio: Voigt-Reuss-Hill average of the
        # cubic elastic constants (C11, C12, C44 = 317, 103, 124 GPa).
        burgers=(1.0, 0.0),
        poisson_ratio=0.23,
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
        repeat=_CDTE_A / 2**0.5,
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
        defect_classes=DEFECT_CLASSES,
        # a/2[1-10] Lomer dislocation: pure edge for a [110] line. Poisson ratio: Voigt-
        # Reuss-Hill average of (C11, C12, C44 = 53.5, 36.5, 19.9 GPa).
        burgers=(1.0, 0.0),
        poisson_ratio=0.35,
        stacking_planes=_CDTE_PLANES,
    ),
}


def substitution_contrast(name: str) -> int:
    """`Material.substitution_contrast` of a registered material; 0 (either sign) for a name
    the registry does not hold, such as a real micrograph's "unknown"."""
    material = MATERIALS.get(name)
    return material.substitution_contrast if material else 0


def get_material(name: str) -> Material:
    try:
        return MATERIALS[name]
    except KeyError:
        raise ValueError(
            f"unknown material {name!r}; known materials: {', '.join(sorted(MATERIALS))}"
        ) from None
