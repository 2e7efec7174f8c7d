"""The one list of defect classes.

Every other part of the project imports these names: the simulator draws them, the data
contract sizes mask channels with them, the models name output channels after them. Order
matters: it is the channel order of every mask and heat map.
"""

# Point defects first, then the extended ones: a dislocation core and the two planar
# defects of close-packed stacking.
DEFECT_CLASSES = (
    "vacancy",
    "substitution",
    "interstitial",
    "dislocation",
    "stacking_fault",
    "twin_boundary",
)

# Defects that cross the whole crystal along a lattice plane: marked as bands tens of
# pixels wide, where a point defect's mark is a few pixels across.
PLANAR_CLASSES = ("stacking_fault", "twin_boundary")

# Image class of a defect-free crystal; the classifier's labels are BULK_LABEL plus the
# defect classes present in the data.
BULK_LABEL = "bulk"

IMAGE_CLASSES = (BULK_LABEL,) + DEFECT_CLASSES

# Image classes whose label survives a rotation by 90 degrees or a mirror of the whole
# image: a point defect or a dislocation core is one whatever the view. Planar defects are
# left out: a class set may tell them apart by the orientation of the plane.
ORIENTATION_FREE_LABELS = (BULK_LABEL, "vacancy", "substitution", "interstitial", "dislocation")

# Image label of a segmentation image that shows more than one defect class; its mask and
# multi-hot vector say which.
MIXED_LABEL = "mixed"


def class_index(name: str) -> int:
    """Channel index of a defect class, with an error that lists the known classes."""
    try:
        return DEFECT_CLASSES.index(name)
    except ValueError:
        raise ValueError(
            f"unknown defect class {name!r}; known classes: {', '.join(DEFECT_CLASSES)}"
        ) from None
